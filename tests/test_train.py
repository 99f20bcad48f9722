"""The training driver: networks on generated kernels, optimiser steps against dense computations, data, CLI."""
import gzip
import json
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

import mcalc as mc
from mcalc.numeric.finite_diff import hessian_fd
from mcalc.train import data as D
from mcalc.train.block_solvers import conjugate_gradient
from mcalc.train.model_spec import Activation, UserModule, Width, parse_spec
from mcalc.train.network import Network
from mcalc.train.optimizer_protocol import MiniBatch, Optimizer
from mcalc.train.optimizers import HBPNewton, make_optimizer
from mcalc.train.trainer import train


def test_parse_spec():
    assert parse_spec("64-128-sigmoid-64-tanh-10") == [Width(64), Width(128), Activation("Sigmoid"), Width(64),
                                                       Activation("Tanh"), Width(10)]
    assert parse_spec("4-3-2") == [Width(4), Width(3), Width(2)]
    assert parse_spec("64-Norm-Gate(m=32, r=4)-relu-10", modules=["Norm", "Gate"]) == [
        Width(64), UserModule("Norm"), UserModule("Gate", (("m", 32), ("r", 4))), Activation("ReLU"), Width(10)]
    for bad, message in [("64", "needs an input .* and an output"), ("64-sigmoid-10", "must follow a width, a conv"),
                         ("64-10-relu", "ends with an activation"),
                         ("64-gelu-10", "unknown token 'gelu'.*modules: Gate"), ("64-Norm-10", "unknown token 'Norm'"),
                         ("64-10-relu-tanh-10", "must follow a width"), ("64-Gate(m=0)-10", "m=0.*positive integer"),
                         ("64-10-Gate", "ends with a module")]:
        with pytest.raises(mc.McalcError, match=message):
            parse_spec(bad, modules=["Gate"])
    with pytest.raises(mc.McalcError, match=r"unknown token 'LayerNorm'.*needs --modules FILE\.py"):
        parse_spec("64-LayerNorm-10")


def _tiny(seed=0, batch=6):
    net = Network("4-5-sigmoid-3", seed=seed)
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(4, batch))
    Y = np.eye(3)[:, rng.integers(3, size=batch)]
    return net, X, Y


def test_single_sample_blocks_are_the_exact_hessian_blocks():
    net, X, Y = _tiny(batch=1)
    _, _, blocks = net.backward(X, Y, "exact")
    for name, p in net.params.items():
        def loss(flat, name=name, p=p):
            return net.loss(X, Y, {**net.params, name: flat.reshape(p.shape, order="F")})

        np.testing.assert_allclose(blocks[name].to_dense(), hessian_fd(loss, p.reshape(-1, order="F")), atol=1e-6)


def test_conjugate_gradient_solves_spd_systems():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(8, 8))
    A, b = a @ a.T + np.eye(8), rng.normal(size=8)
    solution = conjugate_gradient(lambda v: A @ v, b, 1e-12, 100)
    np.testing.assert_allclose(A @ solution.x, b, atol=1e-9)
    assert solution.iterations <= 8 + 1


def test_conjugate_gradient_gain_is_the_trace_of_the_inverse_ritz_matrix():
    """After n steps on an n × n SPD matrix the Ritz values are its eigenvalues: gain = tr A⁻¹; after
    fewer, the gain bounds the amplification of every direction of b (x = q(A) b, q ≤ q(0) = gain)."""
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    eigenvalues = np.array([1e-3, 0.1, 0.5, 1.0, 2.0, 5.0])
    A, b = q @ np.diag(eigenvalues) @ q.T, rng.normal(size=6)
    full = conjugate_gradient(lambda v: A @ v, b, 1e-14, 6)
    assert full.gain == pytest.approx(np.sum(1 / eigenvalues), rel=1e-4)
    short = conjugate_gradient(lambda v: A @ v, b, 0.0, 2)
    assert 0 < short.gain < 0.1 * full.gain  # two steps see the large eigenvalues only
    gains = np.abs(q.T @ short.x) / np.abs(q.T @ b)
    assert gains.max() <= short.gain * (1 + 1e-9)
    assert gains[0] < 1 / eigenvalues[0] / 10  # the near-null direction is left (almost) alone


@pytest.mark.parametrize("split", [1, 2])
def test_newton_step_equals_the_dense_solve(split):
    """Eq. (8): Δθ = −γ [α I + (1 − α) 𝓗̄θ]⁻¹ δθ, block by block (row-wise sub-blocks when split)."""
    net, X, Y = _tiny()
    optimizer = HBPNewton(lr=0.1, alpha=0.02, cg_tolerance=1e-12, cg_iterations=500, split=split, solver="cg")
    _, grads, blocks = net.backward(X, Y, optimizer.curvature)
    updates = optimizer.step(net, grads, blocks)
    for name, g in grads.items():
        H = blocks[name].to_dense()
        rows = g.shape[0]
        mask = np.zeros_like(H)
        for part in np.array_split(np.arange(rows), split):
            index = (part[:, None] + rows * np.arange(g.shape[1])[None, :]).reshape(-1, order="F")
            mask[np.ix_(index, index)] = 1.0
        system = 0.02 * np.eye(len(H)) + 0.98 * (H * mask)
        expected = -0.1 * np.linalg.solve(system, g.reshape(-1, order="F"))
        np.testing.assert_allclose(updates[name].reshape(-1, order="F"), expected, rtol=1e-7, atol=1e-10)


def test_sgd_and_adam_steps():
    net, X, Y = _tiny()
    _, grads, _ = net.backward(X, Y)
    sgd = make_optimizer("sgd", lr=0.5, momentum=0.9)
    first = sgd.step(net, grads, {})
    second = sgd.step(net, grads, {})
    for name, g in grads.items():
        np.testing.assert_allclose(first[name], -0.5 * g)
        np.testing.assert_allclose(second[name], -0.5 * 1.9 * g)
    adam = make_optimizer("adam", lr=0.01)
    step = adam.step(net, grads, {})
    for name, g in grads.items():  # the first Adam step is −lr·sign(g) up to ε
        np.testing.assert_allclose(step[name], -0.01 * g / (np.abs(g) + 1e-8), rtol=1e-6)
    with pytest.raises(mc.McalcError, match="unknown optimizer"):
        make_optimizer("lbfgs")


class _Exploding(Optimizer):
    def step(self, net, grads, blocks, batch=None):
        with np.errstate(invalid="ignore"):  # 0 · ∞: the NaNs are the point
            return {name: g * np.inf for name, g in grads.items()}


def test_non_finite_steps_are_rejected_and_weights_kept():
    net = Network("64-10", seed=0)
    before = {k: v.copy() for k, v in net.params.items()}
    result = train(net, D.digits(), _Exploding(), epochs=1, batch_size=512)
    assert result["final"]["rejected_steps"] == 3
    for name, value in net.params.items():
        np.testing.assert_array_equal(value, before[name])


def test_a_steps_losses_are_computed_once_each(monkeypatch):
    """The loss before a step is the backward pass's and the loss after it is computed once, though the
    optimiser's reduction ratio and the loop's rejection test both read it: one forward pass of the loss a
    step (and one for each epoch's test loss), where each asking for it had cost three."""
    calls = []
    loss = Network.loss
    monkeypatch.setattr(Network, "loss", lambda self, *a, **k: calls.append(1) or loss(self, *a, **k))
    data = D.digits()
    steps = -(-len(data.y_train) // 256)
    for name, options in [("hbp-newton", {}), ("kfac", {"damping_period": 1}), ("sgd", {})]:
        calls.clear()
        train(Network("64-8-tanh-10", seed=0), data, make_optimizer(name, **options), epochs=2, batch_size=256)
        assert len(calls) == 2 * (steps + 1), name


def test_a_mini_batch_keeps_its_loss_after_an_update_for_that_update_only():
    net = Network("4-3-tanh-2", seed=0)
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(4, 5)), np.eye(2)[:, rng.integers(0, 2, 5)]
    batch = MiniBatch(net, X, Y)
    assert batch.loss() == net.loss(X, Y) and tuple(batch) == (X, Y) and batch[1] is Y and len(batch) == 2
    updates = {k: rng.normal(size=v.shape) for k, v in net.params.items()}
    after = batch.loss(updates)
    assert after == net.loss(X, Y, net.params_plus(updates)) != batch.loss()
    assert batch.loss(updates) == after
    updates["W1"] = 2 * updates["W1"]  # an entry replaced: the kept value no longer holds
    assert batch.loss(updates) == net.loss(X, Y, net.params_plus(updates)) != after
    assert batch.loss(dict(updates)) == batch.loss(updates)  # an equal dict of the same arrays: evaluated again


def test_each_step_is_handed_the_whole_training_set():
    """Beside its mini-batch a step gets the training set (``batch.training``, Martens' HF measures on it),
    the same arrays every step, its loss computed afresh at each step's weights."""
    seen = []

    class Recording(Optimizer):
        def step(self, net, grads, blocks, batch=None):
            seen.append((batch.training.X, batch.training.Y, batch.training.loss(), batch.X.shape[1]))
            return {name: -0.1 * g for name, g in grads.items()}

    data = D.digits()
    net = Network("64-10", seed=0)
    train(net, data, Recording(), epochs=1, batch_size=512)
    X_train = data.x_train.T
    assert [b for *_, b in seen] == [512, 512, len(data.y_train) - 1024]
    for X, Y, *_ in seen:
        assert X is seen[0][0] and Y is seen[0][1]
        np.testing.assert_array_equal(X, X_train)
        np.testing.assert_array_equal(Y.argmax(axis=0), data.y_train)
    losses = [loss for *_, loss, _ in seen]
    assert losses[0] > losses[1] > losses[2]  # each step's own weights


@pytest.mark.parametrize(("optimizer", "options", "epochs"), [
    ("sgd", {"lr": 0.1, "momentum": 0.9}, 20),
    ("adam", {"lr": 3e-3}, 15),
    # the paper's defaults: γ = 0.1, α = 0.02, ε_CG = 0.1, n_CG = 50, PCH-abs; CG every step, then averaged eigenbases
    ("hbp-newton", {"solver": "cg"}, 10),
    ("hbp-newton", {"solver": "eigen"}, 10),
])
def test_each_optimizer_trains_digits_to_95_percent(optimizer, options, epochs):
    net = Network("64-128-sigmoid-10", seed=0)
    result = train(net, D.digits(), make_optimizer(optimizer, **options), epochs=epochs, batch_size=64)
    assert max(row["test_accuracy"] for row in result["history"]) >= 0.95, result["history"]


# --- Hessian-free -------------------------------------------------------------------------------
def _flat_problem(spec="5-4-sigmoid-3-tanh-3", batch=7, seed=0):
    """A tiny network and batch, with its parameters flattened for dense computations."""
    net = Network(spec, seed=seed + 1)
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(net.widths[0], batch))
    Y = np.eye(net.widths[-1])[:, rng.integers(0, net.widths[-1], batch)]
    names = list(net.params)
    flat = lambda d: np.concatenate([d[n].ravel() for n in names])  # noqa: E731

    def unflat(v):
        out, i = {}, 0
        for n in names:
            out[n] = v[i:i + net.params[n].size].reshape(net.params[n].shape)
            i += net.params[n].size
        return out

    return net, X, Y, flat, unflat


def test_curvature_products_equal_the_dense_hessian_and_gauss_newton():
    """Hv against the finite-difference Jacobian of the gradient; Gv against Jᵀ 𝓗L J from the
    finite-difference Jacobian of the outputs and the softmax Hessian diag(p) − p pᵀ."""
    net, X, Y, flat, unflat = _flat_problem()
    theta, h = flat(net.params), 1e-5

    def at(v, f):
        saved, net.params = net.params, unflat(v)
        try:
            return f()
        finally:
            net.params = saved

    grad = lambda v: flat(at(v, lambda: net.backward(X, Y)[1]))  # noqa: E731
    out = lambda v: at(v, lambda: net.forward(X)[0])  # noqa: E731
    steps = np.eye(theta.size) * h
    H = np.stack([(grad(theta + e) - grad(theta - e)) / (2 * h) for e in steps], axis=1)
    J = np.stack([(out(theta + e) - out(theta - e)) / (2 * h) for e in steps], axis=-1)  # (classes, B, params)
    p = net.predict(X)
    B = X.shape[1]
    G = sum(J[:, i].T @ (np.diag(p[:, i]) - np.outer(p[:, i], p[:, i])) @ J[:, i] for i in range(B)) / B
    V = np.random.default_rng(1).normal(size=theta.size)
    np.testing.assert_allclose(flat(net.curvature_product(X, Y, "hessian")(unflat(V))), H @ V, atol=1e-8)
    np.testing.assert_allclose(flat(net.curvature_product(X, Y, "gn")(unflat(V))), G @ V, atol=1e-8)
    assert not np.allclose(H, G, atol=1e-3)  # the network's own curvature is really there


def test_hessian_product_matches_torch_autograd():
    """Independently: torch's double-backward Hessian-vector product of the same network and loss."""
    import torch

    net, X, Y, flat, unflat = _flat_problem("6-5-tanh-4-softplus-3", batch=9, seed=3)
    V = np.random.default_rng(4).normal(size=flat(net.params).size)
    params = {k: torch.tensor(v, requires_grad=True) for k, v in net.params.items()}
    Xt, Yt = torch.tensor(X), torch.tensor(Y)

    def loss(p):
        a = torch.tanh(p["W1"] @ Xt + p["b1"])
        a = torch.nn.functional.softplus(p["W2"] @ a + p["b2"])
        z = p["W3"] @ a + p["b3"]
        return -(Yt * torch.log_softmax(z, dim=0)).sum(dim=0).mean()

    g = torch.autograd.grad(loss(params), list(params.values()), create_graph=True)
    direction = [torch.tensor(v) for v in unflat(V).values()]
    hv = torch.autograd.grad(sum((gi * di).sum() for gi, di in zip(g, direction)), list(params.values()))
    expected = np.concatenate([t.detach().numpy().ravel() for t in hv])
    np.testing.assert_allclose(flat(net.curvature_product(X, Y, "hessian")(unflat(V))), expected, atol=1e-12)


def test_truncated_cg_solves_and_stops_at_negative_curvature():
    from mcalc.train.hessian_free import truncated_cg

    rng = np.random.default_rng(0)
    a = rng.normal(size=(12, 12))
    A, b = a @ a.T + np.eye(12), rng.normal(size=12)
    result = truncated_cg(lambda v: A @ v, b, np.zeros(12), max_iterations=100, tolerance=1e-10,
                          progress_tolerance=0)
    np.testing.assert_allclose(result.x, np.linalg.solve(A, b), atol=1e-8)
    np.testing.assert_allclose(result.Ax, A @ result.x, atol=1e-8)
    indefinite = np.diag([1.0, 2.0, -1.0])
    result = truncated_cg(lambda v: indefinite @ v, np.ones(3), np.zeros(3), max_iterations=10, tolerance=1e-12)
    assert result.negative_curvature


@pytest.mark.parametrize("b, m, a", [(1e-22, 12.8, 2.0), (4e-23, 2.5, 10.0)])
def test_truncated_cg_stops_where_float32_loses_the_residual(b, m, a):
    """A float32 residual whose direction's pᵀp and pᵀAp (b = 1e-22) or whose rᵀM⁻¹r alone (4e-23, A = 10 I)
    underflow to 0 is solved, not a division by zero nor negative curvature (hf-gn on a float32 sigmoid
    network reached it)."""
    from mcalc.train.hessian_free import truncated_cg

    b = np.array([b, 0.0], dtype=np.float32)
    result = truncated_cg(lambda v: a * v, b, np.zeros(2, dtype=np.float32), max_iterations=10,
                          preconditioner=np.full(2, m, dtype=np.float32))
    assert not result.negative_curvature and result.iterations == 0 and not result.x.any()


@pytest.mark.parametrize("matrix", ["gn", "hessian"])
def test_hessian_free_step_is_the_damped_newton_step(matrix):
    """With CG run to convergence the step solves (C + λI) d = −g with the dense C; the damping then
    moves by the reduction ratio, and the step is what the backtracking accepts."""
    from mcalc.train.hessian_free import HessianFree

    net, X, Y, flat, unflat = _flat_problem("5-4-sigmoid-3", batch=11, seed=5)
    _, grads, _ = net.backward(X, Y)
    n = flat(net.params).size
    C = np.stack([flat(net.curvature_product(X, Y, matrix)(unflat(e))) for e in np.eye(n)], axis=1)
    opt = HessianFree(matrix=matrix, damping=0.5, cg_iterations=200, cg_tolerance=1e-12, adapt_damping=True,
                      min_damping=0.0, backtrack=False)
    updates = opt.step(net, grads, {}, (X, Y))
    d = np.linalg.solve(C + 0.5 * np.eye(n), -flat(grads))
    step = flat(updates)
    alpha = float(step @ d / (d @ d))
    np.testing.assert_allclose(step, alpha * d, atol=1e-8)
    assert 0 < alpha <= 1 + 1e-12
    base, model = net.loss(X, Y), flat(grads) @ d + 0.5 * d @ C @ d
    rho = (net.loss(X, Y, {k: net.params[k] + u for k, u in unflat(d).items()}) - base) / model
    assert opt.ratios == [pytest.approx(rho)]
    assert opt.damping == pytest.approx(0.5 * (1.5 if rho < 0.25 else 2 / 3 if rho > 0.75 else 1))


@pytest.mark.parametrize(("optimizer", "options"), [
    ("hf-gn", {}),
    ("hf-newton", {}),
])
def test_hessian_free_trains_digits_to_95_percent(optimizer, options):
    net = Network("64-128-sigmoid-10", seed=0)
    result = train(net, D.digits(), make_optimizer(optimizer, **options), epochs=8, batch_size=64)
    assert max(row["test_accuracy"] for row in result["history"]) >= 0.95, result["history"]


# --- data --------------------------------------------------------------------------------------
def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def test_mnist_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 7), ("t10k", 3)):
        (tmp_path / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(rng.integers(0, 256, (n, 4, 4)))))
        (tmp_path / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx(rng.integers(0, 10, n)))
    data = D.load_dataset("mnist", folder=str(tmp_path))
    assert data.x_train.shape == (7, 16) and data.x_test.shape == (3, 16) and data.x_train.max() <= 1.0
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x09\x01" + b"\x00" * 8)
    with pytest.raises(mc.McalcError, match="bad magic number"):
        D.mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx(np.arange(5))[:-2])
    with pytest.raises(mc.McalcError, match="header says 5 values"):
        D.mnist(tmp_path)
    with pytest.raises(mc.McalcError, match="missing"):
        D.mnist(tmp_path / "nowhere")


def test_cifar10_batches(tmp_path):
    rng = np.random.default_rng(0)
    for name, n in (("data_batch_1", 4), ("data_batch_2", 2), ("test_batch", 3)):
        entry = {b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8), b"labels": list(rng.integers(0, 10, n))}
        (tmp_path / name).write_bytes(pickle.dumps(entry))
    data = D.load_dataset("cifar10", folder=str(tmp_path))
    assert data.x_train.shape == (6, 3072) and len(data.y_test) == 3
    (tmp_path / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(mc.McalcError, match="not a CIFAR-10 python batch"):
        D.cifar10(tmp_path)


class _RunsCode:
    def __reduce__(self):
        return (print, ("this ran on load",))


def test_a_cifar10_batch_that_would_run_code_is_refused(tmp_path, capsys):
    """The batches are pickles by format: only dicts, lists, bytes, numbers and arrays are admitted."""
    rng = np.random.default_rng(1)
    for name in ("data_batch_1", "test_batch"):
        entry = {b"data": rng.integers(0, 256, (2, 3072)).astype(np.uint8), b"labels": [1, 2]}
        (tmp_path / name).write_bytes(pickle.dumps(entry))
    assert D.cifar10(tmp_path).x_test.shape == (2, 3072)
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": _RunsCode(), b"labels": [1]}))
    with pytest.raises(mc.McalcError, match=r"not a CIFAR-10 python batch .*asks for builtins\.print"):
        D.cifar10(tmp_path)
    assert "this ran on load" not in capsys.readouterr().out


def test_a_network_refuses_what_it_cannot_take():
    """A batch, targets or directions of the wrong shape, an empty batch, an integer dtype or an unknown backend:
    an McalcError naming what it takes (NumPy's broadcasting and matmul errors, an IndexError, a KeyError and a
    ZeroDivisionError before)."""
    net = Network("4-3-tanh-2")
    X, Y = np.ones((4, 5)), np.eye(2)[:, [0, 1, 0, 1, 0]]
    for call, message in [(lambda: net.backward(np.ones((3, 5)), Y), r"takes a batch X of shape \(4, B\)"),
                          (lambda: net.backward(np.ones(4), Y), r"not \(4,\)"),
                          (lambda: net.backward(np.ones((4, 0)), np.ones((2, 0))), r"B ≥ 1, not \(4, 0\)"),
                          (lambda: net.predict(np.ones((5, 4))), r"takes a batch X"),
                          (lambda: net.backward(X, np.ones((2, 4))), r"takes targets Y of shape \(2, 5\)"),
                          (lambda: net.loss(X, np.ones((3, 5))), r"takes targets Y"),
                          (lambda: net.curvature_product(X, Y)({"W1": np.ones((3, 4))}), r"directions V of"),
                          (lambda: Network("4-3-2", dtype=np.int32), "dtype must be a floating type"),
                          (lambda: Network("4-3-2", backend="jax"), "unknown backend 'jax'")]:
        with pytest.raises(mc.McalcError, match=message):
            call()


def test_npz_and_bad_data(tmp_path):
    path = tmp_path / "toy.npz"
    np.savez(path, x_train=np.ones((5, 3)), y_train=np.arange(5) % 2, x_test=np.ones((2, 3)), y_test=[0, 1])
    assert D.load_dataset(str(path)).features == 3
    np.savez(path, x_train=np.ones((5, 3)), y_train=np.arange(4), x_test=np.ones((2, 3)), y_test=[0, 1])
    with pytest.raises(mc.McalcError, match="shapes do not fit"):
        D.load_dataset(str(path))
    np.savez(path, x_train=np.ones((5, 3)), y_train=np.arange(5) % 2, x_test=np.ones((2, 3)), y_test=[0.0, 1.0])
    assert D.load_dataset(str(path)).y_test.tolist() == [0, 1]  # whole numbers stored as floats
    good = {"x_train": np.ones((5, 3)), "y_train": np.arange(5) % 2, "x_test": np.ones((2, 3)), "y_test": [0, 1]}
    for bad, message in [({"x_train": np.zeros((0, 3)), "y_train": np.zeros(0)}, "x_train has no samples"),
                         ({"x_test": np.full((2, 3), np.nan)}, "x_test must hold finite numbers"),
                         ({"y_train": np.linspace(0, 1, 5)}, "y_train must hold class labels"),
                         ({"y_test": [-1, 0]}, "y_test must hold class labels"),
                         ({"y_train": np.eye(2)[np.arange(5) % 2]}, "shapes do not fit")]:  # one-hot labels
        np.savez(path, **{**good, **bad})
        with pytest.raises(mc.McalcError, match=message):
            D.load_dataset(str(path))
    with pytest.raises(mc.McalcError, match="needs the folder"):
        D.load_dataset("cifar10")
    with pytest.raises(mc.McalcError, match="unknown data"):
        D.load_dataset("imagenet")
    digits = D.digits()
    assert digits.features == 64 and digits.classes == 10 and len(digits.y_train) + len(digits.y_test) == 1797


def test_mnist1d_and_synthetic_are_built_in():
    """MNIST-1D as its package's defaults make it (Greydanus 2020: 4,000 + 1,000 signals of length 40, 10
    classes, the same every time); the synthetic problem: 5 classes, 20 correlated features."""
    first, again = D.load_dataset("mnist1d"), D.load_dataset("mnist1d")
    assert first.x_train.shape == (4000, 40) and first.x_test.shape == (1000, 40) and first.classes == 10
    np.testing.assert_array_equal(first.x_train, again.x_train)
    assert set(np.bincount(first.y_train)) != {0} and np.bincount(first.y_train).min() > 300
    synthetic = D.load_dataset("synthetic", seed=1)
    assert synthetic.features == 20 and synthetic.classes == 5 and len(synthetic.y_train) == 1600
    correlation = np.corrcoef(synthetic.x_train.T)
    assert np.abs(correlation[np.triu_indices(20, 1)]).max() > 0.5  # redundant features: correlated inputs


def test_cli_train_writes_json_and_plot(tmp_path):
    out, png = tmp_path / "history.json", tmp_path / "curves.png"
    done = subprocess.run([sys.executable, "-m", "mcalc.cli", "train", "--optimizer", "sgd", "--epochs", "2",
                           "--json", str(out), "--plot", str(png)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["optimizer"] == "sgd" and len(result["history"]) == 2
    assert set(result["history"][0]) == {"epoch", "train_loss", "test_loss", "test_accuracy", "wall_s"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    done = subprocess.run([sys.executable, "-m", "mcalc.cli", "train", "--model", "64-5"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "10 classes" in done.stderr
    done = subprocess.run([sys.executable, "-m", "mcalc.cli", "train", "--graphs", "--json", str(tmp_path / "g.json")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "CUDA graphs need the cupy backend" in done.stderr
    assert not (tmp_path / "g.json").exists()


@pytest.mark.parametrize(("optimizer", "options"), [
    ("sgd", {}), ("adam", {}), ("hbp-newton", {}), ("hbp-newton", {"solver": "eigen", "split": 2}), ("kfac", {}),
    ("kbfgs", {}), ("hf-gn", {"cg_iterations": 10})
])
def test_resume_gives_the_same_history_as_an_uninterrupted_run(tmp_path, optimizer, options):
    """Every optimiser's whole state (velocities, factors, quasi-Newton matrices, eigenbases with their
    row-split keys, K-FAC's label sampler) goes through the data-only checkpoint and back."""
    from mcalc.train.checkpoint import load_checkpoint

    data = D.digits()
    whole = train(Network("64-32-sigmoid-10", seed=3), data, make_optimizer(optimizer, **options), epochs=4,
                  batch_size=128, seed=5)
    path = tmp_path / "run.ckpt"
    train(Network("64-32-sigmoid-10", seed=3), data, make_optimizer(optimizer, **options), epochs=2, batch_size=128,
          seed=5, checkpoint=path)
    resumed = train(Network("64-32-sigmoid-10", seed=99), data, make_optimizer(optimizer, **options), epochs=4,
                    batch_size=128, seed=5, resume=load_checkpoint(path))
    strip = lambda h: [{k: v for k, v in row.items() if k != "wall_s"} for row in h]  # noqa: E731
    assert strip(resumed["history"]) == strip(whole["history"])


def test_a_hessian_free_checkpoint_from_before_measured_on_resumes_on_the_mini_batch(tmp_path):
    """Checkpoints written before Hessian-free measured on the training set hold no ``measured_on``: the
    resumed run goes on measuring on the mini-batch as the saved one did; a new checkpoint keeps its own."""
    import json as json_module

    from mcalc.train.checkpoint import load_checkpoint

    data, path = D.digits(), tmp_path / "run.ckpt"
    for measured_on in ("training-set", "batch"):
        train(Network("64-10", seed=0), data, make_optimizer("hf-gn", measured_on=measured_on, cg_iterations=5),
              epochs=1, batch_size=512, checkpoint=path)
        assert load_checkpoint(path)["optimizer"].measured_on == measured_on
    with np.load(path, allow_pickle=False) as archive:  # the batch run's, its option taken out
        arrays = {name: archive[name] for name in archive.files}
    document = json_module.loads(str(arrays["state"]))
    optimizer = next(value for key, value in document["state"]["__dict__"] if key == "optimizer")
    del optimizer["attributes"]["measured_on"]
    np.savez(tmp_path / "old.npz", **{**arrays, "state": np.array(json_module.dumps(document))})
    assert load_checkpoint(tmp_path / "old.npz")["optimizer"].measured_on == "batch"


@pytest.mark.parametrize("stop", [2, 3])
def test_lr_drops_divide_the_learning_rate_once_each_also_across_a_resume(tmp_path, stop):
    """Step decay: the rate is a tenth from each drop's epoch on; a run resumed before or after a drop gives
    the history of the uninterrupted run (a resumed optimiser already has its lower rate)."""
    from mcalc.train.checkpoint import load_checkpoint

    data = D.digits()
    optimizer = make_optimizer("sgd", lr=0.5)
    whole = train(Network("64-16-tanh-10", seed=1), data, optimizer, epochs=4, batch_size=256, lr_drops=[3, 4])
    assert optimizer.lr == pytest.approx(0.005)
    plain = train(Network("64-16-tanh-10", seed=1), data, make_optimizer("sgd", lr=0.5), epochs=4, batch_size=256)
    assert plain["history"][2]["train_loss"] != whole["history"][2]["train_loss"]  # the drop changed the run
    assert plain["history"][1] | {"wall_s": 0} == whole["history"][1] | {"wall_s": 0}  # not before it
    path = tmp_path / "run.ckpt"
    train(Network("64-16-tanh-10", seed=1), data, make_optimizer("sgd", lr=0.5), epochs=stop, batch_size=256,
          lr_drops=[e for e in (3, 4) if e <= stop], checkpoint=path)
    resumed = train(Network("64-16-tanh-10", seed=7), data, make_optimizer("sgd", lr=0.5), epochs=4,
                    batch_size=256, lr_drops=[3, 4], resume=load_checkpoint(path))
    strip = lambda h: [{k: v for k, v in row.items() if k != "wall_s"} for row in h]  # noqa: E731
    assert strip(resumed["history"]) == strip(whole["history"])


class _Sneaky:
    def __reduce__(self):
        return (print, ("this ran on load",))


def test_checkpoints_are_data_and_anything_else_is_refused(tmp_path, capsys):
    """A checkpoint opens with pickles refused (np.load, allow_pickle=False); a pickle, another format,
    another version, an unknown class or garbage gets one clear error, and runs nothing."""
    import json as json_module

    from mcalc.train.checkpoint import load_checkpoint, save_checkpoint

    path = tmp_path / "run.ckpt"
    train(Network("64-10", seed=0), D.digits(), make_optimizer("kfac"), epochs=1, batch_size=512, checkpoint=path)
    with np.load(path, allow_pickle=False) as archive:
        document = json_module.loads(str(archive["state"]))
        assert document["format"] == "mcalc-checkpoint" and document["version"] == 1
        assert len(archive.files) > 5  # the arrays: weights and Kronecker factors
    assert load_checkpoint(path)["optimizer"].factors
    (tmp_path / "old.ckpt").write_bytes(pickle.dumps({"epoch": 1, "optimizer": _Sneaky()}))
    for name, message in (("old.ckpt", "before version 1 of the format were pickles"),
                          ("garbage.ckpt", "not an mcalc checkpoint")):
        if name == "garbage.ckpt":
            (tmp_path / name).write_bytes(b"garbage")
        with pytest.raises(mc.McalcError, match=message):
            load_checkpoint(tmp_path / name)
    assert "this ran on load" not in capsys.readouterr().out
    np.savez(tmp_path / "other.npz", state=np.array(json_module.dumps({"format": "mcalc-checkpoint", "version": 7})))
    with pytest.raises(mc.McalcError, match="version 7; this mcalc reads version 1"):
        load_checkpoint(tmp_path / "other.npz")
    forged = {"format": "mcalc-checkpoint", "version": 1, "state": {"__object__": "Popen", "attributes": {}}}
    np.savez(tmp_path / "forged.npz", state=np.array(json_module.dumps(forged)))
    with pytest.raises(mc.McalcError, match="holds a 'Popen', which no mcalc checkpoint holds"):
        load_checkpoint(tmp_path / "forged.npz")
    with pytest.raises(mc.McalcError, match="cannot hold a"):
        save_checkpoint(tmp_path / "x.ckpt", {"epoch": 1, "bad": object()})
    assert not (tmp_path / "x.ckpt").exists()


def test_kfac_factors_and_step_against_dense_computations():
    """Exact-Fisher K-FAC: Ā = E[ã ãᵀ]; at the last layer G = E[diag p − p pᵀ]; the step is the Kronecker solve."""
    from mcalc.train.optimizers import KFAC

    net, X, Y = _tiny(batch=7)
    kfac = KFAC(lr=0.3, damping=1e-2, momentum=0.0, fisher="exact")
    _, grads, _ = net.backward(X, Y)
    updates = kfac.step(net, grads, {}, (X, Y))
    A1, _ = kfac.factors[0]
    X1 = np.vstack([X, np.ones((1, X.shape[1]))])
    np.testing.assert_allclose(A1, X1 @ X1.T / X.shape[1], atol=1e-12)
    p = net.predict(X)
    last = max(kfac.factors)
    _, G = kfac.factors[last]
    np.testing.assert_allclose(G, np.mean([np.diag(q) - np.outer(q, q) for q in p.T], axis=0), atol=1e-12)
    for position, (A, G) in kfac.factors.items():
        names = net.layers[position].params
        pi = np.sqrt((np.trace(A) / len(A)) / (np.trace(G) / len(G)))
        F = np.kron(A + pi * 0.1 * np.eye(len(A)), G + 0.1 / pi * np.eye(len(G)))
        gradient = np.hstack([grads[names["W"]], grads[names["b"]]])
        expected = (-0.3 * np.linalg.solve(F, gradient.reshape(-1, order="F"))).reshape(gradient.shape, order="F")
        np.testing.assert_allclose(np.hstack([updates[names["W"]], updates[names["b"]]]), expected, atol=1e-10)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_the_exact_fishers_root_has_one_column_fewer_than_the_classes(dtype):
    """S Sᵀ = diag(p) − p pᵀ per sample from C − 1 columns (optimizers.fisher_root_columns), also where p is
    nearly one-hot and for two classes; and exact-Fisher K-FAC's factors from them equal those of the C
    columns (p − e_c)√p_c it made before, one backward pass each, while a column left out changes them."""
    from mcalc.train.optimizers import KFAC, fisher_root_columns

    rng = np.random.default_rng(3)
    for classes in (2, 10):
        z = rng.normal(size=(classes, 6)) * 3
        z[0, 0] = 40.0  # p nearly one-hot in the first sample
        p = np.exp(z - z.max(axis=0))
        p = (p / p.sum(axis=0)).astype(dtype)
        columns = fisher_root_columns(p)
        assert len(columns) == classes - 1 and all(c.dtype == dtype for c in columns)
        S = np.stack(columns, axis=1)
        F = np.stack([np.diag(q) - np.outer(q, q) for q in p.T.astype(np.float64)], axis=2)
        np.testing.assert_allclose(np.einsum("cjb,djb->cdb", S, S), F, atol=1e-6 if dtype == np.float32 else 1e-15)
    net, X, _ = _tiny(batch=7)
    factors = KFAC(fisher="exact")._statistics(net, X)
    Z, inputs = net.forward(X)
    p = np.exp(Z - Z.max(axis=0))
    p /= p.sum(axis=0)
    for dropped in (False, True):
        seeds = [(p - np.eye(len(p))[:, [c]]) * np.sqrt(p[c]) / X.shape[1] for c in range(len(p) - dropped)]
        adjoints = [net.adjoints(inputs, seed) for seed in seeds]
        for position, (_, G) in factors.items():
            expected = sum(a[position] @ a[position].T for a in adjoints) * X.shape[1]
            assert np.allclose(G, expected, rtol=1e-12, atol=1e-15) != dropped


@pytest.mark.parametrize("fisher", ["mc", "exact"])
def test_kfac_trains_digits_to_95_percent(fisher):
    net = Network("64-128-sigmoid-10", seed=0)
    result = train(net, D.digits(), make_optimizer("kfac", fisher=fisher), epochs=8, batch_size=64)
    assert max(row["test_accuracy"] for row in result["history"]) >= 0.95, result["history"]


def test_bfgs_inverse_update_satisfies_the_secant_equation():
    from mcalc.train.optimizers import bfgs_inverse_update

    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 5))
    H = a @ a.T + np.eye(5)
    s, y = rng.normal(size=(5, 1)), rng.normal(size=(5, 1))
    y = y if (s.T @ y).item() > 0 else -y
    H_new = bfgs_inverse_update(H, s, y)
    np.testing.assert_allclose(H_new @ y, s, atol=1e-10)
    np.testing.assert_allclose(H_new, H_new.T, atol=1e-12)
    assert np.linalg.eigvalsh(H_new).min() > 0
    assert bfgs_inverse_update(H, s, -y) is H  # no curvature along s: H kept


def test_double_damping_guarantees_positive_curvature():
    """Powell (s moved towards Hy while sᵀy ≤ μ₁ yᵀHy), then Levenberg–Marquardt (y moved towards s while
    sᵀy ≤ μ₂ sᵀs): afterwards sᵀy ≥ μ₂ sᵀs > 0; pairs that need neither are kept as they are."""
    from mcalc.train.optimizers import double_damping

    rng = np.random.default_rng(1)
    H = np.eye(4) * 2.0
    damped = 0
    for _ in range(40):
        s, y = rng.normal(size=(4, 1)), rng.normal(size=(4, 1))
        s2, y2 = double_damping(H, s, y, 0.2, 0.5)
        assert (s2.T @ y2).item() >= 0.5 * (s2.T @ s2).item() - 1e-12
        sy = (s.T @ y).item()
        if sy > 0.2 * (y.T @ H @ y).item() and sy > 0.5 * (s.T @ s).item():
            assert s2 is s and y2 is y
        else:
            damped += 1
    assert damped > 10


def test_double_damping_of_a_pair_without_change_divides_by_nothing():
    """y = 0 (the gradients did not change: a layer whose units are all dead) makes Powell's θ 0/0; s = 0 too
    makes the Levenberg–Marquardt θ 0/0. Powell's part is skipped, Levenberg–Marquardt's gives y = μ₂ s
    (curvature μ₂ along s), and with s = 0 the BFGS update keeps H: no ZeroDivisionError, nothing
    non-finite."""
    from mcalc.train.optimizers import bfgs_inverse_update, double_damping

    H, s, zero = np.eye(3) * 2.0, np.array([[1.0], [-2.0], [0.5]]), np.zeros((3, 1))
    s2, y2 = double_damping(H, s, zero, 0.2, 0.5)
    np.testing.assert_array_equal(s2, s)
    np.testing.assert_allclose(y2, 0.5 * s)
    s3, y3 = double_damping(H, zero, zero, 0.2, 0.5)
    assert not s3.any() and not y3.any()
    assert bfgs_inverse_update(H, s3, y3) is H


def test_kbfgs_first_step_against_the_dense_kronecker_computation():
    from mcalc.train.optimizers import KBFGS

    net, X, Y = _tiny(batch=8)
    _, grads, _ = net.backward(X, Y)
    optimizer = KBFGS(lr=0.3, damping=0.3)
    updates = optimizer.step(net, grads, {}, (X, Y))
    _, inputs = net.forward(X)
    for position, layer in enumerate(net.layers):
        if not layer.params:
            continue
        a = np.vstack([inputs[position], np.ones((1, 8))])
        H_a = np.linalg.inv(a @ a.T / 8 + np.sqrt(0.3) * np.eye(len(a)))  # H_g = I at the first step
        W, b = layer.params["W"], layer.params["b"]
        # the momentum m = 0.1 (∇ + τθ) after one step (the authors' momentum_gradient_rho = 0.9, τ = 1e-5)
        gradient = 0.1 * (np.hstack([grads[W], grads[b]]) + 1e-5 * np.hstack([net.params[W], net.params[b]]))
        expected = -0.3 * np.kron(H_a.T, np.eye(gradient.shape[0])) @ gradient.reshape(-1, order="F")
        got = np.hstack([updates[layer.params["W"]], updates[layer.params["b"]]]).reshape(-1, order="F")
        np.testing.assert_allclose(got, expected, atol=1e-12)
    assert all(np.linalg.eigvalsh(H).min() > 0 for H in optimizer.H_g.values())  # kept positive definite


def test_kbfgs_trains_digits_to_95_percent():
    net = Network("64-128-sigmoid-10", seed=0)
    result = train(net, D.digits(), make_optimizer("kbfgs"), epochs=15, batch_size=64)
    assert max(row["test_accuracy"] for row in result["history"]) >= 0.95, result["history"]


def test_cli_hbp_newton_solver_options(tmp_path, capsys):
    from mcalc import cli

    out = tmp_path / "eigen.json"
    assert cli.main(["train", "--optimizer", "hbp-newton", "--solver", "eigen", "--refresh", "3", "--epochs", "1",
                     "--json", str(out)]) == 0
    assert json.loads(out.read_text())["history"][0]["test_accuracy"] > 0.8
    assert cli.main(["train", "--optimizer", "hbp-newton", "--refresh", "0", "--epochs", "1"]) == 2
    assert "--refresh must be a positive integer, not 0" in capsys.readouterr().err


def _user_modules(tmp_path):
    """Code for examples/custom_layers.py's RMSNorm, Swish and LowRank, generated into a folder of the test's."""
    from mcalc.codegen.generate import generate
    from mcalc.codegen.store import load_code
    from mcalc.user_modules import load_modules

    modules = {m.name: m for m in load_modules(ROOT / "examples" / "custom_layers.py")}
    chosen = [modules[name] for name in ("RMSNorm", "Swish", "LowRank")]
    generate(chosen, ["numpy"], tmp_path)
    return {m.name: load_code(m, "numpy", tmp_path) for m in chosen}


def test_a_spec_binds_a_modules_own_dimensions_once_and_its_signal_flattens(tmp_path, monkeypatch):
    """A binding of a dimension the module does not have, or of one twice, is refused by name; an
    elementwise module of a convolution's signal may be followed by flatten, as a built-in activation may."""
    monkeypatch.setenv("MCALC_CACHE", str(tmp_path / "cache"))
    code = _user_modules(tmp_path)
    with pytest.raises(mc.McalcError, match="module 'LowRank' has no dimension 'q'; its dimensions are m, n, r"):
        Network("5-LowRank(m=4, q=2)-3", code=code)
    with pytest.raises(mc.McalcError, match=r"LowRank\(…\) binds 'r' twice"):
        Network("5-LowRank(m=4, r=2, r=3)-3", code=code)
    net = Network("1x6-conv(2,3)-Swish-flatten-3", code=code)
    assert net.forward(np.random.default_rng(0).normal(size=(6, 4)))[0].shape == (3, 4)


def test_a_network_of_user_modules_has_the_gradients_and_curvature_of_its_loss(tmp_path):
    """A user's modules by name in the spec, dimensions bound there; gradients against finite differences of
    the loss, the Hessian-vector product against finite differences of the gradients, and the HBP blocks
    of a user module's parameter (eq. (6), exact, B = 1) against the dense Hessian of the loss."""
    code = _user_modules(tmp_path)
    net = Network("5-RMSNorm-LowRank(m=4, r=2)-tanh-Swish-3", code=code, seed=1)
    assert [layer.module for layer in net.layers] == ["RMSNorm", "LowRank", "Tanh", "Swish", "Linear"]
    assert net.widths == [5, 5, 4, 4, 3] and net.params["RMSNorm1.g"].tolist() == [[1.0]] * 5  # a gain starts at 1
    rng = np.random.default_rng(2)
    net.params = {k: v + 0.3 * rng.normal(size=v.shape) for k, v in net.params.items()}
    X, Y = rng.normal(size=(5, 1)), np.eye(3)[:, [1]]
    _, grads, blocks = net.backward(X, Y, "exact")
    flat = net.flat(net.params)
    loss = lambda v: net.loss(X, Y, net.unflat(v))  # noqa: E731
    h, n = 1e-6, flat.size
    numeric = np.array([(loss(flat + h * e) - loss(flat - h * e)) / (2 * h) for e in np.eye(n)])
    np.testing.assert_allclose(net.flat(grads), numeric, rtol=1e-6, atol=1e-8)
    hessian = np.zeros((n, n))
    for i, e in enumerate(np.eye(n)):
        for sign in (1, -1):
            net.params = net.unflat(flat + sign * h * e)
            hessian[:, i] += sign * net.flat(net.backward(X, Y)[1]) / (2 * h)
    net.params = net.unflat(flat)
    hessian = (hessian + hessian.T) / 2
    v = rng.normal(size=n)
    np.testing.assert_allclose(net.flat(net.curvature_product(X, Y, "hessian")(net.unflat(v))), hessian @ v,
                               rtol=1e-4, atol=1e-6)
    where = {name: slice(start, start + value.size) for name, value, start in
             zip(net.params, net.params.values(), np.cumsum([0] + [a.size for a in net.params.values()]))}
    for name in ("RMSNorm1.g", "Swish4.beta", "LowRank2.R"):
        rows, cols = net.params[name].shape
        block = hessian[where[name], where[name]]  # row-major flat; the block is column-stacking vec
        order = np.arange(rows * cols).reshape(rows, cols).reshape(-1, order="F")
        np.testing.assert_allclose(blocks[name].to_dense(), block[np.ix_(order, order)], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "hbp-newton", "kfac", "kbfgs", "hf-gn", "hf-newton"])
def test_every_optimizer_trains_a_network_of_user_modules(tmp_path, optimizer):
    code = _user_modules(tmp_path)
    data = D.load_dataset("synthetic", seed=0)
    net = Network(f"{data.features}-RMSNorm-32-relu-Swish-{data.classes}", code=code, seed=0)
    result = train(net, data, make_optimizer(optimizer), epochs=3, batch_size=64, seed=0)
    # learnt: better than chance; the training loss below chance's at some epoch (hf-newton's swings by ±0.3
    # from epoch to epoch here, with either of its negative-curvature policies)
    assert result["history"][-1]["test_accuracy"] > 0.5
    assert min(h["train_loss"] for h in result["history"]) < np.log(data.classes)


@pytest.mark.parametrize("optimizer", ["kfac", "kbfgs"])
def test_kronecker_factored_optimizers_step_user_parameters_by_their_blocks(tmp_path, optimizer):
    """K-FAC and K-BFGS factor the Linear layers; a user's module's parameters step by (C + λI)⁻¹ of their
    Gauss–Newton HBP blocks (here RMSNorm's gain: its first step against that solve, by hand)."""
    code = _user_modules(tmp_path)
    net = Network("5-RMSNorm-3", code=code, seed=0)
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(5, 8)), np.eye(3)[:, rng.integers(0, 3, 8)]
    opt = make_optimizer(optimizer, **({"lr": 0.5, "momentum": 0.0} if optimizer == "kfac" else {"momentum": 0.0}))
    opt.prepare(net, X)
    assert opt.block_params == ["RMSNorm1.g"]
    assert opt.curvature_request() == ("ggn", "6-kfac", frozenset({"RMSNorm1.g"}))
    _, grads, blocks = net.backward(X, Y, *opt.curvature_request())
    step = opt.step(net, grads, blocks, (X, Y))
    g = grads["RMSNorm1.g"] + (opt.weight_decay * net.params["RMSNorm1.g"] if optimizer == "kbfgs" else 0)
    solve = np.linalg.solve(blocks["RMSNorm1.g"].to_dense() + opt.damping * np.eye(5), g)
    rate = 0.5 if optimizer == "kfac" else opt.lr
    np.testing.assert_allclose(step["RMSNorm1.g"], -rate * solve, rtol=1e-10)
    assert np.abs(solve).max() > 1e-3


def test_a_request_for_some_blocks_carries_no_curvature_below_their_lowest_layer():
    """K-FAC's request names the parameters its own factors do not cover (an attention's): the pass forms
    their blocks, and those of the layers above, as the full pass does, and no curvature below them (the
    attention's input block, E[Jᵢᵀ 𝓗z Jᵢ] over per-sample Jacobians, is the costliest part of its pass)."""
    net = Network("1x12-conv(4,3,pad=1)-relu-attention(2)-flatten-10", seed=0)
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(12, 6)), np.eye(10)[:, rng.integers(0, 10, 6)]
    kfac = make_optimizer("kfac")
    kfac.prepare(net, X)
    request = kfac.curvature_request()
    assert request.parameters == {"attention1.Q", "attention1.K", "attention1.V"}
    loss, grads, blocks = net.backward(X, Y, *request)
    full_loss, full_grads, full = net.backward(X, Y, request.curvature, request.approximation)
    assert "conv1.K" in full and not any(name.startswith("conv") for name in blocks)
    assert set(blocks) == {name for name in full if not name.startswith("conv")}
    assert loss == full_loss and all(np.array_equal(grads[k], full_grads[k]) for k in full_grads)
    for name in blocks:
        np.testing.assert_array_equal(blocks[name].to_dense(), full[name].to_dense())
    assert np.abs(blocks["attention1.Q"].to_dense()).max() > 1e-6


def test_a_module_dimension_its_input_does_not_fix_must_be_bound(tmp_path):
    code = _user_modules(tmp_path)
    with pytest.raises(mc.McalcError, match=r"dimension 'r' is not fixed by its input; .*LowRank\(r=32\)"):
        Network("5-LowRank(m=3)-2", code=code)


def test_a_run_whose_output_goes_to_a_file_shows_its_steps_in_lines(monkeypatch):
    """Off a terminal the bar is a line to standard error at most every ``interval`` seconds, each with the
    steps done and the seconds; none once the run is done (the epoch's own line says that)."""
    import io

    from mcalc.train import progress

    stream = io.StringIO()
    clock = iter(float(t) for t in [0, 10, 31, 40, 70, 95, 200])
    lines = progress.ProgressLines(6, "kfac", interval=30, stream=stream, clock=lambda: next(clock))
    for _ in range(6):
        lines.update()
    assert stream.getvalue().splitlines() == ["kfac: step 2 of 6 (33%), 31 s", "kfac: step 4 of 6 (67%), 70 s"]
    monkeypatch.setattr(progress.sys, "stderr", io.StringIO())  # not a terminal
    assert isinstance(progress.progress_bar(10, "sgd"), progress.ProgressLines)
