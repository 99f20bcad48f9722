"""Each second-order optimiser's steps against a transcription of its reference, and the shared safeguards.

- K-BFGS: the authors' algorithm (``kbfgs_utils.py``, ``training_function.py``, ``training_utils.py`` of
  Goldfarb, Ren & Bahamou's public code) transcribed with torch's autograd for every gradient.
- K-FAC: kfac-jax's quadratic model (``Optimizer._solve_quad_model``, ``_compute_new_damping_and_rho``)
  with a dense Gauss–Newton matrix.
- Hessian-free: Martens' ``conjgrad`` (kept iterates, preconditioner), CG-backtracking and line search,
  measured on the training set and curved on the mini-batch as his ``nnet_train_2.m`` does.
- Safeguards: each one removed makes a test here fail (restored state, trust bound, damping raised,
  singular solves, the eigen solver's amplification floor, auto's safety test).
"""
import math
import warnings

import numpy as np
import pytest

import mcalc as mc
from mcalc.runtime.blocks import CurvatureBlock
from mcalc.train import data as D
from mcalc.train.block_solvers import DampedBlockSolver, conjugate_gradient
from mcalc.train.network import Network
from mcalc.train.optimizer_protocol import Optimizer
from mcalc.train.optimizers import KBFGS, KFAC, HBPNewton, quadratic_model_coefficients
from mcalc.train.safeguards import LevenbergMarquardt, damped_solve, reduction_ratio
from mcalc.train.trainer import step_is_rejected, train


def _batches(rng, n=4, classes=3, batch=8, count=3):
    return [(rng.normal(size=(n, batch)), np.eye(classes)[:, rng.integers(classes, size=batch)])
            for _ in range(count)]


# --- K-BFGS -----------------------------------------------------------------------------------------
def _kbfgs_reference(params, X_train, batches, lr=0.3, lam=0.3, tau=1e-5):
    """The authors' K-BFGS on a tanh network, transcribed: torch computes every forward and backward pass."""
    import torch

    W = [torch.tensor(params["W1"]), torch.tensor(params["W2"])]
    b = [torch.tensor(params["b1"][:, 0]), torch.tensor(params["b2"][:, 0])]
    L = 2

    def forward(X, W, b):
        h, a = [X.T], []  # h: each layer's input (samples in rows, as theirs); a: pre-activations
        for layer in range(L):
            pre = h[-1] @ W[layer].T + b[layer]
            if pre.requires_grad:
                pre.retain_grad()
            a.append(pre)
            if layer + 1 < L:
                h.append(torch.tanh(pre))
        return a[-1], a, h

    def loss_of(z, Y):
        return -(Y.T * torch.log_softmax(z, dim=1)).sum(dim=1).mean()

    def homogeneous(h):
        return torch.cat([h, torch.ones(h.shape[0], 1, dtype=h.dtype)], dim=1)

    def bfgs(H, s, y, g):  # get_BFGS_formula
        sy = s @ y
        if sy <= 0 or sy <= 1e-4 * (s @ s) * torch.sqrt(g @ g):
            return H
        rho = 1 / sy
        Hy = H @ y
        return H + (rho**2 * (y @ Hy) + rho) * torch.outer(s, s) - rho * (torch.outer(s, Hy) + torch.outer(Hy, s))

    _, _, h0 = forward(torch.tensor(X_train), W, b)
    A = [homogeneous(h).T @ homogeneous(h) / h.shape[0] for h in h0]  # the pass over the training data
    eps = math.sqrt(lam)
    H_g = [torch.eye(len(bl), dtype=torch.float64) for bl in b]
    H_a: list = [None, None]
    m = [torch.zeros_like(w) for w in W] + [torch.zeros_like(bl) for bl in b]
    s_avg = [torch.zeros(len(bl), dtype=torch.float64) for bl in b]
    y_avg = [torch.zeros(len(bl), dtype=torch.float64) for bl in b]
    for i, (X_np, Y_np) in enumerate(batches):
        X, Y = torch.tensor(X_np), torch.tensor(Y_np)
        N = X.shape[1]
        Wr = [w.clone().requires_grad_(True) for w in W]
        br = [bl.clone().requires_grad_(True) for bl in b]
        z, a, h = forward(X, Wr, br)
        loss_of(z, Y).backward()
        grads = [w.grad + tau * w.detach() for w in Wr] + [bl.grad + tau * bl.detach() for bl in br]
        m = [0.9 * mi + 0.1 * gi for mi, gi in zip(m, grads)]  # momentum_gradient_rho = 0.9
        A_LM, p = [], []
        for layer in range(L):
            if i > 0:
                hh = homogeneous(h[layer].detach())
                A[layer] = 0.9 * A[layer] + 0.1 * hh.T @ hh / N
            A_LM.append(A[layer] + eps * torch.eye(len(A[layer]), dtype=torch.float64))
            if i == 0:
                H_a[layer] = torch.linalg.inv(A_LM[layer])
            homo = torch.cat([m[layer], m[L + layer][:, None]], dim=1)
            p.append(-(H_g[layer] @ homo @ H_a[layer]))
        W_new = [W[layer] + lr * p[layer][:, :-1] for layer in range(L)]
        b_new = [b[layer] + lr * p[layer][:, -1] for layer in range(L)]
        Wr2 = [w.clone().requires_grad_(True) for w in W_new]
        br2 = [bl.clone().requires_grad_(True) for bl in b_new]
        z2, a2, _ = forward(X, Wr2, br2)
        loss_of(z2, Y).backward()
        for layer in range(L):
            grad_before, grad_after = N * a[layer].grad, N * a2[layer].grad
            s = a[layer].detach().mean(0) - a2[layer].detach().mean(0)
            y = grad_before.mean(0) - grad_after.mean(0)
            s_avg[layer] = 0.9 * s_avg[layer] + 0.1 * s
            y_avg[layer] = 0.9 * y_avg[layer] + 0.1 * y
            s, y = s_avg[layer], y_avg[layer]
            Hy = H_g[layer] @ y  # Powell, μ₁ = 0.2
            if not (s @ y) / (y @ Hy) > 0.2:
                theta = 0.8 * (y @ Hy) / ((y @ Hy) - (s @ y))
                s = theta * s + (1 - theta) * Hy
            if not (s @ y) / (s @ s) > eps:  # Levenberg–Marquardt, μ₂ = √λ
                theta = (1 - eps) * (s @ s) / ((s @ s) - (s @ y))
                y = theta * y + (1 - theta) * s
            H_g[layer] = bfgs(H_g[layer], s, y, grad_before.mean(0))
            mean_h = torch.cat([h[layer].detach().mean(0), torch.ones(1, dtype=torch.float64)])  # the paper's ā
            s_h = H_a[layer] @ mean_h
            H_a[layer] = bfgs(H_a[layer], s_h, A_LM[layer] @ s_h, mean_h)
        W, b = W_new, b_new
    return {"W1": W[0].numpy(), "W2": W[1].numpy(), "b1": b[0].numpy()[:, None], "b2": b[1].numpy()[:, None]}


def test_kbfgs_steps_follow_the_authors_algorithm():
    rng = np.random.default_rng(0)
    net = Network("4-5-tanh-3", seed=0)
    X_train = rng.normal(size=(4, 30))
    batches = _batches(rng)
    expected = _kbfgs_reference(net.params, X_train, batches)
    optimizer = KBFGS(lr=0.3)  # the demo's learning rate, as the transcription
    optimizer.prepare(net, X_train)
    for X, Y in batches:
        _, grads, _ = net.backward(X, Y)
        updates = optimizer.step(net, grads, {}, (X, Y))
        net.params = {k: v + updates[k] for k, v in net.params.items()}
    assert not np.allclose(optimizer.H_g[0], np.eye(5))  # the BFGS updates really ran
    for name, value in expected.items():
        np.testing.assert_allclose(net.params[name], value, rtol=1e-9, atol=1e-12)


def test_a_rejected_kbfgs_step_restarts_its_quasi_newton_matrices():
    """mcalc's safeguard after a rejected step: λ doubled and H_a = (Ā + √(2λ) I)⁻¹, H_g = I on the next
    step. Keeping the matrices (λ alone steers neither) repeats the rejected step: with the convolutions'
    gradient changes summed over the positions, MNIST-1D's ConvBase froze at epoch 19 (every step rejected,
    λ → 10¹¹⁶); with the restart it trained on to 0.940."""
    rng = np.random.default_rng(0)
    net = Network("4-5-tanh-3", seed=0)
    X_train = rng.normal(size=(4, 30))
    optimizer = KBFGS(lr=0.3)
    optimizer.prepare(net, X_train)
    for X, Y in _batches(rng):
        _, grads, _ = net.backward(X, Y)
        net.params = net.params_plus(optimizer.step(net, grads, {}, (X, Y)))
    assert not np.allclose(optimizer.H_g[0], np.eye(5))
    optimizer.reject()
    X, Y = _batches(rng)[0]
    _, grads, _ = net.backward(X, Y)
    A = {position: a.copy() for position, a in optimizer.A.items()}
    updates = optimizer.step(net, grads, {}, (X, Y))
    a = np.vstack([X, np.ones((1, X.shape[1]))])
    A0 = 0.9 * A[0] + 0.1 * a @ a.T / X.shape[1]  # Ā averaged with this batch, then damped with 2λ
    direction = -np.hstack([optimizer.m["W1"], optimizer.m["b1"]]) @ np.linalg.inv(A0 + np.sqrt(0.6) * np.eye(5))
    np.testing.assert_allclose(np.hstack([updates["W1"], updates["b1"]]), 0.3 * direction, rtol=1e-10)
    assert optimizer.damping == pytest.approx(0.6)


# --- K-FAC ------------------------------------------------------------------------------------------
def test_quadratic_model_coefficients_minimise_the_model():
    rng = np.random.default_rng(1)
    v = rng.normal(size=(2, 6))
    C = rng.normal(size=(6, 6))
    C = C @ C.T
    g = rng.normal(size=6)
    A, D, b = v @ C @ v.T, v @ v.T, v @ g
    w, change = quadratic_model_coefficients(A, D, b, 0.5, (None, None))
    np.testing.assert_allclose((A + 0.5 * D) @ w + b, 0, atol=1e-12)  # the model's gradient vanishes
    assert change == pytest.approx(0.5 * np.array(w) @ A @ np.array(w) + np.array(w) @ b)
    w, _ = quadratic_model_coefficients(A, D, b, 0.5, (-0.1, None))  # the learning rate fixed
    assert w[0] == -0.1 and w[1] == pytest.approx(-(b[1] + (A + 0.5 * D)[0, 1] * -0.1) / (A + 0.5 * D)[1, 1])
    w, _ = quadratic_model_coefficients(A[:1, :1], D[:1, :1], b[:1], 0.5, (None,))
    assert w[0] == pytest.approx(-b[0] / (A[0, 0] + 0.5 * D[0, 0]))


def test_a_previous_update_parallel_to_the_new_direction_gets_the_least_norm_minimiser():
    """Two vectors along one direction (a step repeated from the same weights) make the 2 × 2 model
    singular: the step is still the model's minimiser along it, not a LinAlgError."""
    rng = np.random.default_rng(2)
    u = rng.normal(size=6)
    v = np.stack([u, u])  # exactly singular: NumPy's solve raises
    C = rng.normal(size=(6, 6))
    C = C @ C.T
    g = rng.normal(size=6)
    A, D, b = v @ C @ v.T, v @ v.T, v @ g
    w, _ = quadratic_model_coefficients(A, D, b, 0.5, (None, None))
    step = np.array(w) @ v
    best = -(u @ g) / (u @ C @ u + 0.5 * u @ u) * u  # the damped model's minimiser along u
    np.testing.assert_allclose(step, best, rtol=1e-10)
    assert w[0] == pytest.approx(w[1])  # the least-norm pair


def _dense_gn(net, X, Y):
    names = list(net.params)
    sizes = [net.params[n].size for n in names]

    def unflat(v):
        out, start = {}, 0
        for n, size in zip(names, sizes):
            out[n] = v[start:start + size].reshape(net.params[n].shape)
            start += size
        return out

    product = net.curvature_product(X, Y, "gn")
    n = sum(sizes)
    C = np.stack([np.concatenate([product(unflat(e))[k].reshape(-1) for k in names]) for e in np.eye(n)], axis=1)
    return C, names, unflat


def test_kfac_steps_take_the_quadratic_models_learning_rate_and_momentum_and_adapt_the_damping():
    """kfac-jax: δ = w₀ P∇ + w₁ δ_prev with w minimising the damped model with the exact GGN; λ adapted by
    ρ every ``damping_period`` steps (1 here), by the factor ω^period."""
    rng = np.random.default_rng(2)
    net = Network("4-5-sigmoid-3", seed=1)
    kfac = KFAC(fisher="exact", damping_period=1, inverse_period=1)
    previous = None
    for X, Y in _batches(rng, count=2):
        C, names, unflat = _dense_gn(net, X, Y)
        loss, grads, _ = net.backward(X, Y)
        damping = kfac.damping
        updates = kfac.step(net, grads, {}, (X, Y))
        g = np.concatenate([grads[k].reshape(-1) for k in names])
        natural = []  # P∇ from the factors, independently: (Ā + π√λ I)⁻¹ ⊗ (G + √λ/π I)⁻¹ on vec[∇W ∇b]
        for position, (A, G) in kfac.factors.items():
            W, b = net.layers[position].params["W"], net.layers[position].params["b"]
            pi = np.sqrt((np.trace(A) / len(A)) / (np.trace(G) / len(G)))
            F = np.kron(A + pi * np.sqrt(damping) * np.eye(len(A)), G + np.sqrt(damping) / pi * np.eye(len(G)))
            joined = np.hstack([grads[W], grads[b]])
            natural.append((W, b, np.linalg.solve(F, joined.reshape(-1, order="F")).reshape(joined.shape, order="F")))
        P = {}
        for W, b, d in natural:
            P[W], P[b] = d[:, :-1], d[:, -1:]
        vectors = [np.concatenate([P[k].reshape(-1) for k in names])]
        if previous is not None:
            vectors.append(previous)
        V = np.stack(vectors)
        A_model, D_model, b_model = V @ C @ V.T, V @ V.T, V @ g
        w = -np.linalg.solve(A_model + damping * D_model, b_model)
        delta = w @ V
        got = np.concatenate([updates[k].reshape(-1) for k in names])
        np.testing.assert_allclose(got, delta, rtol=1e-8, atol=1e-12)
        new_loss = net.loss(X, Y, {k: net.params[k] + u for k, u in unflat(delta).items()})
        rho = (new_loss - loss) / (0.5 * w @ A_model @ w + w @ b_model)
        factor = 0.95
        expected = damping / factor if rho < 0.25 else damping * factor if rho > 0.75 else damping
        assert kfac.damping == pytest.approx(max(expected, kfac.min_damping))
        net.params = {k: v + updates[k] for k, v in net.params.items()}
        previous = delta
    assert len(vectors) == 2  # the second step had a momentum term


# --- Hessian-free ------------------------------------------------------------------------------------
def test_preconditioned_cg_keeps_martens_iterates_and_solves_the_system():
    from mcalc.train.hessian_free import truncated_cg

    rng = np.random.default_rng(3)
    a = rng.normal(size=(40, 40))
    A, b = a @ a.T + 0.1 * np.eye(40), rng.normal(size=40)
    M = np.diag(A) ** 0.75
    result = truncated_cg(lambda v: A @ v, b, np.zeros(40), max_iterations=300, tolerance=1e-10,
                          progress_tolerance=0, preconditioner=M)
    np.testing.assert_allclose(result.x, np.linalg.solve(A, b), atol=1e-6)
    kept = [math.ceil(5 * 1.3**k) for k in range(30)]
    assert result.counts[:-1] == sorted(set(c for c in kept if c < result.counts[-1]))[:len(result.counts) - 1]
    plain = truncated_cg(lambda v: A @ v, b, np.zeros(40), max_iterations=300, tolerance=1e-10, progress_tolerance=0)
    assert result.iterations < plain.iterations  # the Jacobi-type preconditioner helps on this matrix


def test_hessian_free_backtracks_to_an_earlier_cg_iterate_and_tests_every_step_length():
    """A loss that grows along the last CG iterates makes CG-backtracking take an earlier one; a loss that
    never falls along d makes the line search reject the step (rate 0), having tested the last rate too."""
    from mcalc.train.hessian_free import HessianFree

    rng = np.random.default_rng(4)
    net = Network("4-5-sigmoid-3", seed=2)
    X, Y = _batches(rng, count=1)[0]
    _, grads, _ = net.backward(X, Y)
    chosen = HessianFree(damping=1e-3, min_damping=0.0)
    chosen.step(net, grads, {}, (X, Y))
    full = HessianFree(damping=1e-3, min_damping=0.0, backtrack=False)
    full.step(net, grads, {}, (X, Y))
    assert chosen.cg_steps[0] <= full.cg_steps[0]

    calls = []

    class Rising:  # the network, but its loss rises with every step, whatever its direction
        def __getattr__(self, name):
            return getattr(net, name)

        def loss(self, X, Y, params=None):
            if params is None:
                return 1.0
            calls.append(1)
            return 2.0

    rejecting = HessianFree(line_search_steps=3, backtrack=False)
    updates = rejecting.step(Rising(), grads, {}, (X, Y))
    assert all(not np.any(u) for u in updates.values())
    assert len(calls) == 1 + 3  # d itself, then three shorter steps, each tested


def test_hessian_free_measures_on_the_training_set_and_curves_on_the_mini_batch(monkeypatch):
    """Martens' ``nnet_train_2.m``: the gradient, its per-sample squares (the preconditioner), CG-backtracking
    and the line search on the whole training set; the Gauss–Newton products and ρ on the mini-batch (his
    chunk), ρ's model with the training set's gradient. Transcribed with the chunk's dense Gauss–Newton
    matrix and a gradient per training sample; measured on the mini-batch instead, the step differs."""
    from mcalc.train import hessian_free
    from mcalc.train.hessian_free import HessianFree
    from mcalc.train.optimizer_protocol import MiniBatch

    rng = np.random.default_rng(7)
    net = Network("4-5-sigmoid-3", seed=3)
    X_all, Y_all = _batches(rng, batch=40, count=1)[0]
    X, Y = X_all[:, :8], Y_all[:, :8]  # the chunk: a part of the training set, as Martens' is
    flat, unflat = net.flat, net.unflat
    n = flat(net.params).size
    G = np.stack([flat(net.curvature_product(X, Y, "gn")(unflat(e))) for e in np.eye(n)], axis=1)
    per_sample = np.array([flat(net.backward(X_all[:, [i]], Y_all[:, [i]])[1]) for i in range(40)])
    g, squares = per_sample.mean(axis=0), (per_sample**2).mean(axis=0)
    _, grads, _ = net.backward(X, Y)
    assert np.linalg.norm(flat(grads) - g) > 0.2 * np.linalg.norm(g)  # the chunk's gradient is another

    seen, cg = {}, hessian_free.truncated_cg
    monkeypatch.setattr(hessian_free, "truncated_cg", lambda matvec, b, x0, **options: seen.update(
        b=b, preconditioner=options["preconditioner"]) or cg(matvec, b, x0, **options))
    damping = 2.0
    options = dict(damping=damping, cg_iterations=500, cg_tolerance=1e-12, backtrack=False)
    hf = HessianFree(**options)
    step = flat(hf.step(net, grads, {}, MiniBatch(net, X, Y, training=MiniBatch(net, X_all, Y_all))))
    np.testing.assert_allclose(seen["b"], -g, atol=1e-12)
    np.testing.assert_allclose(seen["preconditioner"], (squares + damping) ** 0.75, rtol=1e-10)
    d = np.linalg.solve(G + damping * np.eye(n), -g)
    on = lambda X, Y, v: net.loss(X, Y, {k: net.params[k] + u for k, u in unflat(v).items()})  # noqa: E731
    # the line search: the first of 1, 0.8, 0.64, … that meets Armijo's condition on the training set
    rate = next(0.8**k for k in range(61) if on(X_all, Y_all, 0.8**k * d) <= net.loss(X_all, Y_all)
                + 1e-2 * 0.8**k * g @ d)
    np.testing.assert_allclose(step, rate * d, atol=1e-8)
    rho = (on(X, Y, d) - net.loss(X, Y)) / (g @ d + 0.5 * d @ G @ d)
    assert hf.ratios == [pytest.approx(rho)]
    assert hf.min_damping == 0.0  # Martens' λ has no floor

    batch_only = HessianFree(**options, measured_on="batch")
    other = flat(batch_only.step(net, grads, {}, MiniBatch(net, X, Y, training=MiniBatch(net, X_all, Y_all))))
    assert np.linalg.norm(other - step) > 0.2 * np.linalg.norm(step) and batch_only.min_damping == 0.6
    np.testing.assert_allclose(seen["b"], -flat(grads), atol=1e-12)

    sizes = []  # with CG-backtracking: every loss with a step on the training set but ρ's one on the chunk
    loss = Network.loss
    monkeypatch.setattr(Network, "loss", lambda self, X, Y, params=None: sizes.append(
        (X.shape[1], params is not None)) or loss(self, X, Y, params))
    HessianFree(damping=damping).step(net, grads, {}, MiniBatch(net, X, Y, training=MiniBatch(net, X_all, Y_all)))
    assert sizes.count((8, True)) == 1 and sizes.count((40, True)) >= 2 and len(sizes) == sizes.count((40, True)) + 2
    with pytest.raises(mc.McalcError, match="measured_on is 'training-set' or 'batch'"):
        HessianFree(measured_on="chunk")


def _indefinite_problem():
    """A tiny tanh network and a batch where its Hessian is indefinite: the net, the batch, the gradients and
    the dense Hessian and Gauss–Newton matrix."""
    rng = np.random.default_rng(4)
    net = Network("4-5-tanh-3", seed=2)
    batch = _batches(rng, count=1)[0]
    _, grads, _ = net.backward(*batch)
    n = net.flat(net.params).size
    dense = {m: np.stack([net.flat(net.curvature_product(*batch, m)(net.unflat(e))) for e in np.eye(n)], axis=1)
             for m in ("hessian", "gn")}
    return net, batch, grads, dense


def _assert_damped_step(step, C, damping, g):
    """The step is α (C + λI)⁻¹(−g) with 0 < α ≤ 1 (CG's progress test ends it near the solution)."""
    d = np.linalg.solve(C + damping * np.eye(len(g)), -g)
    alpha = float(step @ d / (d @ d))
    assert np.linalg.norm(step - alpha * d) < 1e-3 * np.linalg.norm(alpha * d) and 0 < alpha <= 1 + 1e-9


def test_hessian_free_raises_the_damping_until_the_hessian_system_is_positive_definite():
    """Where C + λI is indefinite, CG meets negative curvature; λ is then raised (C's curvature along that
    direction, damped, becomes the λ the step began with) and CG run again, until it meets none: the step
    solves (C + λ*I) d = −g with C + λ*I positive definite. A fixed λ is raised for the step only."""
    from mcalc.train.hessian_free import HessianFree

    net, batch, grads, dense = _indefinite_problem()
    lowest = np.linalg.eigvalsh(dense["hessian"])[0]
    start = 0.01
    assert lowest + start < -0.01  # the damped Hessian really is indefinite: CG meets negative curvature
    options = dict(matrix="hessian", damping=start, cg_iterations=500, cg_tolerance=1e-12, min_damping=0.0,
                   backtrack=False, precondition=False, warm_start=0.0, negative_curvature="raise")
    fixed = HessianFree(**options, adapt_damping=False)
    fixed.step(net, grads, {}, batch)
    assert fixed.damping == start  # raised for this step only
    raised = HessianFree(**options, adapt_damping=True, damping_raises=20)
    updates = raised.step(net, grads, {}, batch)
    rho = raised.ratios[0]
    damping = raised.damping / (1.5 if rho < 0.25 else 2 / 3 if rho > 0.75 else 1)  # before the LM update
    assert damping + lowest > 0 and damping > start
    _assert_damped_step(net.flat(updates), dense["hessian"], damping, net.flat(grads))


def test_hf_newton_takes_the_gauss_newton_step_where_the_hessian_system_is_indefinite():
    """hf-newton's default: where CG on H + λI meets negative curvature, the step solves (G + λI) d = −g with
    the Gauss–Newton matrix G, λ unraised; where H + λI is positive definite, the step is the Newton one."""
    from mcalc.train.hessian_free import HessianFree

    net, batch, grads, dense = _indefinite_problem()
    lowest = np.linalg.eigvalsh(dense["hessian"])[0]
    assert lowest + 0.01 < -0.01 < lowest + 5  # indefinite at λ = 0.01, not at 5
    assert np.abs(dense["hessian"] - dense["gn"]).max() > 0.1  # the two steps differ
    for damping, matrix in ((0.01, "gn"), (5.0, "hessian")):
        hf = HessianFree(matrix="hessian", damping=damping, cg_iterations=500, cg_tolerance=1e-12,
                         min_damping=0.0, backtrack=False, precondition=False, warm_start=0.0, adapt_damping=False)
        step = net.flat(hf.step(net, grads, {}, batch))
        assert hf.damping == damping
        _assert_damped_step(step, dense[matrix], damping, net.flat(grads))
    with pytest.raises(mc.McalcError, match="negative_curvature is 'gauss-newton' or 'raise'"):
        HessianFree(negative_curvature="saddle-free")


# --- shared safeguards ---------------------------------------------------------------------------------
def test_levenberg_marquardt_rule_and_reduction_ratio():
    rule = LevenbergMarquardt(1.0, minimum=0.5, maximum=2.0)
    assert rule.update(0.1) == 1.5 and rule.update(float("nan")) == 2.0  # capped at the maximum
    assert rule.update(0.5) == 2.0 and rule.update(0.9) == pytest.approx(4 / 3)
    assert LevenbergMarquardt(0.6, minimum=0.5).update(0.9) == 0.5
    assert reduction_ratio(1.0, 0.5, -1.0) == 0.5
    assert reduction_ratio(1.0, math.inf, -1.0) == -math.inf and reduction_ratio(1.0, 0.5, 0.0) == -math.inf


def test_a_singular_solve_falls_back_to_a_damped_one_with_a_warning():
    singular = np.array([[1.0, 1.0], [1.0, 1.0]])
    with pytest.warns(RuntimeWarning, match="kfac factor A0 was singular"):
        x = damped_solve(singular, np.array([1.0, 1.0]), np, what="kfac factor A0")
    assert np.all(np.isfinite(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_allclose(damped_solve(np.eye(2) * 2, np.ones(2), np), [0.5, 0.5])
    with pytest.raises(mc.McalcError, match="stays singular"):
        damped_solve(np.full((2, 2), np.nan), np.ones(2), np)


def test_a_failed_eigen_decomposition_leaves_the_block_to_cg_with_a_warning():
    import mcalc.train.block_solvers as solvers

    rng = np.random.default_rng(7)
    block = CurvatureBlock(dense=np.diag([1.0, 2.0, 3.0]))
    g = rng.normal(size=(3, 1))
    solver = DampedBlockSolver(method="eigen", tolerance=1e-12)
    real = solvers.factor_eigh
    solvers.factor_eigh = lambda factor: np.linalg.eigh(np.full((3, 3), np.nan))  # LinAlgError: no convergence
    try:
        with pytest.warns(RuntimeWarning, match="eigen-decomposition of b's factors failed"):
            out = solver.solve([("b", g, block)], alpha=0.02)
    finally:
        solvers.factor_eigh = real
    assert solver.states["b"].basis is None and solver.needs_curvature()
    np.testing.assert_allclose(out["b"][:, 0], -np.linalg.solve(0.02 * np.eye(3) + 0.98 * block.dense, g[:, 0]))


class _Overshooting(Optimizer):
    """A second-order optimiser whose steps blow the loss up; its state counts the steps it took."""

    second_order = True

    def __init__(self):
        self.taken, self.damping, self.rejections = [], 1.0, 0

    def step(self, net, grads, blocks, batch=None):
        self.taken.append(len(self.taken))
        return {name: 50.0 * g / self.damping for name, g in grads.items()}

    def reject(self):
        self.rejections += 1
        self.damping *= 2


def test_rejected_steps_restore_the_weights_and_the_optimizers_state_and_raise_its_damping():
    net = Network("64-10", seed=0)
    before = {k: v.copy() for k, v in net.params.items()}
    optimizer = _Overshooting()
    result = train(net, D.digits(), optimizer, epochs=1, batch_size=512)
    rejected = result["final"]["rejected_steps"]
    assert rejected >= 1 and optimizer.rejections == rejected
    assert len(optimizer.taken) == 3 - rejected  # the state of each rejected step was rolled back
    assert optimizer.damping == 2.0**rejected
    if rejected == 3:
        for name, value in net.params.items():
            np.testing.assert_array_equal(value, before[name])


def test_the_trust_bound_applies_to_second_order_optimisers_only():
    updates = {"W": np.ones(2)}
    assert step_is_rejected(_Overshooting(), 1.0, 2.5, updates, np)
    assert not step_is_rejected(_Overshooting(), 1.0, 1.5, updates, np)
    assert not step_is_rejected(Optimizer(), 1.0, 2.5, updates, np)  # sgd, adam: only non-finite steps
    assert step_is_rejected(Optimizer(), 1.0, float("nan"), updates, np)
    assert step_is_rejected(Optimizer(), 1.0, 1.0, {"W": np.array([np.inf])}, np)


def test_the_eigen_solver_amplifies_no_direction_more_than_cg_would():
    """A near-null eigenvalue: the exact damped solve would amplify it 1/α = 50×; the eigen solver keeps
    every direction's gain within CG's (the Ritz values' Σ 1/θ)."""
    rng = np.random.default_rng(5)
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    C = q @ np.diag([0.0, 1e-4, 0.5, 1, 2, 4, 8, 16]) @ q.T
    block = CurvatureBlock(dense=C)
    g = q @ np.array([[0.05], [0.05], [1], [-1], [1], [1], [-1], [1]])  # little of it along the null directions
    solver = DampedBlockSolver(method="eigen")
    first = solver.solve([("b", g, block)], alpha=0.02)  # CG, measuring the gain
    gain = solver.states["b"].gain
    cg = conjugate_gradient(lambda v: 0.02 * v + 0.98 * C @ v, -g[:, 0], 0.1, 50)
    np.testing.assert_allclose(first["b"][:, 0], cg.x)
    second = solver.solve([("b", g, None)], alpha=0.02)["b"]
    gains = np.abs(q.T @ second[:, 0]) / np.abs(q.T @ g[:, 0])
    assert gains.max() <= gain * (1 + 1e-9) < 50
    assert gains[0] == pytest.approx(gain)  # the null direction is floored, not amplified 50×


def test_auto_keeps_cg_when_stale_eigenbases_deviate_from_it():
    """auto: eigenbases only when they give CG's directions on the renewal's fresh blocks."""
    rng = np.random.default_rng(6)
    g = {"b": rng.normal(size=(6, 1))}
    steady = CurvatureBlock(dense=np.diag(np.linspace(1.0, 3.0, 6)))
    solver = DampedBlockSolver(method="auto", refresh=1, tolerance=1e-10, max_iterations=100)
    solver._eigen_is_cheaper = lambda parts: True  # the cost model out of the way: safety decides
    solver.solve([("b", g["b"], steady)], alpha=0.02)
    solver.solve([("b", g["b"], steady)], alpha=0.02)
    assert solver.using_eigen  # the same curvature again: the basis is as good as CG
    moved = CurvatureBlock(dense=np.diag(np.linspace(30.0, 0.01, 6)))
    solver.solve([("b", g["b"], moved)], alpha=0.02)
    assert not solver.using_eigen and solver.needs_curvature()  # stale: back to CG, with the blocks each step


def test_hbp_newton_raises_alpha_when_the_model_overpromises_and_keeps_the_papers_alpha_otherwise():
    net = Network("64-128-sigmoid-10", seed=0)
    data = D.digits()
    optimizer = HBPNewton()
    train(net, data, optimizer, epochs=1, batch_size=64)
    assert optimizer.alpha == pytest.approx(0.02)  # on digits the paper's α is never raised for long
    bad = HBPNewton(lr=30.0)  # far too long steps: ρ < 1/4
    X, Y = data.x_train[:64].T, np.eye(10)[:, data.y_train[:64]]
    _, grads, blocks = net.backward(X, Y, bad.curvature)
    bad.step(net, grads, blocks, (X, Y))
    assert bad.alpha == pytest.approx(0.03)
    with pytest.raises(mc.McalcError, match="alpha"):
        HBPNewton(alpha=0.0)
