"""The generated NumPy backend agrees with the symbolic batch rules for every module, curvature and approximation."""
import numpy as np
import pytest
import sympy as sp
from conftest import ROOT
from hypothesis import HealthCheck, Phase, given, settings
from strategies import modules
from test_batch import _batch

import mcalc as mc
from mcalc import layers as L
from mcalc.codegen.batch import batch_forward, batch_gradient, batch_gradient_tangent, batch_hbp, batch_jvp
from mcalc.codegen.generate import generate
from mcalc.codegen.store import load_code
from mcalc.expr import tangent
from mcalc.numeric.evaluate import Evaluator, as_matrix
from mcalc.user_modules import load_modules

EXAMPLES = load_modules(ROOT / "examples" / "custom_layers.py")
MODULES = list(L.LIBRARY) + EXAMPLES


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    directory = tmp_path_factory.mktemp("generated")
    generate(MODULES, ["numpy"], directory)
    return directory


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.name)
def test_numpy_backend_matches_symbolic_batch_rules(module, generated):
    check_generated(module, load_code(module, "numpy", generated))


def check_generated(module, code):
    """Every function of generated NumPy code against the symbolic batch rules, evaluated densely."""
    d = mc.derive(module)
    samples, shared, batch = _batch(module, 5, seed=3)
    rng = np.random.default_rng(3)
    size = np.size(module.forward(samples[0]))
    dZ = rng.normal(size=(5, size)) / 5
    a = rng.normal(size=(size, size))
    Hz = a @ a.T / size
    ev = Evaluator.for_batch(module, shared, batch, dZ=dZ, Hz=Hz)
    S = {name: batch_argument(value) for name, value in batch.items()}
    shared = {name: as_matrix(value, module.symbol(name), name) for name, value in shared.items()}
    if S:  # a module of parameters alone has no batch to run forward over
        np.testing.assert_allclose(side_by_side(code.forward(shared, S)["Z"]), ev.value(batch_forward(d)),
                                   atol=1e-12)
    rows, cols = (ev.dim(n) for n in module.output.shape)
    S["dz"] = batch_argument(dZ.reshape(5, cols, rows).transpose(0, 2, 1))  # each row vec(δzᵢ)
    grads = code.gradients(shared, S)
    for v in module.variables:
        np.testing.assert_allclose(side_by_side(grads[v.name]), ev.value(batch_gradient(d, v.name)), atol=1e-12)
    adjoints = code.gradients(shared, S, params=False)  # the inputs' alone (an adjoint pass)
    assert set(adjoints) == {v.name for v in module.inputs} or not module.params
    for v in module.inputs:
        np.testing.assert_allclose(adjoints[v.name], grads[v.name], atol=1e-14)
    check_generated_tangents(module, code, d, ev, shared, S, rng)
    for (curvature, approximation), function in code.HBP.items():
        blocks = function(shared, S, Hz)
        for v in module.variables:
            expected = ev.value(batch_hbp(d, v.name, curvature, approximation))
            got = blocks[v.name]
            np.testing.assert_allclose(got.to_dense(), expected, atol=1e-10,
                                       err_msg=f"{v.name} {curvature} ({approximation})")
            probe = rng.normal(size=expected.shape[0])
            np.testing.assert_allclose(got.matvec(probe), expected @ probe, atol=1e-10)
    check_one_cache_per_batch(module, code, shared, S, Hz, rng)


def check_one_cache_per_batch(module, code, P, S, Hz, rng):
    """A backward pass whose functions share one cache (forward, gradients, every HBP mode, then the
    gradients again with another δZ, as a Gauss–Newton product does) equals the calls without one, and
    leaves its arguments as they were (a step writes only into arrays of its function's own making)."""
    arguments = {name: value.copy() for name, value in [*P.items(), *S.items(), ("Hz", Hz)]}
    cache = {}
    if len(S) > 1:
        np.testing.assert_allclose(code.forward(P, S, cache)["Z"], code.forward(P, S)["Z"], atol=1e-14)
    for name, value in code.gradients(P, S, cache=cache).items():
        np.testing.assert_allclose(value, code.gradients(P, S)[name], atol=1e-14)
    for mode, function in code.HBP.items():
        shared, fresh = function(P, S, Hz, cache=cache), function(P, S, Hz)
        for name in fresh:
            np.testing.assert_allclose(shared[name].to_dense(), fresh[name].to_dense(), atol=1e-13, err_msg=str(mode))
    other = dict(S, dz=rng.normal(size=S["dz"].shape))
    for name, value in code.gradients(P, other, cache=cache).items():
        np.testing.assert_allclose(value, code.gradients(P, other)[name], atol=1e-14)
    for name, value in [*P.items(), *S.items(), ("Hz", Hz)]:
        np.testing.assert_array_equal(value, arguments[name], err_msg=f"{module.name} changed its argument {name}")


def test_a_sum_is_computed_into_an_array_no_other_step_reads(tmp_path, monkeypatch):
    """The residual block's input block, 𝓗z + M + Mᵀ, is one fresh array that the last term is added
    into, and a scaled product is scaled where the product was made: no temporary per operator. Its
    gradients and blocks are those of the code printed without writing in place, to the last bit."""
    from mcalc.codegen.numpy_printer import ArrayPrinter

    (residual,) = [m for m in load_modules(ROOT / "examples" / "layernorm_gelu.py") if m.name == "Residual"]
    generate([residual], ["numpy"], tmp_path / "in_place")
    source = (tmp_path / "in_place" / "numpy" / "Residual.py").read_text()
    assert "= _add_into(Hz + t" in source and "= _multiply_into(t" in source
    monkeypatch.setattr(ArrayPrinter, "writes_in_place", False)
    generate([residual], ["numpy"], tmp_path / "plain")
    assert "_add_into(" not in (tmp_path / "plain" / "numpy" / "Residual.py").read_text()
    in_place, plain = (load_code(residual, "numpy", tmp_path / d) for d in ("in_place", "plain"))
    rng = np.random.default_rng(5)
    P = {"W1": rng.normal(size=(4, 3)), "b1": rng.normal(size=(4, 1)), "W2": rng.normal(size=(3, 4))}
    a = rng.normal(size=(3, 3))
    S, Hz = {"x": rng.normal(size=(3, 6)), "dz": rng.normal(size=(3, 6))}, a @ a.T
    pairs = [(in_place.gradients(P, S), plain.gradients(P, S)),
             *[(in_place.HBP[mode](P, S, Hz), plain.HBP[mode](P, S, Hz)) for mode in in_place.HBP]]
    for ours, theirs in pairs:
        for name, value in theirs.items():
            dense = value.to_dense() if hasattr(value, "to_dense") else value
            np.testing.assert_array_equal(ours[name].to_dense() if hasattr(value, "to_dense") else ours[name], dense,
                                          err_msg=name)


@pytest.mark.parametrize("helper, operator", [("add_into", np.add), ("multiply_into", np.multiply)])
def test_a_sum_written_in_place_has_the_memory_order_numpy_gives_it(helper, operator):
    """A column-major array (a product with one-hot labels, say) plus a row-major one is row-major in
    NumPy: written into, it would stay column-major, and a later sum over its rows would add in another
    order. So the helpers write in place only where NumPy keeps the written array's order."""
    from mcalc.runtime import array_ops

    rng = np.random.default_rng(0)
    C = rng.normal(size=(5, 7))
    F, row, column = np.asfortranarray(rng.normal(size=(5, 7))), rng.normal(size=(1, 7)), rng.normal(size=(5, 1))
    for out, others in [(F, [C]), (C, [F]), (F, [F, row]), (F, [column, C]), (F, [2.5])]:
        expected = out
        for other in others:
            expected = operator(expected, other)
        got = getattr(array_ops, helper)(out.copy(order="K"), *others)
        np.testing.assert_array_equal(got, expected)
        assert (got.flags.c_contiguous, got.flags.f_contiguous) == (expected.flags.c_contiguous,
                                                                    expected.flags.f_contiguous)


def test_a_backward_pass_computes_an_activations_derivative_once(generated):
    """Forward, gradients and curvature share what they have in common through one cache: σ′(x) is
    evaluated by the gradients and read by the curvature; without a cache, each computes it."""
    code = load_code(L.Sigmoid, "numpy", generated)
    calls = []
    derivative = code._fn_sigmoid_1
    code._fn_sigmoid_1 = lambda t, *cache: calls.append(1) or derivative(t, *cache)
    try:
        X, dZ = np.random.default_rng(0).normal(size=(2, 4, 6))
        S, cache = {"x": X, "dz": dZ}, {}
        code.forward({}, S, cache)
        code.gradients({}, S, cache=cache)
        code.HBP[("ggn", "6")]({}, S, np.eye(4), cache=cache)
        assert len(calls) == 1
        code.gradients({}, S)
        code.HBP[("ggn", "6")]({}, S, np.eye(4))
        assert len(calls) == 3
    finally:
        code._fn_sigmoid_1 = derivative


def test_an_elementwise_functions_orders_compute_their_shared_part_once(tmp_path):
    """GELU's φ and φ′ both read erf(t/√2), and φ′ and φ″ exp(−t²/2) (numpy_printer.shared_parts): with
    one cache, a forward pass and the gradients evaluate erf once, and give what they give without one."""
    from mcalc.runtime import array_ops

    t = sp.Symbol("t")
    gelu = mc.elementwise("gelu", t * (1 + sp.erf(t / sp.sqrt(2))) / 2, t)
    x = mc.Vector("x", "n")
    module = mc.Module("GELU", output=gelu(x), inputs=[x])
    generate([module], ["numpy"], tmp_path)
    code = load_code(module, "numpy", tmp_path)
    erf_calls = []

    class Counting:
        @staticmethod
        def erf(a):
            erf_calls.append(1)
            return array_ops.special(a).erf(a)

    code._special = lambda a: Counting
    X, dZ = np.random.default_rng(0).normal(size=(2, 4, 6))
    S, cache = {"x": X, "dz": dZ}, {}
    Z = code.forward({}, S, cache)["Z"]
    dX = code.gradients({}, S, cache=cache)["x"]
    assert len(erf_calls) == 1
    np.testing.assert_allclose(Z, code.forward({}, S)["Z"], rtol=1e-15)
    np.testing.assert_allclose(dX, code.gradients({}, S)["x"], rtol=1e-15)
    assert len(erf_calls) == 3
    phi = X * (1 + np.vectorize(__import__("math").erf)(X / np.sqrt(2))) / 2
    np.testing.assert_allclose(Z, phi, rtol=1e-12)
    other = X + 1  # another argument: computed afresh, and the cache keeps one entry per part
    code.forward({}, {"x": other}, cache)
    assert len(erf_calls) == 4 and sum(isinstance(k, tuple) for k in cache) == 2  # erf and exp(−t²/2)


def test_an_elementwise_functions_constants_are_one_float(tmp_path):
    """GELU's φ′ = Φ(t) + t·exp(−t²/2)/√(2π) multiplies t by 1/√(2π), one number, not by √2, ½ and 1/√π
    in turn (numpy_printer._folded_constants): one array operation, and a float32 batch stays float32
    (numpy.sqrt(2), a float64 scalar, promoted it)."""
    from mcalc.codegen.numpy_printer import function_source

    t = sp.Symbol("t")
    gelu = mc.elementwise("gelu", t * (1 + sp.erf(t / sp.sqrt(2))) / 2, t)
    source = function_source(gelu.derivative(1))
    assert "0.398942280401432677" in source and "xp.pi" not in source and "xp.sqrt" not in source
    x = mc.Vector("x", "n")
    module = mc.Module("GELU", output=gelu(x), inputs=[x])
    generate([module], ["numpy"], tmp_path)
    code = load_code(module, "numpy", tmp_path)
    X = np.random.default_rng(1).normal(size=(4, 6))
    dX = code.gradients({}, {"x": X, "dz": np.ones_like(X)})["x"]
    density = np.exp(-X ** 2 / 2) / np.sqrt(2 * np.pi)
    np.testing.assert_allclose(dX, (1 + np.vectorize(__import__("math").erf)(X / np.sqrt(2))) / 2 + X * density,
                               rtol=1e-14)
    single = code.gradients({}, {"x": X.astype(np.float32), "dz": np.ones_like(X, dtype=np.float32)})["x"]
    assert single.dtype == np.float32
    np.testing.assert_allclose(single, dX, rtol=1e-5)


def test_a_bias_is_broadcast_by_the_array_module_not_by_a_view(generated):
    """W x + b 1ᵀ prints as W x + b, b added into W x's fresh array: NumPy broadcasts b, with no broadcast
    view made and no strided read (.numpy_printer.ArrayPrinter.elementwise_operands), and the step that
    made the view is gone."""
    import inspect

    code = load_code(L.Linear, "numpy", generated)
    source = inspect.getsource(code.forward)
    assert "broadcast_to" not in source and "t2 = _add_into(t0, P['b'])" in source


def test_a_constant_beside_a_batch_is_a_number(tmp_path):
    """LayerNorm's mean((x − x̄)²) + ε: the batch form adds ε 1ᵀ, which prints as the number ε beside the row
    of variances (.numpy_printer.ArrayPrinter.elementwise_operands), never an array of ones made, scaled
    and read; and the module computes LayerNorm's output, in float32 too."""
    import inspect

    x = mc.Vector("x", "n")
    centred = x - mc.mean(x) * mc.ones("n")
    module = mc.Module("Normalise", output=centred / mc.sqrt(mc.mean(centred * centred) + sp.Rational(1, 1000)),
                       inputs=[x])
    generate([module], ["numpy"], tmp_path)
    code = load_code(module, "numpy", tmp_path)
    source = inspect.getsource(code.forward)
    assert "xp.ones" not in source and "+ (1/1000)" in source
    X = np.random.default_rng(2).normal(size=(5, 7))
    expected = (X - X.mean(axis=0)) / np.sqrt(X.var(axis=0) + 1e-3)
    np.testing.assert_allclose(code.forward({}, {"x": X})["Z"], expected, rtol=1e-13)
    single = code.forward({}, {"x": X.astype(np.float32)})["Z"]
    assert single.dtype == np.float32
    np.testing.assert_allclose(single, expected, rtol=1e-5)


def batch_argument(samples):
    """A batch (B, rows) or (B, rows, cols) as generated code takes it: (rows, B) or (rows, B, cols)."""
    return samples.T if samples.ndim == 2 else samples.transpose(1, 0, 2) if samples.shape[2] > 1 \
        else samples[:, :, 0].T


def side_by_side(batch):
    """What generated code returns for a batch, as the symbolic batch rules lay it out."""
    return batch.reshape(batch.shape[0], -1)


def check_generated_tangents(module, code, d, ev, P, S, rng):
    """The generated jvp and rgradients (all variables moving, then the parameters alone) against the
    symbolic batch rules, evaluated densely with the same tangents."""
    V = {v.name: rng.normal(size=S[v.name].shape if v in module.inputs else P[v.name].shape)
         for v in module.variables}
    V["dz"] = rng.normal(size=S["dz"].shape)
    for v in module.inputs:
        ev.stacked[tangent(v).kind] = side_by_side(V[v.name])
    for v in module.params:
        ev.seeds[tangent(v).kind] = V[v.name]
    ev.stacked[d.Rdz.kind] = side_by_side(V["dz"])
    for with_inputs in (True, False):
        if not with_inputs and not module.params:
            with pytest.raises(ValueError, match="no parameters"):
                code.jvp(P, S, V, inputs=False)
            continue
        moving = {n: a for n, a in V.items() if with_inputs or n not in {v.name for v in module.inputs}}
        np.testing.assert_allclose(side_by_side(code.jvp(P, S, moving, inputs=with_inputs)["Z"]),
                                   ev.value(batch_jvp(d, with_inputs)), atol=1e-12)
        got = code.rgradients(P, S, moving, inputs=with_inputs)
        for v in module.variables if with_inputs else module.params:
            np.testing.assert_allclose(side_by_side(got[v.name]),
                                       ev.value(batch_gradient_tangent(d, v.name, with_inputs)),
                                       atol=1e-12, err_msg=f"R{{δ{v.name}}}")
        # A cache shared by calls on the same batch: the second call, with other directions, reuses
        # the loop invariants and still equals an uncached call.
        cache, other = {}, {n: rng.normal(size=a.shape) for n, a in moving.items()}
        for f in (code.jvp, code.rgradients):
            f(P, S, moving, inputs=with_inputs, cache=cache)
            reused, fresh = f(P, S, other, inputs=with_inputs, cache=cache), f(P, S, other, inputs=with_inputs)
            for name in fresh:
                np.testing.assert_allclose(reused[name], fresh[name], atol=1e-13)
        other_dz = dict(S, dz=rng.normal(size=S["dz"].shape))
        code.gradients(P, S, inputs=with_inputs, cache=cache)
        reused = code.gradients(P, other_dz, inputs=with_inputs, cache=cache)
        fresh = code.gradients(P, other_dz, inputs=with_inputs)
        for name in fresh:
            np.testing.assert_allclose(reused[name], fresh[name], atol=1e-13)


def test_kronecker_blocks_stay_factored(generated):
    code = load_code(L.Linear, "numpy", generated)
    rng = np.random.default_rng(0)
    W, b = rng.normal(size=(4, 6)), rng.normal(size=(4, 1))
    X = rng.normal(size=(6, 10))
    block = code.HBP[("exact", "6")]({"W": W, "b": b}, {"x": X}, np.eye(4))["W"]
    (A, B), = block.kron
    assert block.dense is None and A.shape == (6, 6) and B.shape == (4, 4)  # E[x xᵀ] and 𝓗z, never 24 × 24
    np.testing.assert_allclose(np.kron(A, B), np.kron(X @ X.T / 10, np.eye(4)))
    assert np.array_equal(B, np.eye(4))  # the 1/B rode on the Gram product (cuBLAS's alpha), 𝓗z is untouched
    np.testing.assert_allclose(A, X @ X.T / 10)


def test_wide_batch_factors_stay_implicit(generated):
    """E[x xᵀ] for rows > B is applied through X (the cost model), and still equals X Xᵀ / B."""
    from mcalc.runtime.blocks import GramFactor

    code = load_code(L.Linear, "numpy", generated)
    rng = np.random.default_rng(1)
    W, b, X = rng.normal(size=(3, 8)), rng.normal(size=(3, 1)), rng.normal(size=(8, 5))
    block = code.HBP[("ggn", "6")]({"W": W, "b": b}, {"x": X}, np.eye(3))["W"]
    ((A, _),) = block.kron
    assert isinstance(A, GramFactor)
    np.testing.assert_allclose(block.to_dense(), np.kron(X @ X.T / 5, np.eye(3)))
    v = rng.normal(size=24)
    np.testing.assert_allclose(block.matvec(v), np.kron(X @ X.T / 5, np.eye(3)) @ v)


@pytest.mark.parametrize("curvature", ["exact", "pch-abs"])
def test_row_wise_splitting_keeps_the_diagonal_sub_blocks(generated, curvature):
    """Section 4: splitting W's rows into groups keeps exactly the matching diagonal sub-blocks."""
    code = load_code(L.SigmoidLinear, "numpy", generated)
    rng = np.random.default_rng(2)
    W, b, X = rng.normal(size=(6, 4)), rng.normal(size=(6, 1)), rng.normal(size=(4, 9))
    S = {"x": X, "dz": rng.normal(size=(6, 9)) / 9}
    a = rng.normal(size=(6, 6))
    blocks = code.HBP[(curvature, "6")]({"W": W, "b": b}, S, a @ a.T)
    for name, rows in (("W", 6), ("b", 6), ("x", 4)):
        full = blocks[name].to_dense()
        parts = blocks[name].split_rows(rows, 3)
        cols = full.shape[0] // rows
        for part, block in zip(np.array_split(np.arange(rows), 3), parts):
            index = (part[:, None] + rows * np.arange(cols)[None, :]).reshape(-1, order="F")
            np.testing.assert_allclose(block.to_dense(), full[np.ix_(index, index)], atol=1e-12)


def test_a_loss_starts_hbp_with_its_own_hessian(generated):
    """LOSS_HESSIAN: where HBP starts, nothing from above. For cross-entropy with the batch mean
    (δz = 1/B) it is E[diag(p) − p pᵀ], p = softmax(x), by (6) and by (7) alike: (7) averages the
    Jacobians, but a module's own second-order term is Σᵢ of its Hessians times δzᵢ = 1/B.
    For the squared error (y − x)ᵀ(y − x) it is 2 I; and it is HBP's block for 𝓗z = 0."""
    rng = np.random.default_rng(3)
    X, B = rng.normal(size=(4, 7)) * 3, 7
    Y = np.eye(4)[:, rng.integers(0, 4, B)]
    S = {"x": X, "y": Y, "dz": np.full((1, B), 1 / B)}
    P = np.exp(X - X.max(axis=0)) / np.exp(X - X.max(axis=0)).sum(axis=0)
    hessian = sum(np.diag(p) - np.outer(p, p) for p in P.T) / B
    ce, mse = load_code(L.CrossEntropy, "numpy", generated), load_code(L.MSE, "numpy", generated)
    for approximation in ("6", "7"):
        start = ce.LOSS_HESSIAN[approximation]({}, S)["x"].to_dense()
        np.testing.assert_allclose(start, hessian, atol=1e-14)
        np.testing.assert_allclose(start, ce.HBP[("exact", approximation)]({}, S, np.zeros((1, 1)))["x"].to_dense(),
                                   atol=1e-14)
        np.testing.assert_allclose(mse.LOSS_HESSIAN[approximation]({}, S)["x"].to_dense(), 2 * np.eye(4), atol=1e-14)
    assert load_code(L.Linear, "numpy", generated).LOSS_HESSIAN == {}  # not a loss: 𝓗z always arrives from above


def test_a_scalar_output_module_has_sized_blocks_even_where_they_are_zero(tmp_path):
    """xᵀ A x starts HBP (one output per sample): its own Hessian in x is (A + Aᵀ) per sample, in A zero,
    and the zero block has a size (it used to be empty, and to_dense failed)."""
    x, A = mc.Vector("x", "n"), mc.Matrix("A", "n", "n")
    quadratic = mc.Module("Quadratic", output=x.T @ A @ x, inputs=[x], params=[A])
    generate([quadratic], ["numpy"], tmp_path)
    code = load_code(quadratic, "numpy", tmp_path)
    rng = np.random.default_rng(0)
    a, B = rng.normal(size=(3, 3)), 5
    blocks = code.LOSS_HESSIAN["6"]({"A": a}, {"x": rng.normal(size=(3, B)), "dz": np.full((1, B), 1 / B)})
    np.testing.assert_allclose(blocks["x"].to_dense(), a + a.T, atol=1e-14)
    assert blocks["A"].to_dense().shape == (9, 9) and not blocks["A"].to_dense().any()
    assert blocks["A"].matvec(np.ones(9)).shape == (9,)


@pytest.mark.parametrize("kinds", ["gram-gram", "gram-dense", "dense-gram", "dense-dense"])
def test_a_kronecker_scale_goes_into_a_factor_that_can_take_it(kinds):
    """(s A) ⊗ B or A ⊗ (s B): an implicit GramFactor cannot be scaled, so with two of them (found by Hypothesis on a
    random module: 'Gram' * float) the smaller is formed first."""
    from mcalc.runtime.array_ops import kron
    from mcalc.runtime.blocks import GramFactor, dense_factor

    rng = np.random.default_rng(0)
    make = {"gram": lambda n: GramFactor(rng.normal(size=(n, 2))), "dense": lambda n: rng.normal(size=(n, n))}
    first, second = kinds.split("-")
    a, b = make[first](3), make[second](4)
    scaled = kron(-2.5, a, b)
    expected = -2.5 * np.kron(dense_factor(a), dense_factor(b))
    np.testing.assert_allclose(np.kron(dense_factor(scaled[0]), dense_factor(scaled[1])), expected, atol=1e-12)


def test_a_residual_blocks_inner_parameters_get_the_documented_batch_mean(tmp_path):
    """z = x + W₂ tanh(W₁ x + b₁): the blocks of its inner parameters are means over the batch of
    per-sample Kronecker products, which have no closed batch form and run as one batched array program.
    Against torch autograd, sample by sample: (6) is (1/B) Σᵢ Jᵢᵀ 𝓗z Jᵢ + Σᵢ Σₖ Hzₖ(xᵢ) δzᵢₖ (δZ carries 1/B),
    exact for B = 1."""
    import torch_reference

    x, W1, b1, W2 = mc.Vector("x", "n"), mc.Matrix("W1", "h", "n"), mc.Vector("b1", "h"), mc.Matrix("W2", "n", "h")
    residual = mc.Module("Residual", output=x + W2 @ mc.tanh(W1 @ x + b1), inputs=[x], params=[W1, b1, W2])
    generate([residual], ["numpy"], tmp_path)
    code = load_code(residual, "numpy", tmp_path)
    assert "for i in range" not in (tmp_path / "numpy" / "Residual.py").read_text()
    rng = np.random.default_rng(7)
    n, h = 3, 4
    P = {"W1": rng.normal(size=(h, n)), "b1": rng.normal(size=(h, 1)), "W2": rng.normal(size=(n, h))}
    a = rng.normal(size=(n, n))
    Hz = a @ a.T
    for B in (1, 5):
        X, dZ = rng.normal(size=(n, B)), rng.normal(size=(n, B)) / B
        blocks = code.HBP[("exact", "6")](P, {"x": X, "dz": dZ}, Hz)
        for name in ("W1", "b1", "W2", "x"):
            reference = 0
            for i in range(B):
                values = {**{k: v.reshape(-1) if k == "b1" else v for k, v in P.items()}, "x": X[:, i]}
                dense = torch_reference.dense_rules(residual, name, values, dZ[:, i], Hz)
                reference = reference + dense["ggn"] / B + dense["second-order"]
            assert np.abs(reference).max() > 1e-3
            np.testing.assert_allclose(blocks[name].to_dense(), reference, rtol=1e-9, atol=1e-11, err_msg=name)


def test_the_kronecker_factored_approximation_is_k_facs_factorisation(tmp_path):
    """(6-kfac): GatedLinear's W block, (1/B) Σᵢ (xᵢ xᵢᵀ) ⊗ (Dᵢ 𝓗z Dᵢ) with Dᵢ = diag σ(V xᵢ + c) under (6),
    becomes E[x xᵀ] ⊗ E[D 𝓗z D], two factors (K-FAC's assumption); for one sample it is (6) itself."""
    (gated,) = [m for m in EXAMPLES if m.name == "GatedLinear"]
    generate([gated], ["numpy"], tmp_path)
    code = load_code(gated, "numpy", tmp_path)
    rng = np.random.default_rng(4)
    n, m = 3, 2
    P = {"W": rng.normal(size=(m, n)), "V": rng.normal(size=(m, n)), "b": rng.normal(size=(m, 1)),
         "c": rng.normal(size=(m, 1))}
    a = rng.normal(size=(m, m))
    Hz = a @ a.T
    for B in (1, 4):
        X, dZ = rng.normal(size=(n, B)), rng.normal(size=(m, B)) / B
        S = {"x": X, "dz": dZ}
        factored = code.HBP[("ggn", "6-kfac")](P, S, Hz)
        exact = code.HBP[("ggn", "6")](P, S, Hz)
        gates = 1 / (1 + np.exp(-(P["V"] @ X + P["c"])))
        expected = np.kron(X @ X.T / B, sum(np.diag(g) @ Hz @ np.diag(g) for g in gates.T) / B)
        assert len(factored["W"].kron) == 1 and factored["W"].dense is None  # two factors, never formed
        np.testing.assert_allclose(factored["W"].to_dense(), expected, rtol=1e-12)
        if B == 1:
            for name in ("W", "V", "b", "c", "x"):
                np.testing.assert_allclose(factored[name].to_dense(), exact[name].to_dense(), rtol=1e-12)
        else:
            assert not np.allclose(factored["W"].to_dense(), exact["W"].to_dense())  # an approximation


def test_an_exact_block_too_large_to_form_is_refused_with_a_hint(tmp_path, monkeypatch):
    """The exact (6) block of a residual block's W₁, E[xᵢxᵢᵀ ⊗ Mᵢ], is one product over the samples
    (runtime kron_mean), the per-sample Kronecker products never formed; a block past the limit is refused
    with the factored approximation named, before it is allocated (here with the limit lowered)."""
    from mcalc.runtime import array_ops

    (residual,) = [m for m in load_modules(ROOT / "examples" / "layernorm_gelu.py") if m.name == "Residual"]
    generate([residual], ["numpy"], tmp_path)
    code = load_code(residual, "numpy", tmp_path)
    rng = np.random.default_rng(0)
    P = {"W1": rng.normal(size=(4, 3)), "b1": rng.normal(size=(4, 1)), "W2": rng.normal(size=(3, 4))}
    S, Hz = {"x": rng.normal(size=(3, 8)), "dz": rng.normal(size=(3, 8))}, np.eye(3)
    code.HBP[("exact", "6")](P, S, Hz)  # within the limit
    monkeypatch.setattr(array_ops, "STACK_LIMIT_BYTES", 1000)
    with pytest.raises(mc.McalcError, match=r"block of 12 × 12 would be.*--approximation 6-kfac"):
        code.HBP[("exact", "6")](P, S, Hz)
    code.HBP[("exact", "6-kfac")](P, S, Hz)  # the factored blocks stay two factors


def test_a_convolutions_exact_block_too_large_to_compute_is_refused_with_a_hint(monkeypatch):
    """A convolution's (6) weight block E[(Uᵢ ⊗ I) 𝓗z (Uᵢᵀ ⊗ I)] is one contraction with the samples' index
    summed inside it (runtime chain_mean, never a stack of per-sample blocks): where an array it makes
    passes the limit (here lowered) it is refused, before it is made, with the factored approximation named."""
    from mcalc.runtime import array_ops
    from mcalc.train.network import Network

    net = Network("1x12-conv(4,3,pad=1)-relu-flatten-3", seed=0)
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(12, 8)), np.eye(3)[:, rng.integers(0, 3, 8)]
    net.backward(X, Y, "ggn", "6")  # within the limit
    monkeypatch.setattr(array_ops, "STACK_LIMIT_BYTES", 1000)
    with pytest.raises(mc.McalcError, match=r"an array of [\d,]+ values.*--approximation 6-kfac"):
        net.backward(X, Y, "ggn", "6")


@settings(max_examples=25, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(module=modules())
def test_random_modules_generate_code_that_matches_their_batch_rules(module, tmp_path_factory):
    """Random modules (strategies.modules) through code generation: every generated function against the
    symbolic batch rules, one cache shared as a backward pass shares it, and no argument written to."""
    directory = tmp_path_factory.mktemp("random")
    try:
        generate([module], ["numpy"], directory)
    except mc.McalcError as exc:  # a per-sample inverse, say, has no batch form
        assert "no batch form" in str(exc)
        return
    check_generated(module, load_code(module, "numpy", directory))
