"""Per-sample matrix inputs and outputs (d × T) through the whole compiler: batch rules, generated code on
NumPy and on the CUDA emulator, against per-sample averages and finite differences."""
import numpy as np
import pytest
from conftest import ROOT
from test_batch import check_batch_rules
from test_codegen_numpy import check_generated

from mcalc.codegen.generate import generate
from mcalc.codegen.store import code_path, load_code
from mcalc.numeric.verify_backend import verify_backend
from mcalc.runtime import array_ops, emulator
from mcalc.user_modules import load_modules

MODULES = load_modules(ROOT / "examples" / "per_sample_matrices.py")
BY_NAME = {m.name: m for m in MODULES}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    directory = tmp_path_factory.mktemp("generated")
    generate(MODULES, ["numpy"], directory)
    return directory


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.name)
def test_batch_rules_equal_per_sample_averages(module):
    check_batch_rules(module)


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.name)
def test_generated_code_matches_the_batch_rules(module, generated):
    check_generated(module, load_code(module, "numpy", generated))


@pytest.mark.parametrize("backend", ["numpy", "cupy-emulated"])
def test_generated_code_matches_finite_differences(backend, tmp_path, monkeypatch):
    if backend == "cupy-emulated" and emulator.unavailable_reason():
        pytest.skip(emulator.unavailable_reason())
    monkeypatch.setenv("MCALC_CACHE", str(tmp_path))
    for module in (BY_NAME["PositionwiseLinear"], BY_NAME["Flatten"], BY_NAME["Conv1d"], BY_NAME["Conv2d"]):
        checks = verify_backend(module, backend)
        assert checks and all(c.ok for c in checks), [c for c in checks if not c.ok]
        assert sum(c.error > 0 for c in checks) > len(checks) // 2  # real comparisons, not zeros with zeros


def test_shared_weights_are_applied_without_forming_kronecker_products(generated):
    """(I_T ⊗ Wᵀ) 𝓗z (I_T ⊗ W), the input's block of a position-wise Linear layer, is applied to 𝓗z by
    reshapes and products (T·m·d work per entry), never formed as a (T·m × T·d) matrix, and a convolution's
    Pᵀ (…) P by fold and unfold, never formed either; no function loops over the batch."""
    for name, helper in (("PositionwiseLinear", "_kron_matmul("), ("Conv1d", "_fold_rows(")):
        source = code_path(BY_NAME[name], "numpy", generated).read_text()
        assert "xp.kron(" not in source and helper in source and "for i in range" not in source


def test_kronecker_products_applied_by_reshapes_equal_the_dense_ones():
    rng = np.random.default_rng(0)
    A, B = rng.normal(size=(3, 4)), rng.normal(size=(5, 2))
    for a, b in [(A, B), (None, B), (A, None)]:
        dense = np.kron(np.eye(4) if a is None else a, np.eye(2) if b is None else b)
        M, N = rng.normal(size=(dense.shape[1], 7)), rng.normal(size=(7, dense.shape[0]))
        np.testing.assert_allclose(array_ops.kron_matmul(a, b, M), dense @ M, rtol=1e-12)
        np.testing.assert_allclose(array_ops.matmul_kron(N, a, b), N @ dense, rtol=1e-12)
    stack = rng.normal(size=(4, 3, 5))  # a stack of samples (B, d, T)
    H = rng.normal(size=(10, 10))
    got = array_ops.kron_matmul(stack, None, array_ops.matmul_kron(H, array_ops.transpose(stack), None))
    np.testing.assert_allclose(got, [np.kron(u, np.eye(2)) @ H @ np.kron(u.T, np.eye(2)) for u in stack])
    # both factors, or B alone, over stacks: each sample's, or one shared, factor and matrix (the per-sample
    # programs of attention's blocks run these)
    As, Bs, Ms = rng.normal(size=(4, 3, 4)), rng.normal(size=(4, 5, 2)), rng.normal(size=(4, 8, 6))
    for a, b, m in [(As, Bs, Ms), (A, B, Ms), (As, B, Ms[0]), (None, Bs, Ms), (None, B, Ms)]:
        pick = lambda x, i: x if x is None or x.ndim == 2 else x[i]  # noqa: E731
        expected = [np.kron(np.eye(4) if pick(a, i) is None else pick(a, i), pick(b, i)) @ pick(m, i) for i in range(4)]
        np.testing.assert_allclose(array_ops.kron_matmul(a, b, m), expected, rtol=1e-12)


def test_the_mean_of_kronecker_products_is_one_product_over_the_samples():
    """kron_mean: E[Aᵢ ⊗ Bᵢ] against the mean of the formed products, both factors per sample or one shared."""
    rng = np.random.default_rng(3)
    As, Bs = rng.normal(size=(6, 3, 4)), rng.normal(size=(6, 2, 5))
    expected = np.mean([np.kron(a, b) for a, b in zip(As, Bs)], axis=0)
    np.testing.assert_allclose(array_ops.kron_mean(As, Bs), expected, rtol=1e-12)
    np.testing.assert_allclose(array_ops.kron_mean(As[0], Bs), np.kron(As[0], Bs.mean(axis=0)), rtol=1e-12)
    assert array_ops.kron_mean(As, Bs).flags.c_contiguous


def test_the_layouts_of_a_batch_of_matrices_agree():
    """(d, B, T) as passed, side by side (d, T·B), one vec per sample (d·T, B), and back."""
    rng = np.random.default_rng(1)
    X = rng.normal(size=(3, 4, 5))
    side = array_ops.side_by_side(X)
    np.testing.assert_array_equal(side[:, 5:10], X[:, 1, :])
    columns = array_ops.vec_of_samples(side, 5)
    np.testing.assert_array_equal(columns[:, 2], X[:, 2, :].reshape(-1, order="F"))
    np.testing.assert_array_equal(array_ops.unvec_of_samples(columns, 3), side)
    V = rng.normal(size=(5, 2))
    np.testing.assert_allclose(array_ops.sample_product(side, V)[:, 2:4], X[:, 1, :] @ V)
    np.testing.assert_array_equal(array_ops.samples_first(X)[2], X[:, 2, :])


def _conv_layers():
    import mcalc as mc

    X, b = mc.Matrix("X", "c", "L"), mc.Vector("b", "m")
    bias = b @ mc.ones("L").T
    W, K = mc.Matrix("W", "m", "c"), mc.Matrix("K", "m", "c*3")
    return [mc.Module("TanhConv1x1", output=mc.tanh(W @ X + bias), inputs=[X], params=[W, b]),
            mc.Module("TanhConv3", output=mc.tanh(K @ mc.unfold(X, 3, padding=1) + bias), inputs=[X], params=[K, b])]


@pytest.mark.parametrize("layer", _conv_layers(), ids=lambda m: m.name)
def test_curvature_blocks_of_a_shared_weight_equal_torch_autograd(layer, tmp_path):
    """z = tanh(W unfold(X) + b 1ᵀ) with X (c × L): every (6) block of the generated code against the
    per-sample blocks from torch autograd (Jacobians and Hessians of the whole layer, PyTorch's own
    unfold), averaged."""
    import torch_reference

    generate([layer], ["numpy"], tmp_path)
    code = load_code(layer, "numpy", tmp_path)
    rng = np.random.default_rng(3)
    c, L, m, B = 2, 4, 3, 3
    weight = "W" if "W" in [p.name for p in layer.params] else "K"
    P = {weight: rng.normal(size=(m, c if weight == "W" else 3 * c)), "b": rng.normal(size=(m, 1))}
    X, dZ = rng.normal(size=(c, B, L)), rng.normal(size=(m, B, L)) / B
    a = rng.normal(size=(m * L, m * L))
    Hz = a @ a.T / (m * L)
    for name in ("X", weight, "b"):
        ggn, second = 0, 0  # (6): the mean of the per-sample Gauss–Newton terms, the summed second-order term
        for i in range(B):
            values = {weight: P[weight], "b": P["b"].reshape(-1), "X": X[:, i, :]}
            dense = torch_reference.dense_rules(layer, name, values, dZ[:, i, :].reshape(-1, order="F"), Hz)
            ggn, second = ggn + dense["ggn"] / B, second + dense["second-order"]
        assert np.abs(ggn).max() > 1e-3 and np.abs(second).max() > 1e-3
        for curvature, reference in (("exact", ggn + second), ("ggn", ggn), ("pch-abs", ggn + _psd_abs(second))):
            block = code.HBP[(curvature, "6")](P, {"X": X, "dz": dZ}, Hz)[name]
            np.testing.assert_allclose(block.to_dense(), reference, rtol=1e-9, atol=1e-11,
                                       err_msg=f"{name} {curvature}")


def test_a_convolution_is_pytorchs_conv1d(generated):
    """The generated forward pass of Conv1d (5 taps, padding 2) and its gradients equal PyTorch's conv1d
    with the weight K (m × c·5) reshaped to (m, c, 5): PyTorch's layout of patches."""
    import torch

    code = load_code(BY_NAME["Conv1d"], "numpy", generated)
    rng = np.random.default_rng(2)
    c, L, m, B = 3, 9, 4, 5
    K, b = rng.normal(size=(m, c * 5)), rng.normal(size=(m, 1))
    X, dZ = rng.normal(size=(c, B, L)), rng.normal(size=(m, B, L))
    Z = code.forward({"K": K, "b": b}, {"X": X})["Z"]
    x = torch.tensor(X.transpose(1, 0, 2), requires_grad=True)
    weight = torch.tensor(K.reshape(m, c, 5), requires_grad=True)
    z = torch.nn.functional.conv1d(x, weight, torch.tensor(b[:, 0]), padding=2)
    np.testing.assert_allclose(Z, z.detach().numpy().transpose(1, 0, 2), rtol=1e-12)
    z.backward(torch.tensor(dZ.transpose(1, 0, 2)))
    grads = code.gradients({"K": K, "b": b}, {"X": X, "dz": dZ})
    np.testing.assert_allclose(grads["X"], x.grad.numpy().transpose(1, 0, 2), rtol=1e-11)
    np.testing.assert_allclose(grads["K"], weight.grad.numpy().reshape(m, c * 5), rtol=1e-11)


def _psd_abs(S):
    w, v = np.linalg.eigh((S + S.T) / 2)
    return (v * np.abs(w)) @ v.T


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # inside a dependency
def test_kronecker_factored_convolution_blocks_equal_curvlinops(generated):
    """A Conv1d weight's block under 6-kfac and 6-kfac-reduce against curvlinops' K-FAC-expand and -reduce
    (type-2 Fisher, the GGN) of the same convolution, a PyTorch Conv2d over a 1 × L image, followed by a
    cross-entropy over its flattened outputs, in float64: equal up to the batch size (curvlinops' loss
    is the sum over the batch, mcalc's the mean). The bias: reduce is equal too; expand drops its
    cross-position terms in curvlinops, where mcalc keeps the exact (6) block, which has a closed form."""
    import curvlinops  # installed by `make test` (the Makefile's PEERS)
    import torch

    code = load_code(BY_NAME["Conv1d"], "numpy", generated)
    rng = np.random.default_rng(0)
    c, L, m, B, k = 2, 6, 3, 5, 5
    K, b, X = rng.normal(size=(m, c * k)), rng.normal(size=(m, 1)), rng.normal(size=(c, B, L))
    labels = torch.tensor(rng.integers(0, m * L, size=B))
    model = torch.nn.Sequential(torch.nn.Conv2d(c, m, (1, k), padding=(0, 2)), torch.nn.Flatten()).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor(K.reshape(m, c, 1, k)))
        model[0].bias.copy_(torch.tensor(b[:, 0]))
    images = torch.tensor(X.transpose(1, 0, 2))[:, :, None, :]
    # 𝓗̄z: the mean of the per-sample cross-entropy Hessians diag(p) − p pᵀ, from PyTorch's flattened order
    # (o·L + t) to vec Z's (t·m + o)
    order = np.array([o * L + t for t in range(L) for o in range(m)])
    probabilities = torch.softmax(model(images), dim=1).detach().numpy()
    Hz = sum((np.diag(p) - np.outer(p, p))[np.ix_(order, order)] for p in probabilities) / B
    weight = np.array([o * c * k + j for j in range(c * k) for o in range(m)])  # vec K → PyTorch's flat weight
    for kfac_approx, approximation in (("expand", "6-kfac"), ("reduce", "6-kfac-reduce")):
        operator = curvlinops.KFACLinearOperator(
            model, torch.nn.CrossEntropyLoss(reduction="sum"), list(model.parameters()), [(images, labels)],
            fisher_type="type-2", kfac_approx=kfac_approx, check_deterministic=False)
        dense = operator.to_scipy() @ np.eye(m * c * k + m)
        blocks = code.HBP[("ggn", approximation)]({"K": K, "b": b}, {"X": X}, Hz)
        reference = dense[: m * c * k, : m * c * k][np.ix_(weight, weight)] / B
        assert np.abs(reference).max() > 1e-3
        np.testing.assert_allclose(blocks["K"].to_dense(), reference, rtol=1e-10, atol=1e-12, err_msg=kfac_approx)
        if kfac_approx == "reduce":
            np.testing.assert_allclose(blocks["b"].to_dense(), dense[m * c * k :, m * c * k :] / B, rtol=1e-10)
