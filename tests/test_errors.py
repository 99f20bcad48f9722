"""Bad input gets a clear mcalc error naming the problem, and exit code 2 from the CLI."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import sympy as sp

import mcalc as mc
from mcalc import layers as L

x, W = mc.Vector("x", "n"), mc.Matrix("W", "m", "n")


def test_mismatched_shapes_name_the_expression():
    with pytest.raises(mc.ShapeError, match=r"W @ W: \(m, n\) @ \(m, n\)"):
        W @ W
    with pytest.raises(mc.ShapeError, match="shape mismatch in sum"):
        W + x


@pytest.mark.parametrize("bad", ["2n", "", 0, -3, 1.5, None])
def test_unknown_dimension(bad):
    with pytest.raises(mc.DimensionError, match="unknown dimension"):
        mc.Vector("v", bad)


def test_unknown_dimension_at_evaluation():
    k = mc.Matrix("K", "k", "n")
    m = mc.Module("M", output=k @ x, inputs=[x], params=[k])
    with pytest.raises(mc.DimensionError, match="dimension 'n' is 4 here but 3"):
        m.forward({"x": np.ones(3), "K": np.ones((2, 4))})
    with pytest.raises(mc.EvaluationError, match="no value for symbol 'K'"):
        m.forward({"x": np.ones(3)})


def test_unsupported_operations():
    with pytest.raises(mc.UnsupportedOperationError, match="operation 'abs'"):
        abs(x)
    with pytest.raises(mc.UnsupportedOperationError, match=r"numpy\.exp"):
        np.exp(x)
    with pytest.raises(mc.UnsupportedOperationError, match="constant exponent"):
        x ** x
    m = mc.Module("K", output=mc.sum(mc.kron(x, x)), inputs=[x])
    with pytest.raises(mc.UnsupportedOperationError, match="no differential rule for operation 'Kron'"):
        mc.derive(m).jacobian("x")
    t = sp.Symbol("t")
    unknown = mc.elementwise("f", sp.Function("f")(t), t)
    with pytest.raises(mc.UnsupportedOperationError, match="no differential rule for elementwise function 'f'"):
        mc.derive(mc.Module("F", output=unknown(x), inputs=[x])).jacobian("x")


def test_non_smooth_second_derivative_states_the_convention():
    t = sp.Symbol("t")
    kink = mc.elementwise("myrelu", sp.Max(0, t), t)
    module = mc.Module("Kink", output=kink(x), inputs=[x])
    d = mc.derive(module)
    d.jacobian("x")  # the first derivative exists (a step)
    with pytest.raises(mc.DifferentiabilityError, match=r"not twice differentiable.*φ″ = 0.*relu′\(0\) = 0"):
        d.hbp("x")
    assert mc.derive(L.ReLU).second_order("x") == mc.simplify(0 * mc.identity("n"))  # relu″ = 0 a.e.
    assert mc.relu.derivative(1).numpy(np.array([-1.0, 0.0, 2.0])).tolist() == [0.0, 0.0, 1.0]


def test_bad_modules():
    y = mc.Vector("y", "n")
    with pytest.raises(mc.DeclarationError, match="'y' in the output is not labelled"):
        mc.Module("M", output=x + y, inputs=[x])
    with pytest.raises(mc.DeclarationError, match="labelled but unused"):
        mc.Module("M", output=x, inputs=[x], constants=[y])
    with pytest.raises(mc.McalcError, match="no input or parameter 'q'"):
        mc.derive(L.Linear).hbp("q")
    with pytest.raises(mc.McalcError, match="unknown curvature"):
        mc.derive(L.Linear).hbp("x", "newton")


def test_bad_values():
    d = mc.derive(L.Linear)
    good = {"x": np.ones(3), "W": np.ones((2, 3)), "b": np.ones(2)}
    with pytest.raises(mc.EvaluationError, match="NaN or Inf"):
        L.Linear.forward({**good, "x": np.array([1.0, np.nan, 0.0])})
    with pytest.raises(mc.EvaluationError, match="Hz: expected shape"):
        d.evaluate_hbp("W", good, dz=np.ones(2), Hz=np.eye(3))
    with pytest.raises(mc.EvaluationError, match="needs Hz"):
        d.evaluate_hbp("W", good, dz=np.ones(2), Hz=None)


def _cli(tmp_path, source: str, *args: str):
    path = tmp_path / "mod.py"
    path.write_text(textwrap.dedent(source))
    return subprocess.run([sys.executable, "-m", "mcalc.cli", *args, str(path)], capture_output=True, text=True)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("import mcalc as mc\nx = 1\n", "defines no mc.Module"),
        ("import mcalc as mc\nW = mc.Matrix('W', 'm', 'n')\nz = W @ W\n", "shape mismatch in matrix product"),
        ("import mcalc as mc\nx = mc.Vector('x', '2n')\n", "unknown dimension"),
        ("import mcalc as mc\nraise ValueError('boom')\n", "line 2: ValueError: boom"),
        (
            "import mcalc as mc, sympy as sp\nt = sp.Symbol('t')\nk = mc.elementwise('k', sp.Abs(t), t)\n"
            "x = mc.Vector('x', 'n')\nM = mc.Module('M', output=k(x), inputs=[x])\n",
            "not twice differentiable",
        ),
    ],
)
def test_cli_bad_input_exits_2_without_traceback(tmp_path, source, message):
    for command in ("derive", "verify"):
        result = _cli(tmp_path, source, command)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("mcalc: error:") and message in result.stderr
        assert "Traceback" not in result.stderr


def test_cli_missing_file():
    result = subprocess.run([sys.executable, "-m", "mcalc.cli", "derive", "/nonexistent.py"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "no such file" in result.stderr


def test_two_symbols_of_one_name_are_refused_whichever_comes_first():
    """The output's symbols are a set: the check must not depend on which of the two it meets first."""
    other = mc.Vector("x", "m")
    for output in (W @ x + other, other + W @ x, mc.sum(other) * (W @ x)):
        with pytest.raises(mc.DeclarationError, match=r"two different symbols are named 'x' \(a vector of size"):
            mc.Module("Twice", output=output, inputs=[x], params=[W])


def test_a_function_outside_its_domain_gets_a_hint():
    y = mc.Vector("y", "n")
    module = mc.Module("Log", output=mc.log(y), inputs=[y])
    from mcalc.numeric.verify import verify_module

    with pytest.raises(mc.EvaluationError, match=r"log is not finite there; if y must be positive, declare it so "
                                                 r"\(mc.Vector\('y', ..., positive=True\)\)"):
        verify_module(module)
    positive = mc.Vector("y", "n", positive=True)
    assert all(c.ok for c in verify_module(mc.Module("Log", output=mc.log(positive), inputs=[positive])))
