"""The CuPy backend's fused kernels agree with the NumPy backend (float64 tightly, float32 to 2e-4).

Each test runs twice: on a GPU (skipped, saying why, where there is none) and
on the CPU through :mod:`mcalc.runtime.emulator`, which compiles the same
CUDA kernels with the host's C++ compiler, so that CI runs them too.
"""
import numpy as np
import pytest

import mcalc as mc
from mcalc import layers as L
from mcalc.codegen.store import load_code
from mcalc.numeric.verify_backend import verify_backend


def _inputs(module, rng, batch, dtype):

    P, S = {}, {}
    sizes = {"n": 7, "m": 5, "h": 4}
    for s in module.symbols:
        rows = int(s.rows) if s.rows.is_Integer else sizes[str(s.rows)]
        cols = int(s.cols) if s.cols.is_Integer else sizes[str(s.cols)]
        if s in module.inputs or (s in module.constants and s.is_vector):
            if "simplex" in s.hints:
                value = np.eye(rows)[:, rng.integers(rows, size=batch)]
            else:
                value = rng.normal(size=(rows, batch))
            S[s.name] = value
        else:
            P[s.name] = rng.normal(size=(rows, cols)) * 0.5
    return P, S


def _setup(cp, module, dtype, seed):
    """Both backends' code, a batch of 64 with δZ, the host → device copy and the dtype's tolerance."""
    numpy_code, cupy_code = load_code(module, "numpy"), load_code(module, "cupy")
    rng = np.random.default_rng(seed)
    P, S = _inputs(module, rng, 64, dtype)
    Z = numpy_code.forward(P, S)["Z"]
    S["dz"] = rng.normal(size=Z.shape) / Z.shape[1]
    to_gpu = lambda d: {k: cp.asarray(v, dtype=dtype) for k, v in d.items()}  # noqa: E731
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == np.float64 else dict(rtol=2e-4, atol=2e-4)
    return numpy_code, cupy_code, rng, P, S, Z, to_gpu, tol


@pytest.mark.parametrize("module", L.LIBRARY, ids=lambda m: m.name)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cupy_kernels_match_numpy(cp, module, dtype):
    numpy_code, cupy_code, rng, P, S, Z, to_gpu, tol = _setup(cp, module, dtype, seed=0)
    a = rng.normal(size=(Z.shape[0], Z.shape[0]))
    Hz = a @ a.T / Z.shape[0]
    np.testing.assert_allclose(cupy_code.forward(to_gpu(P), to_gpu(S))["Z"].get(), Z, **tol)
    calls = [(key, function(P, S, Hz), cupy_code.HBP[key](to_gpu(P), to_gpu(S), cp.asarray(Hz, dtype=dtype)))
             for key, function in numpy_code.HBP.items()]
    calls += [(f"loss Hessian ({approximation})", start(P, S),
               cupy_code.LOSS_HESSIAN[approximation](to_gpu(P), to_gpu(S)))
              for approximation, start in numpy_code.LOSS_HESSIAN.items()]
    for key, expected, got in calls:
        for v in module.variables:
            e, g = expected[v.name].to_dense(), got[v.name].to_dense().get()
            scale = max(1.0, float(np.abs(e).max()))
            np.testing.assert_allclose(g / scale, e / scale, **tol, err_msg=f"{module.name} {v.name} {key}")


@pytest.mark.parametrize("module", L.LIBRARY, ids=lambda m: m.name)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cupy_tangents_match_numpy(cp, module, dtype):
    """The R-operator's generated functions: jvp and rgradients (all moving, and parameters alone)."""
    numpy_code, cupy_code, rng, P, S, Z, to_gpu, tol = _setup(cp, module, dtype, seed=1)
    V = {v.name: rng.normal(size=(S[v.name] if v in module.inputs else P[v.name]).shape) for v in module.variables}
    V["dz"] = rng.normal(size=Z.shape)
    for inputs in (True, False) if module.params else (True,):
        moving = {k: v for k, v in V.items() if inputs or k not in {x.name for x in module.inputs}}
        expected = numpy_code.jvp(P, S, moving, inputs=inputs)["Z"]
        got = cupy_code.jvp(to_gpu(P), to_gpu(S), to_gpu(moving), inputs=inputs)["Z"].get()
        scale = max(1.0, float(np.abs(expected).max()))
        np.testing.assert_allclose(got / scale, expected / scale, **tol)
        expected = numpy_code.rgradients(P, S, moving, inputs=inputs)
        got = cupy_code.rgradients(to_gpu(P), to_gpu(S), to_gpu(moving), inputs=inputs)
        for name, e in expected.items():
            scale = max(1.0, float(np.abs(e).max()))
            np.testing.assert_allclose(got[name].get() / scale, e / scale, **tol, err_msg=f"R{{δ{name}}}")


@pytest.mark.parametrize("matrix", ["gn", "hessian"])
def test_network_curvature_products_on_cupy_match_numpy(cp, matrix):
    from mcalc.train.network import Network

    rng = np.random.default_rng(2)
    X, labels = rng.normal(size=(12, 32)), rng.integers(0, 4, 32)
    Y = np.eye(4)[:, labels]
    host, device = Network("12-8-tanh-6-sigmoid-4", seed=1), Network("12-8-tanh-6-sigmoid-4", backend="cupy", seed=1)
    V = {k: rng.normal(size=v.shape) for k, v in host.params.items()}
    expected = host.curvature_product(X, Y, matrix)(V)
    got = device.curvature_product(cp.asarray(X), cp.asarray(Y), matrix)({k: cp.asarray(v) for k, v in V.items()})
    for name, e in expected.items():
        np.testing.assert_allclose(got[name].get(), e, rtol=1e-9, atol=1e-11, err_msg=name)


def test_a_cnn_on_cupy_matches_numpy(cp, tmp_path, monkeypatch):
    """A CNN (convolutions with and without padding, ReLUs, max and average pooling, flatten) on the CuPy
    backend: NumPy's loss, gradients, Gauss–Newton HBP blocks, exact-Fisher K-FAC factors (expand and
    reduce, whose backward passes keep the signals' per-sample matrices through the ReLUs: a fused kernel
    there wrote (channels, B), not (channels, B, positions)) and curvature products."""
    from mcalc.train.network import Network
    from mcalc.train.optimizers import make_optimizer

    monkeypatch.setenv("MCALC_CACHE", str(tmp_path))  # each window's code generated here
    spec = "1x12x12-conv(4,3,pad=1)-relu-maxpool(2)-conv(5,3)-relu-avgpool(2)-flatten-6-tanh-3"
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(144, 5)), np.eye(3)[:, rng.integers(0, 3, 5)]
    host, device = Network(spec, seed=0), Network(spec, backend="cupy", seed=0)
    close = lambda got, expected, name: np.testing.assert_allclose(  # noqa: E731
        got.get(), expected, rtol=1e-9, atol=1e-12, err_msg=name)
    (loss, grads, blocks), (d_loss, d_grads, d_blocks) = (host.backward(X, Y, "ggn"),
                                                          device.backward(cp.asarray(X), cp.asarray(Y), "ggn"))
    assert float(d_loss) == pytest.approx(float(loss), rel=1e-12)
    for name in grads:
        close(d_grads[name], grads[name], name)
        close(d_blocks[name].to_dense(), blocks[name].to_dense(), name)
    for approximation in ("expand", "reduce"):
        expected = make_optimizer("kfac", fisher="exact", kfac_approx=approximation)._statistics(host, X)
        got = make_optimizer("kfac", fisher="exact", kfac_approx=approximation)._statistics(device, cp.asarray(X))
        for position, factors in expected.items():
            for factor, e in zip(got[position], factors):
                close(factor, e, f"{approximation} factor at layer {position}")
    V = {k: rng.normal(size=v.shape) for k, v in host.params.items()}
    for matrix in ("gn", "hessian"):
        expected = host.curvature_product(X, Y, matrix)(V)
        got = device.curvature_product(cp.asarray(X), cp.asarray(Y), matrix)({k: cp.asarray(v) for k, v in V.items()})
        for name, e in expected.items():
            close(got[name], e, f"{matrix} {name}")


def _example_modules():
    from conftest import ROOT

    from mcalc.user_modules import load_modules

    return [m for f in ("custom_layers.py", "layernorm_gelu.py") for m in load_modules(ROOT / "examples" / f)
            if m.name in ("GatedLinear", "Residual")]


@pytest.mark.parametrize("module", _example_modules(), ids=lambda m: m.name)
def test_per_sample_programs_on_cupy_match_numpy(cp, module):
    """Blocks without a closed batch form (per-sample programs: the exact (6) means of Kronecker products by
    kron_mean, the chains by chain_product) on CuPy, every HBP mode, against NumPy's."""
    numpy_code, cupy_code, rng, P, S, Z, to_gpu, tol = _setup(cp, module, np.float64, seed=1)
    a = rng.normal(size=(Z.shape[0], Z.shape[0]))
    Hz = a @ a.T / Z.shape[0]
    assert numpy_code.HBP_PER_SAMPLE  # the module has per-sample programs
    for key in numpy_code.HBP_PER_SAMPLE:
        expected, got = numpy_code.HBP[key](P, S, Hz), cupy_code.HBP[key](to_gpu(P), to_gpu(S), cp.asarray(Hz))
        for v in module.variables:
            np.testing.assert_allclose(got[v.name].to_dense().get(), expected[v.name].to_dense(), **tol,
                                       err_msg=f"{module.name} {key} {v.name}")


@pytest.mark.parametrize("module", [L.SigmoidLinear, L.CrossEntropy], ids=lambda m: m.name)
def test_cupy_backend_against_finite_differences(cp, module):
    checks = verify_backend(module, "cupy")
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]
    assert mc.CURVATURES


@pytest.mark.parametrize("solver", ["cg", "eigen"])
def test_hbp_newton_steps_on_cupy_match_numpy(cp, solver):
    """Eq. (8) per block on the device (CG, or eigenbases with cuSOLVER), three steps, against the host."""
    from mcalc.train.network import Network
    from mcalc.train.optimizers import HBPNewton

    rng = np.random.default_rng(3)
    X, Y = rng.normal(size=(12, 32)), np.eye(4)[:, rng.integers(0, 4, 32)]
    nets = Network("12-8-tanh-4", seed=1), Network("12-8-tanh-4", backend="cupy", seed=1)
    optimizers = HBPNewton(solver=solver, refresh=2), HBPNewton(solver=solver, refresh=2)
    for _ in range(3):
        steps = []
        for net, optimizer, (x, y) in zip(nets, optimizers, [(X, Y), (cp.asarray(X), cp.asarray(Y))]):
            _, grads, blocks = net.backward(x, y, *(optimizer.curvature_request() or ()))
            steps.append(optimizer.step(net, grads, blocks))
            net.params = {k: v + steps[-1][k] for k, v in net.params.items()}
        for name, expected in steps[0].items():
            np.testing.assert_allclose(steps[1][name].get(), expected, rtol=1e-8, atol=1e-10, err_msg=name)


@pytest.mark.parametrize("linked", [False, True], ids=["modules", "linked"])
@pytest.mark.parametrize("curvature", ["ggn", "exact"])
def test_captured_backward_replays_the_eager_pass(cp, curvature, linked):
    """Network.capture_backward (a CUDA graph) gives the eager pass's loss, gradients and blocks on new
    batches, after the parameters are rebound (as an optimiser does) and after an in-place update; also
    when the captured pass is one linked program (its Gram factors scaled by the product, cuBLAS's alpha)."""
    from mcalc.train.network import Network

    rng = np.random.default_rng(4)
    batch = lambda: (cp.asarray(rng.normal(size=(12, 32))), cp.asarray(np.eye(4)[:, rng.integers(0, 4, 32)]))  # noqa: E731
    eager = Network("12-8-tanh-6-sigmoid-4", backend="cupy", seed=1)
    captured = Network("12-8-tanh-6-sigmoid-4", backend="cupy", seed=1, linked=linked)
    replay = captured.capture_backward(*batch(), curvature)
    for change in ("none", "rebind", "in place"):
        if change == "rebind":
            for net in (eager, captured):
                net.params = {k: v - 0.1 for k, v in net.params.items()}
        elif change == "in place":
            for net in (eager, captured):
                net.params["W1"] *= 0.5
        X, Y = batch()
        expected, got = eager.backward(X, Y, curvature), replay(X, Y)
        assert got[0] == pytest.approx(expected[0], rel=1e-12)
        for name in expected[1]:
            np.testing.assert_allclose(got[1][name].get(), expected[1][name].get(), rtol=1e-10, err_msg=name)
            np.testing.assert_allclose(got[2][name].to_dense().get(), expected[2][name].to_dense().get(),
                                       rtol=1e-10, atol=1e-14, err_msg=name)
    with pytest.raises(mc.McalcError, match="captured for"):
        replay(cp.asarray(rng.normal(size=(12, 16))), Y)


def test_capture_needs_the_cupy_backend():
    from mcalc.train.network import Network

    with pytest.raises(mc.McalcError, match="need the cupy backend"):
        Network("4-3", seed=0).capture_backward(np.zeros((4, 2)), np.eye(3)[:, :2])


def test_training_with_graphs_matches_eager_training(cp):
    """``train(..., graphs=True)``: the same history and weights as eager passes, with a graph per
    curvature mode and batch shape (eigenbases renewed every other step: passes with and without
    blocks; 200 samples in batches of 48: a last batch of 8)."""
    from mcalc.train.data import Dataset, digits
    from mcalc.train.network import Network
    from mcalc.train.optimizers import HBPNewton
    from mcalc.train.trainer import train

    full = digits()
    data = Dataset("digits", full.x_train[:200], full.y_train[:200], full.x_test[:50], full.y_test[:50])
    runs = []
    for graphs in (False, True):
        net = Network("64-16-tanh-10", backend="cupy", seed=0)
        result = train(net, data, HBPNewton(solver="eigen", refresh=2), epochs=2, batch_size=48, graphs=graphs)
        runs.append((result["history"], {k: v.get() for k, v in net.params.items()}))
    (eager, eager_params), (replayed, replayed_params) = runs
    for a, b in zip(eager, replayed):
        for key in ("train_loss", "test_loss", "test_accuracy"):
            assert b[key] == pytest.approx(a[key], rel=1e-9), key
    for name, value in eager_params.items():
        np.testing.assert_allclose(replayed_params[name], value, rtol=1e-9, atol=1e-12, err_msg=name)
