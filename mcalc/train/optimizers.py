"""Optimisers: momentum SGD, Adam, the HBP Newton step of eq. (8) per block, K-FAC and K-BFGS."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import McalcError
from ..modes import Approximation, Curvature, CurvatureMatrix
from ..runtime.array_ops import side_by_side, softmax
from ..runtime.blocks import CurvatureBlock, namespace, row_groups
from ..runtime.patch_gram import patch_gram, prefer_shifted
from .block_solvers import DampedBlockSolver, conjugate_gradient
from .distributed import DataParallel
from .network import Layer, Network
from .optimizer_protocol import CurvatureRequest, MiniBatch, Optimizer
from .safeguards import LevenbergMarquardt, damped_solve, reduction_ratio

DENSE_BLOCK_SOLVE = 1024  # the largest block solved densely; a larger one by CG through its matvec


def factored_layers(net: Network) -> list[int]:
    """The positions of the layers a Kronecker-factored optimiser (kfac, kbfgs) factors as [W b] against its
    inputs: Linear layers and convolutions (their patches)."""
    return [position for position, layer in enumerate(net.layers)
            if layer.module == "Linear" or layer.window is not None]


def block_parameters(net: Network) -> list[str]:
    """The parameters of the other layers (a user's LayerNorm gain, say): what a Kronecker-factored
    optimiser steps through HBP blocks instead."""
    factored = set(factored_layers(net))
    return [name for position, layer in enumerate(net.layers) if position not in factored
            for name in layer.params.values()]


def weight_and_bias(layer: Layer) -> tuple[str, str]:
    """The network's names of a factored layer's weight (a Linear layer's W, a convolution's K) and bias."""
    return layer.params["W" if "W" in layer.params else "K"], layer.params["b"]


def factor_inputs(layer: Layer, inputs: Any, xp: Any, mean_patch: bool = False, cache: dict | None = None) -> Any:
    """ã = [a; 1] of a factored layer from its inputs: a column per sample (a Linear layer) or per patch (a
    convolution), or with ``mean_patch`` each sample's mean patch (K-FAC-reduce's); ``cache``, the layer's
    for the batch, as :meth:`Layer.takes` keeps it."""
    a = inputs if layer.window is None else layer.patches(inputs, cache)
    if mean_patch and layer.window is not None:
        a = a.reshape(a.shape[0], inputs.shape[1], -1).mean(axis=2)
    return with_bias_row(a, xp)


def input_factor(layer: Layer, inputs: Any, xp: Any, mean_patch: bool = False, cache: dict | None = None,
                 with_mean: bool = False, batch: int = 0) -> Any:
    """Ā = E[ã ãᵀ] over the columns of :func:`factor_inputs` (a convolution's patches as more samples, KFC's
    eq. (32); or each sample's mean patch); with ``with_mean`` also their mean ā (a column). A stride-1
    convolution's Ā comes from shifted products of its input where that is cheaper than syrk of its
    patches (:mod:`~mcalc.runtime.patch_gram`); its ā is then Ā's bias column, E[ã · 1]. ``batch``: the
    global batch the choice is made for (else this one), so that every rank chooses as one process."""
    if layer.window is not None and not mean_patch:
        kernel, stride, padding, dilation, size = layer.window
        x = layer.takes(inputs, cache)  # (channels, B, positions)
        if prefer_shifted(x.shape[0], batch or x.shape[1], kernel, stride, padding, dilation, size,
                          "numpy" if xp is np else "cupy"):
            gram = patch_gram(x, kernel, padding, dilation, size)
            A = gram / gram[-1, -1]  # its corner counts the patches
            return (A, A[:, -1:]) if with_mean else A
    a = factor_inputs(layer, inputs, xp, mean_patch, cache)
    A = a @ a.T / a.shape[1]
    return (A, a.mean(axis=1, keepdims=True)) if with_mean else A


def damped_block_directions(names: list[str], vectors: dict[str, Any], blocks: dict[str, CurvatureBlock],
                            damping: float, xp: Any) -> dict[str, Any]:
    """(C + λI)⁻¹ v for each named parameter, C its HBP block: eq. (8) with the optimiser's damping as the
    Tikhonov term, for the parameters its Kronecker factors do not cover. A dense solve up to
    :data:`DENSE_BLOCK_SOLVE` entries, CG through the block's matvec beyond."""
    out = {}
    for name in names:
        v, block = vectors[name], blocks[name]
        flat = v.reshape(-1, order="F")  # blocks act on column-stacking vec (S.1)
        if flat.size <= DENSE_BLOCK_SOLVE:
            dense = block.to_dense() + damping * xp.eye(flat.size, dtype=flat.dtype)
            solution = damped_solve(dense, flat, xp, what=f"the block of {name}")
        else:
            solution = conjugate_gradient(lambda u: block.matvec(u) + damping * u, flat, 1e-6, 250).x  # noqa: B023
        out[name] = solution.reshape(v.shape, order="F")
    return out


def heavy_ball(velocity: dict[str, Any], name: str, direction: Any, momentum: float) -> Any:
    """v ← μ v + direction for parameter ``name``, kept in ``velocity``; returns v."""
    v = momentum * velocity.get(name, 0.0) + direction
    velocity[name] = v
    return v


def with_bias_row(a: Any, xp: Any) -> Any:
    """ã = [a; 1]: a linear layer's inputs with the row its bias multiplies."""
    return xp.concatenate([a, xp.ones((1, a.shape[1]), dtype=a.dtype)])


def joined(grads: dict[str, Any], W: str, b: str, xp: Any) -> Any:
    """∇[W b]: a linear layer's weight and bias gradients side by side."""
    return xp.concatenate([grads[W], grads[b]], axis=1)


def split_joined(direction: Any, W: str, b: str) -> tuple[tuple[str, Any], tuple[str, Any]]:
    """The weight and bias parts of a direction for [W b]."""
    return (W, direction[:, :-1]), (b, direction[:, -1:])


@dataclass
class SGD(Optimizer):
    """θ ← θ − γ v, v ← μ v + δθ (heavy-ball momentum)."""

    lr: float = 0.1
    momentum: float = 0.9
    velocity: dict[str, Any] = field(default_factory=dict)

    def step(self, net: Network, grads: dict[str, Any], blocks: dict[str, CurvatureBlock],
             batch: tuple[Any, Any] | None = None) -> dict[str, Any]:
        updates = {}
        for name, g in grads.items():
            updates[name] = -self.lr * heavy_ball(self.velocity, name, g, self.momentum)
        return updates


@dataclass
class Adam(Optimizer):
    """Kingma & Ba (2015) with bias correction."""

    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    t: int = 0
    m: dict[str, Any] = field(default_factory=dict)
    v: dict[str, Any] = field(default_factory=dict)

    def step(self, net: Network, grads: dict[str, Any], blocks: dict[str, CurvatureBlock],
             batch: tuple[Any, Any] | None = None) -> dict[str, Any]:
        self.t += 1
        updates = {}
        for name, g in grads.items():
            self.m[name] = self.beta1 * self.m.get(name, 0.0) + (1 - self.beta1) * g
            self.v[name] = self.beta2 * self.v.get(name, 0.0) + (1 - self.beta2) * g * g
            m_hat = self.m[name] / (1 - self.beta1**self.t)
            v_hat = self.v[name] / (1 - self.beta2**self.t)
            updates[name] = -self.lr * m_hat / (net.xp.sqrt(v_hat) + self.eps)
        return updates


@dataclass
class HBPNewton(Optimizer):
    """Eq. (8): [α I + (1 − α) 𝓗̄θ] Δθ = −δθ per block, then θ ← θ + γ Δθ.

    Defaults are the paper's Section 4: α = 0.02, ε_CG = 0.1, n_CG = 50, γ = 0.1,
    PCH-abs curvature, truncated CG on every step's blocks; but the batch rule is mcalc's: the
    paper uses (7b) and (7a) (``approximation='7'``), ``'auto'`` takes (6) wherever it has a closed
    batch form, which kept every cell of ``benchmarks/robustness.py`` within 0.03 of sgd and adam
    where (7) fell short in 5 of 27 (MNIST-1D's ReLU and tanh networks; README). ``split`` divides each
    parameter row-wise into that many independent sub-blocks (Section 4). ``solver``:
    ``'cg'`` (the paper's); ``'eigen'`` solves in the eigenbases of each block's
    Kronecker factors, averaged over renewals (decay ``decay``) and renewed with the
    curvature every ``refresh`` steps (a basis that still diagonalises its averaged
    factor to ``basis_tolerance`` only gets new eigenvalues); ``'auto'`` takes the
    eigenbases where a cost model says they are cheaper and they prove as safe as CG
    (:class:`.block_solvers.DampedBlockSolver`).

    ``adapt_damping`` (mcalc's own; the paper keeps α fixed): on the steps that have their
    blocks, α follows the Levenberg–Marquardt rule on the reduction ratio of the block
    model q(Δ) = γ δᵀΔ + ½ γ² Σ_blocks Δᵀ𝓗̄Δ, ×3/2 below 1/4 and ×2/3 above 3/4, kept in
    [``alpha_min`` (the paper's 0.02 by default), 1]; a step the training loop rejects doubles it.
    Where the paper's α works, ρ stays high and α stays at the paper's value.
    """

    lr: float = 0.1
    alpha: float = 0.02
    cg_tolerance: float = 0.1
    cg_iterations: int = 50
    curvature: Curvature = Curvature.PCH_ABS
    approximation: Approximation = Approximation.AUTO  # (6) wherever it has a closed batch form (mcalc's)
    split: int = 1
    solver: str = "cg"
    refresh: int = 5
    decay: float = 0.8
    basis_tolerance: float = 0.2
    adapt_damping: bool = True
    alpha_min: float | None = None
    block_solver: DampedBlockSolver = field(init=False)
    second_order = True

    def __post_init__(self) -> None:
        self.curvature, self.approximation = Curvature.parse(self.curvature), Approximation.parse(self.approximation)
        if self.solver not in ("auto", "cg", "eigen"):
            raise McalcError(f"unknown solver '{self.solver}'; choose auto, cg or eigen")
        if self.refresh < 1:
            raise McalcError(f"refresh must be a positive integer, not {self.refresh}")
        if self.split < 1:
            raise McalcError(f"split must be a positive integer, not {self.split}")
        if not 0 <= self.decay < 1:
            raise McalcError(f"decay must lie in [0, 1), not {self.decay}")
        if not 0 < self.alpha <= 1:
            raise McalcError(f"alpha must lie in (0, 1], not {self.alpha}")
        self.alpha_min = self.alpha if self.alpha_min is None else self.alpha_min
        self.block_solver = DampedBlockSolver(
            method=self.solver, refresh=self.refresh, decay=self.decay, tolerance=self.cg_tolerance,
            max_iterations=self.cg_iterations, basis_tolerance=self.basis_tolerance)

    def curvature_request(self) -> CurvatureRequest | None:
        """The blocks of eq. (8), unless stored eigenbases serve every block at the next step."""
        return CurvatureRequest(self.curvature, self.approximation) if self.block_solver.needs_curvature() else None

    def step(self, net: Network, grads: dict[str, Any], blocks: dict[str, CurvatureBlock],
             batch: tuple[Any, Any] | None = None) -> dict[str, Any]:
        parts, rows_of = [], {}
        for name, g in grads.items():
            block = blocks.get(name)
            if self.split == 1:
                parts.append((name, g, block))
                continue
            rows_of[name] = row_groups(g.shape[0], self.split, net.xp)
            subs = block.split_rows(g.shape[0], self.split) if block is not None else [None] * self.split
            parts.extend(((name, i), g[rows], sub) for i, (rows, sub) in enumerate(zip(rows_of[name], subs)))
        products: dict[Any, Any] = {}  # C Δ of the blocks CG solved, for the reduction ratio's model
        directions = self.block_solver.solve(parts, self.alpha, net.parallel, products)
        updates = {}
        for name, g in grads.items():
            if self.split == 1:
                updates[name] = self.lr * directions[name]
                continue
            delta = g * 0
            for i, rows in enumerate(rows_of[name]):
                delta[rows] = directions[(name, i)]
            updates[name] = self.lr * delta
        if self.adapt_damping and batch is not None and all(block is not None for _, _, block in parts):
            self._adapt(net, batch, parts, directions, updates, products)
        return updates

    def _adapt(self, net: Network, batch: MiniBatch | tuple[Any, Any],
               parts: list[tuple[Any, Any, CurvatureBlock | None]], directions: dict[Any, Any],
               updates: dict[str, Any], products: dict[Any, Any]) -> None:
        """α by the Levenberg–Marquardt rule on the reduction ratio of the block-diagonal model, whose C Δ
        ``products`` holds where CG gave it (else one matvec of the block)."""
        model = 0.0
        for key, g, block in parts:
            d = directions[key]
            curved = products[key] if key in products else block.matvec(d.reshape(-1, order="F"))
            model += self.lr * float((g * d).sum()) + 0.5 * self.lr**2 * float(d.reshape(-1, order="F") @ curved)
        batch = MiniBatch.of(net, batch)
        rho = reduction_ratio(batch.loss(), batch.loss(updates), model)
        self.alpha = LevenbergMarquardt(self.alpha, minimum=self.alpha_min, maximum=1.0).update(rho)

    def reject(self) -> None:
        """After a rejected step: α doubled (at most 1, where eq. (8) is a gradient step)."""
        self.alpha = min(1.0, 2 * self.alpha)


def fisher_root_columns(p: Any) -> list[Any]:
    """The C − 1 columns of S, per sample, with S Sᵀ = diag(p) − p pᵀ (softmax cross-entropy's Fisher at the
    logits, of rank C − 1), each (C, B) for p (C, B): exact-Fisher K-FAC's seeds, one backward pass each.

    R = diag(√p) − p √pᵀ is a C-column root with R √p = 0, the seeds (p − e_c)√p_c up to sign; S = R Q with Q
    the columns of the Householder reflection H (H √p = e_k, k the least likely class) other than k, an
    orthonormal basis of √p's complement, so S Sᵀ = R (I − √p √pᵀ) Rᵀ = R Rᵀ: column j is R e_j +
    √p_j/(1 − √p_k) R e_k (1 − √p_k ≥ 1 − 1/√C, never near 0). The factors every column's gradients sum
    to are R Rᵀ's, from one backward pass fewer (BackPACK's KFLR and mcalc before it made C)."""
    xp = namespace(p)
    classes, samples = p.shape
    r = xp.sqrt(p)
    R = (xp.eye(classes, dtype=p.dtype)[:, :, None] - p[:, None, :]) * r[None, :, :]  # (C, C, B): R e_j, sample i
    k = xp.argmin(p, axis=0)
    every = xp.arange(samples)
    S = R + R[:, k, every][:, None, :] * (r / (1 - r[k, every]))[None, :, :]
    others = xp.arange(classes - 1)[:, None]
    kept = others + (others >= k[None, :])  # (C − 1, B): the columns j ≠ k of each sample
    S = xp.take_along_axis(S, kept[None, :, :], axis=1)
    return [S[:, j, :] for j in range(classes - 1)]


def quadratic_model_coefficients(A: Any, D: Any, b: Any, damping: float,
                                 fixed: tuple[float | None, ...]) -> tuple[list[float], float]:
    """The coefficients w of the update Σ wᵢ vᵢ that minimise the quadratic model
    q(w) = ½ wᵀ (A + λ D) w + bᵀ w, with A = [vᵢᵀ C vⱼ], D = [vᵢᵀ vⱼ], b = [gᵀ vᵢ]; a coefficient given in
    ``fixed`` is kept. Returns w and the undamped change ½ wᵀ A w + bᵀ w.

    A transcription of kfac-jax's ``Optimizer._solve_quad_model`` (``kfac_jax/_src/optimizer.py``) for one
    or two vectors (the preconditioned gradient and the previous update); as there, a last vector that is
    zero (no previous update yet) gets the coefficient 0.
    """
    A, D, b = np.asarray(A, dtype=float), np.asarray(D, dtype=float), np.asarray(b, dtype=float)
    damped = A + damping * D
    n = len(b)
    if all(c is None for c in fixed):
        w = np.zeros(n)
        size = n - 1 if n == 2 and damped[1, 1] == 0 else n  # psd_solve_maybe_zero_last_idx
        if damped[0, 0] == 0 and b[0] == 0:
            w[:size] = -b[:size]
        else:
            w[:size] = _minimiser(damped[:size, :size], b[:size])
    elif all(c is not None for c in fixed):
        w = np.asarray(fixed, dtype=float)
    else:  # exactly one of two adapted
        index = fixed.index(None)
        w = np.asarray([0.0 if c is None else c for c in fixed])
        w[index] = -(b[index] + damped[1 - index, index] * w[1 - index]) / damped[index, index] \
            if damped[index, index] != 0 else 0.0
    return [float(x) for x in w], float(0.5 * w @ A @ w + w @ b)


def _minimiser(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The w that minimises ½ wᵀAw + bᵀw for a positive semi-definite A: −A⁻¹b, or, where A is singular
    (the preconditioned gradient parallel to the previous update, so that both span one direction), the
    least-norm minimiser −A⁺b (kfac-jax's ``jnp.linalg.solve`` would give NaNs there)."""
    try:
        w = -np.linalg.solve(A, b)
    except np.linalg.LinAlgError:
        w = None
    if w is None or not np.isfinite(w).all():
        w = -np.linalg.lstsq(A, b, rcond=None)[0]
    return w


def _inner(a: dict[str, Any], b: dict[str, Any]) -> float:
    """⟨a, b⟩ summed over every parameter."""
    return sum(float((a[k] * b[k]).sum()) for k in a)


@dataclass
class KFAC(Optimizer):
    """K-FAC (Martens & Grosse 2015) as kfac-jax implements it (``kfac_jax/_src/optimizer.py``, with the
    settings of its ``examples/classifier_mnist/pipeline.py``).

    Per linear layer F ≈ Ā ⊗ G with Ā = E[ã ãᵀ], ã = [a; 1], G = E[g gᵀ], g the per-sample gradient
    of the log-likelihood at the layer's output: ``fisher='mc'`` samples one label per input from the
    model's softmax (kfac-jax's ``fisher_gradients``), ``'exact'`` sums over the classes weighted by
    their probabilities (as C − 1 backward passes, the columns of the Fisher's root at the logits:
    :func:`fisher_root_columns`). Per convolution the same with its T positions as more samples (KFC, Grosse &
    Martens 2016, eqs. (32)–(33); K-FAC-expand in Eschenhagen et al. 2023, curvlinops' and kfac-jax's
    convolution blocks): Ā = E[Σₜ ãₜ ãₜᵀ]/T over the patches ãₜ = [uₜ; 1] and G = E[Σₜ gₜ gₜᵀ] over the
    output positions' gradients; or, with ``kfac_approx='reduce'`` (Eschenhagen et al.'s K-FAC-reduce),
    the positions summed out first: Ā = E[ā āᵀ] of the mean patch ā = Σₜ ãₜ/T and G = E[ḡ ḡᵀ] of
    ḡ = Σₜ gₜ (BackPACK's convolution output factor). Every step:

    - the factors are averaged with decay ε = min(1 − 1/k, ``decay``) at step k (Martens & Grosse,
      Section 5);
    - every ``inverse_period`` steps the damped inverses are renewed, with factored Tikhonov damping
      (Ā + π√λ I)⁻¹ and (G + √λ/π I)⁻¹, π = √((tr Ā/dim Ā)/(tr G/dim G)) (Section 6.3);
    - the update δ = w₀ P∇ + w₁ δ_prev, P∇ = (G + √λ/π I)⁻¹ ∇[W b] (Ā + π√λ I)⁻¹, takes the learning
      rate w₀ and momentum w₁ that minimise the quadratic model with the exact Gauss–Newton matrix of
      the mini-batch, applied through :meth:`Network.curvature_product` (Section 7;
      :func:`quadratic_model_coefficients`); a given ``lr`` (``momentum``) fixes −w₀ (w₁) instead;
    - every ``damping_period`` steps λ is adapted by the reduction ratio, by the factor
      ``damping_decay``^``damping_period`` (thresholds 1/4, 3/4), kept in [``min_damping``,
      ``max_damping``] (Section 6.5; kfac-jax's ``_compute_new_damping_and_rho``).

    The parameters of a user's modules, which no Linear factor covers, are preconditioned by their
    Gauss–Newton HBP blocks, (C + λI)⁻¹ ∇ (eq. (8) with K-FAC's λ; mcalc's extension), inside the same
    quadratic model.

    Defaults: kfac-jax's example (decay 0.95, max 1000, periods 5), but for two of mcalc's own, for
    mini-batches (kfac-jax's examples adapt on the full batch, and its README advises against these
    adaptive options for stochastic optimisation): λ₀ = 1, not 150, since from 150 the adaptation
    needs ~100 steps (four epochs of digits: 0.90 test accuracy where λ₀ = 1 gives 0.97 on a deep ReLU
    network); and λ ≥ 10⁻², not 10⁻⁵, since ρ measured on the mini-batch the model was fitted to is
    optimistic, and without a floor λ fell to 10⁻⁵ and MNIST-1D training came apart (test accuracy
    0.65 → 0.39 in five epochs).
    """

    lr: float | None = None
    momentum: float | None = None
    damping: float = 1.0
    decay: float = 0.95
    inverse_period: int = 5
    damping_period: int = 5
    damping_decay: float = 0.95
    min_damping: float = 1e-2
    max_damping: float = 1000.0
    fisher: str = "mc"
    kfac_approx: str = "expand"  # a convolution's factors: K-FAC-expand (KFC's) or K-FAC-reduce
    seed: int = 0
    steps: int = 0
    factors: dict[int, tuple[Any, Any]] = field(default_factory=dict)
    inverses: dict[int, tuple[Any, Any]] = field(default_factory=dict)
    velocity: dict[str, Any] = field(default_factory=dict)  # the previous update δ
    rng: np.random.Generator | None = None  # the labels' sampler (part of the state a checkpoint keeps)
    block_params: list[str] = field(default_factory=list)  # stepped by eq. (8) blocks (prepare)
    second_order = True

    def __post_init__(self) -> None:
        if self.fisher not in ("mc", "exact"):
            raise McalcError(f"unknown Fisher '{self.fisher}'; choose mc or exact")
        if self.kfac_approx not in ("expand", "reduce"):
            raise McalcError(f"unknown K-FAC approximation '{self.kfac_approx}'; choose expand or reduce")
        if self.inverse_period < 1 or self.damping_period < 1:
            raise McalcError("kfac: inverse_period and damping_period must be positive")

    def prepare(self, net: Network, X_train: Any) -> None:
        """The parameters its factors do not cover: a user's modules', stepped through their HBP blocks."""
        self.block_params = block_parameters(net)

    def curvature_request(self) -> CurvatureRequest | None:
        """The Gauss–Newton blocks (K-FAC's curvature, the Fisher of a softmax cross-entropy) of the
        parameters outside Linear layers and convolutions, Kronecker-factored; none when its own factors
        cover every parameter."""
        return CurvatureRequest(Curvature.GGN, Approximation.KRONECKER_FACTORED,
                                frozenset(self.block_params)) if self.block_params else None

    @property
    def _factor(self) -> float:
        """What λ is multiplied or divided by at an adaptation."""
        return self.damping_decay**self.damping_period

    def _statistics(self, net: Network, X: Any) -> dict[int, tuple[Any, Any]]:
        xp = net.xp
        caches: list[dict] = [{} for _ in net.layers]  # one forward pass: its masks and patches serve every pass back
        Z, inputs = net.forward(X, caches=caches, matrices=True)
        B = X.shape[1]
        p = softmax(Z)  # the model's predictive distribution, from the same forward pass
        if self.fisher == "mc":  # one label per input drawn from softmax(z); δz = (p − y)/B for the mean loss
            self.rng = self.rng or np.random.default_rng(self.seed)
            cumulative = np.cumsum(np.asarray(p.get() if hasattr(p, "get") else p), axis=0)
            # drawn for the global batch and cut to this rank's shard, so that the ranks draw what one process would
            draws = net.parallel.local(self.rng.random(net.parallel.batch or B))
            labels = np.minimum((draws[None, :] > cumulative).sum(axis=0), p.shape[0] - 1)
            seeds = [p - xp.asarray(np.eye(p.shape[0], dtype=p.dtype)[:, labels])]  # in p's type: float32 stays so
        else:  # every class, weighted by its probability: the Fisher's root, C − 1 columns
            seeds = fisher_root_columns(p)
        out: dict[int, tuple[Any, Any]] = {}
        for position in factored_layers(net):  # a convolution's expand: positions as more samples, Σₜ ãₜ ãₜᵀ / T
            out[position] = (input_factor(net.layers[position], inputs[position], xp, cache=caches[position],
                                          mean_patch=self.kfac_approx == "reduce", batch=net.parallel.batch), 0)
        for seed in seeds:  # a backward pass per column of the Fisher's root at the logits
            adjoints = net.adjoints(inputs, seed / B, caches, matrices=True)
            for position in out:
                g = adjoints[position]  # δZ carried 1/B: B g, the per-sample gradients, a column each (or (rows, B, T))
                if net.layers[position].output_rows is not None:  # a convolution's (rows, B, T): reduce sums
                    g = g.sum(axis=2) if self.kfac_approx == "reduce" else side_by_side(g)  # the positions
                A, G = out[position]
                out[position] = (A, G + (g @ g.T) * B)  # (B g)(B g)ᵀ / B, B g never made
        # the means over every rank's shard of the batch
        means = net.parallel.mean({f"{factor}{position}": value for position, (A, G) in out.items()
                                   for factor, value in (("A", A), ("G", G))}, B)
        return {position: (means[f"A{position}"], means[f"G{position}"]) for position in out}

    def _invert(self, xp: Any, parallel: DataParallel) -> None:
        """The damped factors' inverses, factored Tikhonov damping (Martens & Grosse, eq. (S.13)); on several
        ranks each inverse is made by the rank its n³ assigns it and all-reduced to every rank (KAISA's
        sharing of the inverses, Pauloski et al. 2021)."""
        root = self.damping**0.5
        damped = []  # (name, matrix): every layer's A and G, damped
        for position, (A, G) in self.factors.items():
            pi = float(xp.sqrt((xp.trace(A) / A.shape[0]) / (xp.trace(G) / G.shape[0])))
            if not math.isfinite(pi) or pi <= 0:
                pi = 1.0
            damped += [(f"A{position}", A + pi * root * xp.eye(A.shape[0], dtype=A.dtype)),
                       (f"G{position}", G + root / pi * xp.eye(G.shape[0], dtype=G.dtype))]

        def inverted(job: int) -> dict[str, Any]:
            name, m = damped[job]
            return {"inverse": damped_solve(m, xp.eye(m.shape[0], dtype=m.dtype), xp, what=f"kfac factor {name}")}

        shared = parallel.share([float(m.shape[0]) ** 3 for _, m in damped], inverted,
                                lambda job: {"inverse": damped[job][1] * 0})
        inverses = {name: done["inverse"] for (name, _), done in zip(damped, shared)}
        self.inverses = {position: (inverses[f"A{position}"], inverses[f"G{position}"]) for position in self.factors}

    def step(self, net: Network, grads: dict[str, Any], blocks: dict[str, CurvatureBlock],
             batch: tuple[Any, Any] | None = None) -> dict[str, Any]:
        if batch is None:
            raise McalcError("kfac needs the mini-batch to estimate its Kronecker factors")
        xp = net.xp
        X, Y = batch
        epsilon = min(1 - 1 / (self.steps + 1), self.decay)
        for position, (A, G) in self._statistics(net, X).items():
            if position in self.factors:
                A0, G0 = self.factors[position]
                A, G = epsilon * A0 + (1 - epsilon) * A, epsilon * G0 + (1 - epsilon) * G
            self.factors[position] = (A, G)
        if self.steps % self.inverse_period == 0:
            self._invert(xp, net.parallel)
        natural: dict[str, Any] = {}
        for position, (A_inverse, G_inverse) in self.inverses.items():
            W, b = weight_and_bias(net.layers[position])
            natural.update(split_joined(G_inverse @ joined(grads, W, b, xp) @ A_inverse, W, b))
        natural.update(damped_block_directions(self.block_params, grads, blocks, self.damping, xp))
        vectors = [natural] + ([self.velocity] if self.velocity else [])
        product = net.curvature_product(X, Y, CurvatureMatrix.GAUSS_NEWTON)
        curved = [product(v) for v in vectors]
        A_model = [[_inner(v, c) for c in curved] for v in vectors]
        D_model = [[_inner(v, u) for u in vectors] for v in vectors]
        b_model = [_inner(grads, v) for v in vectors]
        fixed = (None if self.lr is None else -self.lr, self.momentum)[:len(vectors)]
        w, model_change = quadratic_model_coefficients(A_model, D_model, b_model, self.damping, fixed)
        updates = {name: sum(c * v[name] for c, v in zip(w, vectors)) for name in natural}
        if (self.steps + 1) % self.damping_period == 0:
            batch = MiniBatch.of(net, batch)
            rho = reduction_ratio(batch.loss(), batch.loss(updates), model_change)
            self.damping = LevenbergMarquardt(self.damping, 1 / self._factor, self._factor, minimum=self.min_damping,
                                              maximum=self.max_damping).update(rho)
        self.velocity = updates
        self.steps += 1
        return updates

    def reject(self) -> None:
        """After a rejected step: λ raised by one adaptation's factor (kfac-jax's step rejection)."""
        self.damping = min(self.max_damping, self.damping / self._factor)


def bfgs_inverse_update(H: Any, s: Any, y: Any, g: Any | None = None) -> Any:
    """H⁺ = (I − ρ s yᵀ) H (I − ρ y sᵀ) + ρ s sᵀ, ρ = 1/(sᵀy): H⁺ y = s.

    Skipped (H kept), as in the K-BFGS authors' ``get_BFGS_formula`` (``kbfgs_utils.py``), when
    sᵀy ≤ 0, when sᵀy ≤ 10⁻⁴ sᵀs ‖g‖ for the gradient ``g`` it belongs to, or when H⁺ is not finite.
    """
    xp = namespace(H)
    sy = (s.T @ y).item()
    if sy <= 0 or (g is not None and sy <= 1e-4 * (s.T @ s).item() * math.sqrt((g.T @ g).item())):
        return H
    rho = 1.0 / sy
    Hy = H @ y
    updated = H + (rho * rho * (y.T @ Hy).item() + rho) * (s @ s.T) - rho * (s @ Hy.T + Hy @ s.T)
    return updated if bool(xp.isfinite(updated).all()) else H


def double_damping(H: Any, s: Any, y: Any, mu1: float, mu2: float) -> tuple[Any, Any]:
    """Powell's damping in the inverse form, then the Levenberg–Marquardt part, as the K-BFGS
    authors' ``kron_bfgs_update_damping`` applies them (``kbfgs_utils.py``; the paper's Section 3.2):

    - if sᵀy < μ₁ yᵀHy: s ← θ s + (1 − θ) H y, θ = (1 − μ₁) yᵀHy / (yᵀHy − sᵀy) (Powell);
    - if sᵀy < μ₂ sᵀs: y ← θ y + (1 − θ) s, θ = (1 − μ₂) sᵀs / (sᵀs − sᵀy) (Levenberg–Marquardt:
      y moved towards s until sᵀy = μ₂ sᵀs).

    Afterwards sᵀy ≥ μ₂ sᵀs > 0, so the BFGS update keeps H positive definite. Where a part's
    denominator vanishes there is nothing for it to move: y = 0 (no change of the gradients, all of a
    layer's units dead, say) has yᵀHy = 0 and skips Powell's part, where the authors' sᵀy / yᵀHy divides
    by zero; s = 0 skips both, and the BFGS update then keeps H (sᵀy = 0).
    """
    sy, yHy = (s.T @ y).item(), (y.T @ (H @ y)).item()
    if not sy > mu1 * yHy and yHy != sy:
        theta = (1 - mu1) * yHy / (yHy - sy)
        s = theta * s + (1 - theta) * (H @ y)
    ss, sy = (s.T @ s).item(), (s.T @ y).item()
    if not sy > mu2 * ss and ss != sy:
        theta = (1 - mu2) * ss / (ss - sy)
        y = theta * y + (1 - theta) * s
    return s, y


@dataclass
class KBFGS(Optimizer):
    """K-BFGS (Goldfarb, Ren & Bahamou 2020) as the authors' code does it (``kbfgs_utils.py``,
    ``training_function.py``, ``training_utils.py`` of their public repository): per linear layer the
    inverse curvature H_g ⊗ H_a. The parameters of a user's modules, which no Linear factor covers, step
    by their Gauss–Newton HBP blocks, −γ (C + λI)⁻¹ m (eq. (8) with K-BFGS's λ; mcalc's extension).

    - Before the first step, Ā = E[ã ãᵀ] (ã = [a; 1]) over the training data (:meth:`prepare`);
      H_a starts as (Ā + √λ I)⁻¹ and H_g as I.
    - Each step: the gradient with the L2 term τθ, averaged with momentum m ← μ m + (1 − μ) ∇;
      Ā ← β Ā + (1 − β) E_batch[ã ãᵀ] (from the second step on); the update −γ H_g m H_a.
    - After it, a second forward and backward pass on the same mini-batch at θ + the update gives, per
      layer, s = mean pre-activation change and y = mean change of the per-sample gradient at the
      pre-activations, each averaged with decay 0.9; double damping (Powell μ₁ = 0.2, then
      Levenberg–Marquardt μ₂ = √λ) and BFGS update H_g. H_a is updated by BFGS with s = H_a ā,
      y = (Ā + √λ I) s, ā the batch mean of ã.

    A convolution's [K b] is factored the same way over its shared weights, as the KF-QN-CNN code does
    (K-BFGS for convolutions, Ren, Bahamou & Goldfarb): Ā = E[Σₜ ãₜ ãₜᵀ]/T over its patches (KFC's, as
    kfac's), ā their mean over positions and samples, and s and y the changes of the pre-activations and
    of the per-sample gradients at them, both averaged over positions and samples. (Summing y over the
    positions instead would pair H_g with kfac's G = E[Σₜ gₜ gₜᵀ], but it leaves the Levenberg–Marquardt
    damping, which compares sᵀy with sᵀs, T times weaker: on MNIST-1D's ConvBase one seed in three then
    had its steps rejected from epoch 19 on, and ended at 0.940 where the averaged form reached 0.952.)

    The authors' code writes mean(ā) into ā's last coordinate, where ã has its constant 1; mcalc
    keeps the 1 (the paper's ā). Defaults: theirs (λ = 0.3, μ = 0.9, β = 0.9, τ = 1e-5), except the
    learning rate: the authors tune γ per problem (their README) and their demo's 0.3 is for an MNIST
    autoencoder at batch 1000; mcalc's γ = 1 was measured over ``benchmarks/robustness.py`` (batch 64,
    27 cells, 3 seeds: within 0.03 of the better first-order method in 27 cells, against 24 with 0.6 and
    20 with 0.3, which falls behind on every sigmoid network).
    """

    lr: float = 1.0
    damping: float = 0.3
    decay: float = 0.9
    momentum: float = 0.9
    pair_decay: float = 0.9
    mu1: float = 0.2
    weight_decay: float = 1e-5
    steps: int = 0
    A: dict[int, Any] = field(default_factory=dict)
    H_a: dict[int, Any] = field(default_factory=dict)
    H_g: dict[int, Any] = field(default_factory=dict)
    pairs: dict[int, tuple[Any, Any]] = field(default_factory=dict)
    m: dict[str, Any] = field(default_factory=dict)
    block_params: list[str] = field(default_factory=list)  # stepped by eq. (8) blocks (prepare)
    second_order = True

    def curvature_request(self) -> CurvatureRequest | None:
        """The Gauss–Newton blocks of the parameters outside Linear layers and convolutions, which BFGS
        factors do not cover (a user's module's), Kronecker-factored as K-FAC's."""
        return CurvatureRequest(Curvature.GGN, Approximation.KRONECKER_FACTORED,
                                frozenset(self.block_params)) if self.block_params else None

    def prepare(self, net: Network, X_train: Any) -> None:
        """Ā from one pass over the training inputs at the initial weights (``training_utils.py``)."""
        self.block_params = block_parameters(net)
        _, inputs = net.forward(X_train, matrices=True)
        for position in factored_layers(net):
            self.A[position] = input_factor(net.layers[position], inputs[position], net.xp)

    @staticmethod
    def _layer_statistics(net: Network, X: Any, Y: Any, params: dict[str, Any],
                          ) -> tuple[dict[int, tuple[Any, Any]], list[Any]]:
        """Per factored layer: the mean pre-activation and the mean per-sample gradient of the loss at it
        (over samples, and a convolution's positions); and the input of every layer."""
        Z, inputs = net.forward(X, params, matrices=True)
        saved, net.params = net.params, params
        try:
            adjoints = net.adjoints(inputs, net.output_gradient(Z, Y))
        finally:
            net.params = saved
        means, B = {}, X.shape[1]
        for position in factored_layers(net):
            pre = inputs[position + 1] if position + 1 < len(net.layers) else Z
            grad, rows = adjoints[position], net.layers[position].output_rows
            if rows is not None:  # a convolution's: its positions averaged, per sample
                # as the forward pass keeps it, (rows, B, T), or as columns (T · rows, B): (T, rows, B) laid out
                # as the columns are, so that the mean over T adds in their order
                pre = (net.xp.ascontiguousarray(pre.transpose(2, 0, 1)) if pre.ndim == 3
                       else pre.reshape(-1, rows, B)).mean(axis=0)
                grad = grad.reshape(-1, rows, B).mean(axis=0)
            means[f"pre{position}"] = pre.mean(axis=1, keepdims=True)
            means[f"grad{position}"] = grad.sum(axis=1, keepdims=True)  # δZ carries 1/B
        means = net.parallel.mean(means, B)  # over every rank's shard of the batch
        out = {position: (means[f"pre{position}"], means[f"grad{position}"]) for position in factored_layers(net)}
        return out, inputs

    def step(self, net: Network, grads: dict[str, Any], blocks: dict[str, CurvatureBlock],
             batch: tuple[Any, Any] | None = None) -> dict[str, Any]:
        if batch is None:
            raise McalcError("kbfgs needs the mini-batch for its second forward and backward pass")
        xp = net.xp
        X, Y = batch
        for name, g in grads.items():
            g = g + self.weight_decay * net.params[name]
            self.m[name] = self.momentum * self.m.get(name, 0.0) + (1 - self.momentum) * g
        before, inputs = self._layer_statistics(net, X, Y, net.params)
        root = self.damping**0.5
        updates: dict[str, Any] = {}
        damped, means = {}, {}
        for position in factored_layers(net):
            layer = net.layers[position]
            A, a = input_factor(layer, inputs[position], xp, with_mean=True, batch=net.parallel.batch)
            batch = net.parallel.mean({"A": A, "a": a}, X.shape[1])
            batch_A = batch["A"]
            if position not in self.A:  # no pass over the data was made
                self.A[position] = batch_A
            elif self.steps > 0:
                self.A[position] = self.decay * self.A[position] + (1 - self.decay) * batch_A
            eye = xp.eye(len(batch_A), dtype=batch_A.dtype)
            damped[position], means[position] = self.A[position] + root * eye, batch["a"]
            if position not in self.H_a:
                self.H_a[position] = damped_solve(damped[position], eye, xp, what=f"kbfgs factor A{position}")
            W, b = weight_and_bias(layer)
            H_g = self.H_g.setdefault(position, xp.eye(grads[W].shape[0], dtype=X.dtype))
            direction = -H_g @ joined(self.m, W, b, xp) @ self.H_a[position]
            for name, part in split_joined(direction, W, b):
                updates[name] = self.lr * part
        for name, direction in damped_block_directions(self.block_params, self.m, blocks, self.damping, xp).items():
            updates[name] = -self.lr * direction
        after, _ = self._layer_statistics(net, X, Y, net.params_plus(updates))
        for position, (pre, grad) in before.items():
            s, y = pre - after[position][0], grad - after[position][1]
            s0, y0 = self.pairs.get(position, (0.0, 0.0))  # the averages start at zero
            d = self.pair_decay
            s, y = d * s0 + (1 - d) * s, d * y0 + (1 - d) * y
            self.pairs[position] = (s, y)
            s, y = double_damping(self.H_g[position], s, y, self.mu1, root)
            self.H_g[position] = bfgs_inverse_update(self.H_g[position], s, y, grad)
            s_a = self.H_a[position] @ means[position]
            self.H_a[position] = bfgs_inverse_update(self.H_a[position], s_a, damped[position] @ s_a, means[position])
        self.steps += 1
        return updates

    def reject(self) -> None:
        """After a rejected step (mcalc's safeguard; the authors' code stops at a NaN): λ doubled, and the
        quasi-Newton matrices started again, H_a = (Ā + √λ I)⁻¹ and H_g = I (a BFGS restart). λ alone would
        not change the next step, which H_a and H_g make: a step rejected once would be rejected forever."""
        self.damping *= 2
        self.H_a.clear()
        self.H_g.clear()


def make_optimizer(name: str, **options: Any) -> Optimizer:
    """An optimiser by its command-line name."""
    from .hessian_free import HessianFree

    table = {"sgd": SGD, "adam": Adam, "hbp-newton": HBPNewton, "kfac": KFAC, "kbfgs": KBFGS,
             "hf-newton": functools.partial(HessianFree, matrix=CurvatureMatrix.HESSIAN),
             "hf-gn": functools.partial(HessianFree, matrix=CurvatureMatrix.GAUSS_NEWTON)}
    if name not in table:
        raise McalcError(f"unknown optimizer '{name}'; available: {', '.join(table)}")
    return table[name](**{k: v for k, v in options.items() if v is not None})
