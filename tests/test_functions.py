"""Elementwise functions: SymPy derives φ′ and φ″; known ones come out in their textbook form."""
import os

import numpy as np
import pytest
import sympy as sp

import mcalc as mc


@pytest.mark.parametrize(
    ("function", "order", "expected"),
    [
        (mc.sigmoid, 1, "sigmoid*(1 - sigmoid)"),  # σ′ = σ(1 − σ)
        (mc.tanh, 1, "1 - tanh**2"),
        (mc.exp, 1, "exp"),
        (mc.exp, 2, "exp"),
    ],
)
def test_derivative_through_the_function_itself(function, order, expected):
    through = function.derivative(order).in_terms_of_base()
    s = sp.Symbol(function.name)
    assert sp.simplify(through - sp.sympify(expected, locals={function.name: s})) == 0


@pytest.mark.parametrize("function", [mc.sigmoid, mc.tanh, mc.softplus, mc.exp, mc.log, mc.sqrt])
def test_derivatives_match_finite_differences(function):
    t = np.linspace(0.3, 2.0, 7)
    h = 1e-5
    f, f1, f2 = (function.derivative(k).numpy for k in range(3))
    np.testing.assert_allclose(f1(t), (f(t + h) - f(t - h)) / (2 * h), rtol=1e-6)
    np.testing.assert_allclose(f2(t), (f1(t + h) - f1(t - h)) / (2 * h), rtol=1e-5)


def test_custom_function_from_sympy():
    t = sp.Symbol("t")
    cube = mc.elementwise("cube", t**3, t)
    assert cube.derivative(1).expr == 3 * cube.derivative(1).expr.free_symbols.pop() ** 2
    assert cube.derivative(2).display_name == "cube''"


def test_bad_function_declarations():
    t, u = sp.symbols("t u")
    with pytest.raises(mc.DeclarationError, match="depends on"):
        mc.elementwise("f", t * u, t)
    with pytest.raises(mc.DeclarationError, match="identifier"):
        mc.elementwise("not a name", t, t)


_t = sp.Symbol("t")
SPECIAL = [
    mc.elementwise("gelu", _t * (1 + sp.erf(_t / sp.sqrt(2))) / 2, _t),  # GELU, exact form (Hendrycks & Gimpel)
    mc.elementwise("erfc_gate", sp.erfc(_t) * _t, _t),
]


@pytest.mark.parametrize("function", SPECIAL, ids=lambda f: f.name)
def test_special_functions_verify_and_generate_for_every_backend(function, tmp_path, monkeypatch):
    """erf and erfc (SciPy's in NumPy code, cupyx's in CuPy code, the C library's in CUDA kernels): the rules
    against finite differences, the generated NumPy code and the CUDA kernels (emulated) against the oracle."""
    from mcalc.numeric.verify import verify_module
    from mcalc.numeric.verify_backend import verify_backend
    from mcalc.runtime import emulator

    monkeypatch.setenv("MCALC_CACHE", str(tmp_path))
    x, W = mc.Vector("x", "n"), mc.Matrix("W", "m", "n")
    module = mc.Module(f"{function.name}Linear", output=W @ function(x), inputs=[x], params=[W])
    for checks in (verify_module(module), verify_backend(module, "numpy")):
        assert checks and all(c.ok for c in checks) and not any(c.vacuous for c in checks), checks
    if not emulator.unavailable_reason():
        checks = verify_backend(module, "cupy-emulated")
        assert checks and all(c.ok for c in checks)


def test_dirac_terms_that_vanish_are_dropped_and_jumps_refused():
    """ELU (α = 1) written with steps is C¹: its derivatives' Dirac terms (t·δ(t), and δ(t) − e^t δ(−t) in
    φ″) vanish, and it verifies. With α = 2 its φ′ jumps at 0, and a Piecewise that jumps is refused too
    (its pieces' derivatives alone would hide the jump)."""
    from mcalc.numeric.verify import verify_module

    elu = mc.elementwise("elu", _t * sp.Heaviside(_t) + (sp.exp(_t) - 1) * sp.Heaviside(-_t), _t)
    assert not elu.derivative(2).expr.has(sp.DiracDelta)
    x = mc.Vector("x", "n")
    checks = verify_module(mc.Module("ELU", output=elu(x), inputs=[x]))
    assert checks and all(c.ok for c in checks)
    steeper = mc.elementwise("elu2", _t * sp.Heaviside(_t) + 2 * (sp.exp(_t) - 1) * sp.Heaviside(-_t), _t)
    steeper.derivative(1)
    with pytest.raises(mc.DifferentiabilityError, match=r"'elu2' is not twice differentiable.*jumps at t = 0"):
        steeper.derivative(2)
    jump = mc.elementwise("jump", sp.Piecewise((_t, _t < 0), (_t + 1, True)), _t)
    with pytest.raises(mc.DifferentiabilityError, match=r"'jump' is not differentiable.*jumps at t = 0"):
        jump.derivative(1)
    declared = mc.elementwise("step", sp.Piecewise((_t, _t < 0), (_t + 1, True)), _t, piecewise_linear=True)
    assert declared.derivative(1).expr == 1  # the value almost everywhere, as declared


def test_a_cold_derive_of_gelus_tanh_form_is_quick(tmp_path):
    """SymPy's simplify spent 200 s on GELU's φ′ (tanh form); held as a rational function of its
    applications, every rule derives in about a second, in a fresh process (the target: 10 s)."""
    import subprocess
    import sys
    import time

    source = tmp_path / "gelu.py"
    source.write_text(
        "import mcalc as mc, sympy as sp\nt = sp.Symbol('t')\n"
        "gelu = mc.elementwise('gelu', t / 2 * (1 + sp.tanh(sp.sqrt(2 / sp.pi) * (t + 0.044715 * t**3))), t)\n"
        "x, W = mc.Vector('x', 'n'), mc.Matrix('W', 'm', 'n')\n"
        "GELULinear = mc.Module('GELULinear', output=W @ gelu(x), inputs=[x], params=[W])\n")
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "mcalc.cli", "derive", str(source)], capture_output=True, text=True,
                         env={**os.environ, "MCALC_CACHE": str(tmp_path / "cache")})  # cold: nothing kept on disk
    assert run.returncode == 0, run.stderr
    assert time.perf_counter() - start < 10 and "gelu''" in run.stdout


def test_simplified_derivatives_are_kept_on_disk(tmp_path, monkeypatch):
    """A derivative simplified once is read back by the next call (another process would find the same
    file), without SymPy simplifying again; an unreadable file is simplified and written anew, and a
    function of the user's own class, which a file could not name again, is never kept."""
    from mcalc.functions import _simplify

    monkeypatch.setenv("MCALC_CACHE", str(tmp_path))
    gelu = _t / 2 * (1 + sp.tanh(sp.sqrt(2 / sp.pi) * (_t + sp.Rational(44715, 1000000) * _t**3)))
    derivative = sp.diff(gelu, _t, 2)
    first = _simplify(derivative)
    kept = list((tmp_path / "simplified").iterdir())
    assert len(kept) == 1 and first != derivative

    def refuse(*args, **kwargs):
        raise AssertionError("simplified again")

    with monkeypatch.context() as m:
        m.setattr(sp, "simplify", refuse)
        assert _simplify(derivative) == first
        kept[0].write_text("Mul(Integer(2), ")  # unreadable
        with pytest.raises(AssertionError, match="simplified again"):
            _simplify(derivative)
    assert _simplify(derivative) == first and sp.sympify(kept[0].read_text()) == first

    class Own(sp.Function):
        pass

    _simplify(sp.diff(Own(_t) * sp.exp(_t) ** 2, _t))
    assert len(list((tmp_path / "simplified").iterdir())) == 1


def test_a_step_at_its_kink_is_half_unless_the_function_is_piecewise_linear(tmp_path):
    """ELU (α = 1) is C¹: φ′(0) = 1, from H(t) + eᵗ H(−t) with H(0) = ½, in the oracle's NumPy, the generated
    NumPy code and the CUDA device function; relu′(0) stays 0 (declared piecewise-linear: PyTorch's)."""
    from mcalc.codegen.cuda import device_function
    from mcalc.codegen.generate import generate
    from mcalc.codegen.store import load_code

    elu = mc.elementwise("elu", _t * sp.Heaviside(_t) + (sp.exp(_t) - 1) * sp.Heaviside(-_t), _t)
    assert elu.derivative(1).numpy(np.array([0.0, 1e-9, -1e-9])) == pytest.approx([1.0, 1.0, 1.0])
    assert mc.relu.derivative(1).numpy(np.array([0.0]))[0] == 0.0
    x = mc.Vector("x", "n")
    module = mc.Module("ELU", output=elu(x), inputs=[x])
    generate([module], ["numpy"], tmp_path)
    code = load_code(module, "numpy", tmp_path)
    assert code._fn_elu_1(np.array([0.0]))[0] == 1.0
    assert "(t == 0) ? ( 1.0/2.0 )" in device_function(elu.derivative(1), "double")
    assert "== 0" not in device_function(mc.relu.derivative(1), "double")
