"""Optimisers: momentum SGD, Adam, the HBP Newton step of eq. (8) per block, K-FAC and K-BFGS."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import McalcError
from ..runtime.blocks import CurvatureBlock, row_groups
from .block_solvers import DampedBlockSolver
from .network import Network


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
class SGD:
    """θ ← θ − γ v, v ← μ v + δθ (heavy-ball momentum)."""

    lr: float = 0.1
    momentum: float = 0.9
    curvature: str | None = None
    velocity: dict[str, Any] = field(default_factory=dict)

    def step(self, net: Network, grads: dict[str, Any], blocks: dict[str, CurvatureBlock],
             batch: tuple[Any, Any] | None = None) -> dict[str, Any]:
        updates = {}
        for name, g in grads.items():
            updates[name] = -self.lr * heavy_ball(self.velocity, name, g, self.momentum)
        return updates


@dataclass
class Adam:
    """Kingma & Ba (2015) with bias correction."""

    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    curvature: str | None = None
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
class HBPNewton:
    """Eq. (8): [α I + (1 − α) 𝓗̄θ] Δθ = −δθ per block, then θ ← θ + γ Δθ.

    Defaults are the paper's Section 4: α = 0.02, ε_CG = 0.1, n_CG = 50, γ = 0.1,
    PCH-abs curvature. ``split`` divides each parameter row-wise into that many
    independent sub-blocks (Section 4). ``solver``: ``'cg'`` is the paper's truncated
    CG on every step's blocks; ``'eigen'`` solves exactly in the eigenbases of each
    block's Kronecker factors, averaged over renewals (decay ``decay``) and renewed with
    the curvature every ``refresh`` steps (a basis that still diagonalises its averaged
    factor to ``basis_tolerance`` only gets new eigenvalues); ``'auto'`` takes whichever
    a cost model says is cheaper (:class:`.block_solvers.DampedBlockSolver`).
    """

    lr: float = 0.1
    alpha: float = 0.02
    cg_tolerance: float = 0.1
    cg_iterations: int = 50
    curvature: str = "pch-abs"
    approximation: str = "6"
    split: int = 1
    solver: str = "auto"
    refresh: int = 5
    decay: float = 0.8
    basis_tolerance: float = 0.2
    block_solver: DampedBlockSolver = field(init=False)

    def __post_init__(self) -> None:
        if self.solver not in ("auto", "cg", "eigen"):
            raise McalcError(f"unknown solver '{self.solver}'; choose auto, cg or eigen")
        if self.refresh < 1 or self.split < 1:
            raise McalcError("refresh and split must be positive")
        if not 0 <= self.decay < 1:
            raise McalcError(f"decay must lie in [0, 1), not {self.decay}")
        self.block_solver = DampedBlockSolver(
            method=self.solver, refresh=self.refresh, decay=self.decay, tolerance=self.cg_tolerance,
            max_iterations=self.cg_iterations, basis_tolerance=self.basis_tolerance)

    def needs_curvature(self) -> bool:
        """Whether the next step needs fresh curvature blocks (not while stored eigenbases serve every block)."""
        return self.block_solver.needs_curvature()

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
        directions = self.block_solver.solve(parts, self.alpha)
        updates = {}
        for name, g in grads.items():
            if self.split == 1:
                updates[name] = self.lr * directions[name]
                continue
            delta = g * 0
            for i, rows in enumerate(rows_of[name]):
                delta[rows] = directions[(name, i)]
            updates[name] = self.lr * delta
        return updates


@dataclass
class KFAC:
    """K-FAC (Martens & Grosse 2015): per linear layer, F ≈ Ā ⊗ G with Ā = E[ã ãᵀ], ã = [a; 1],
    G = E[g gᵀ] for g the gradient of the log-likelihood at the layer's output.

    ``fisher='mc'`` samples one label per input from the model's softmax;
    ``'exact'`` takes the expectation over all classes (Σ_c p_c g_c g_cᵀ). The
    factors are running averages (decay ``decay``) with factored Tikhonov
    damping (A + π√λ I) ⊗ (G + √λ/π I), π = √((tr A/dim A)/(tr G/dim G)),
    and the update −γ (G + √λ/π)⁻¹ ∇[W b] (A + π√λ)⁻¹, with momentum.
    """

    lr: float = 0.1
    damping: float = 1e-2
    decay: float = 0.95
    momentum: float = 0.9
    fisher: str = "mc"
    seed: int = 0
    curvature: str | None = None
    factors: dict[int, tuple[Any, Any]] = field(default_factory=dict)
    velocity: dict[str, Any] = field(default_factory=dict)
    rng: np.random.Generator | None = None  # the labels' sampler (part of the state a checkpoint keeps)

    def _statistics(self, net: Network, X: Any) -> dict[int, tuple[Any, Any]]:
        xp = net.xp
        _, inputs = net.forward(X)
        B = X.shape[1]
        p = net.predict(X)
        if self.fisher == "mc":  # one label per input drawn from softmax(z); δz = (p − y)/B for the mean loss
            self.rng = self.rng or np.random.default_rng(self.seed)
            cumulative = np.cumsum(np.asarray(p.get() if hasattr(p, "get") else p), axis=0)
            labels = np.minimum((self.rng.random(B)[None, :] > cumulative).sum(axis=0), p.shape[0] - 1)
            targets = [(xp.asarray(np.eye(p.shape[0])[:, labels]), 1.0)]
        elif self.fisher == "exact":  # every class, weighted by its probability
            targets = [(xp.zeros_like(p) + xp.eye(p.shape[0])[:, [c]], p[c:c + 1, :]) for c in range(p.shape[0])]
        else:
            raise McalcError(f"unknown Fisher '{self.fisher}'; choose mc or exact")
        out: dict[int, tuple[Any, Any]] = {}
        for position, layer in enumerate(net.layers):
            if layer.params:
                a = with_bias_row(inputs[position], xp)
                out[position] = (a @ a.T / B, 0)
        for target, weight in targets:
            adjoints = net.adjoints(inputs, (p - target) * xp.sqrt(weight) / B)
            for position in out:
                g = adjoints[position] * B  # per-sample gradients, one per column
                A, G = out[position]
                out[position] = (A, G + g @ g.T / B)
        return out

    def step(self, net: Network, grads: dict[str, Any], blocks: dict[str, CurvatureBlock],
             batch: tuple[Any, Any] | None = None) -> dict[str, Any]:
        if batch is None:
            raise McalcError("kfac needs the mini-batch to estimate its Kronecker factors")
        xp = net.xp
        for position, (A, G) in self._statistics(net, batch[0]).items():
            if position in self.factors:
                A0, G0 = self.factors[position]
                A, G = self.decay * A0 + (1 - self.decay) * A, self.decay * G0 + (1 - self.decay) * G
            self.factors[position] = (A, G)
        updates = {}
        for position, (A, G) in self.factors.items():
            names = net.layers[position].params
            W, b = names["W"], names["b"]
            pi = float(xp.sqrt((xp.trace(A) / A.shape[0]) / (xp.trace(G) / G.shape[0])))
            root = self.damping**0.5
            A_damped = A + pi * root * xp.eye(A.shape[0], dtype=A.dtype)
            G_damped = G + root / pi * xp.eye(G.shape[0], dtype=G.dtype)
            direction = xp.linalg.solve(G_damped, xp.linalg.solve(A_damped, joined(grads, W, b, xp).T).T)
            for name, part in split_joined(direction, W, b):
                updates[name] = -self.lr * heavy_ball(self.velocity, name, part, self.momentum)
        return updates


def bfgs_inverse_update(H: Any, s: Any, y: Any) -> Any:
    """H⁺ = (I − ρ s yᵀ) H (I − ρ y sᵀ) + ρ s sᵀ, ρ = 1/(sᵀy): H⁺ y = s. Skipped (H kept) unless sᵀy > 0."""
    sy = (s.T @ y).item()
    if sy <= 0:
        return H
    rho = 1.0 / sy
    Hy = H @ y
    return H + (rho * rho * (y.T @ Hy).item() + rho) * (s @ s.T) - rho * (s @ Hy.T + Hy @ s.T)


def double_damping(H: Any, s: Any, y: Any, mu1: float, mu2: float) -> tuple[Any, Any]:
    """Powell's damping in the inverse form (sᵀy ≥ μ₁ yᵀHy), then Levenberg–Marquardt (y ← y + μ₂ s).

    Afterwards sᵀy ≥ μ₁ yᵀHy + μ₂ sᵀs > 0, so the BFGS update keeps H positive definite.
    """
    sy, yHy = (s.T @ y).item(), (y.T @ (H @ y)).item()
    if sy < mu1 * yHy:
        theta = (1 - mu1) * yHy / (yHy - sy)
        s = theta * s + (1 - theta) * (H @ y)
    return s, y + mu2 * s


@dataclass
class KBFGS:
    """K-BFGS (Goldfarb, Ren & Bahamou 2020): per linear layer the inverse curvature H_a ⊗ H_g.

    Ā is a running average (decay ``decay``) of E[ã ãᵀ], ã = [a; 1]; H_a starts as
    (Ā + √λ I)⁻¹ and is then updated by BFGS with s = H_a ā, y = (Ā + √λ I) s (no
    re-inversion). H_g starts as I and is updated by BFGS from a pair measured by a
    second forward and backward pass on the same mini-batch after the step: s the
    change of the mean pre-activations, y the change of their mean gradients, made
    safe by double damping (Powell μ₁ = 0.2, then Levenberg–Marquardt μ₂ = √λ).
    The step is −γ H_g ∇[W b] H_a with momentum; the authors' defaults
    γ = 0.3, λ = 0.3, momentum 0.9.
    """

    lr: float = 0.3
    damping: float = 0.3
    decay: float = 0.9
    momentum: float = 0.9
    mu1: float = 0.2
    curvature: str | None = None
    A: dict[int, Any] = field(default_factory=dict)
    H_a: dict[int, Any] = field(default_factory=dict)
    H_g: dict[int, Any] = field(default_factory=dict)
    velocity: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def _linear_statistics(net: Network, X: Any, Y: Any, params: dict[str, Any],
                           ) -> tuple[dict[int, tuple[Any, Any]], list[Any]]:
        """Per linear layer: mean pre-activation and mean gradient of the loss at it; and the input of
        every layer."""
        Z, inputs = net.forward(X, params)
        saved, net.params = net.params, params
        try:
            adjoints = net.adjoints(inputs, net.output_gradient(Z, Y))
        finally:
            net.params = saved
        out = {}
        for position, layer in enumerate(net.layers):
            if layer.params:
                pre = inputs[position + 1] if position + 1 < len(net.layers) else Z
                out[position] = (pre.mean(axis=1, keepdims=True), adjoints[position].sum(axis=1, keepdims=True))
        return out, inputs

    def step(self, net: Network, grads: dict[str, Any], blocks: dict[str, CurvatureBlock],
             batch: tuple[Any, Any] | None = None) -> dict[str, Any]:
        if batch is None:
            raise McalcError("kbfgs needs the mini-batch for its second forward and backward pass")
        xp = net.xp
        X, Y = batch
        before, inputs = self._linear_statistics(net, X, Y, net.params)  # its forward pass serves the step too
        root = self.damping**0.5
        updates: dict[str, Any] = {}
        for position, layer in enumerate(net.layers):
            if not layer.params:
                continue
            a = with_bias_row(inputs[position], xp)
            batch_A = a @ a.T / X.shape[1]
            self.A[position] = batch_A if position not in self.A else \
                self.decay * self.A[position] + (1 - self.decay) * batch_A
            damped = self.A[position] + root * xp.eye(len(batch_A), dtype=batch_A.dtype)
            if position not in self.H_a:
                self.H_a[position] = xp.linalg.inv(damped)
            else:
                s_a = self.H_a[position] @ a.mean(axis=1, keepdims=True)
                self.H_a[position] = bfgs_inverse_update(self.H_a[position], s_a, damped @ s_a)
            H_g = self.H_g.setdefault(position, xp.eye(grads[layer.params["W"]].shape[0], dtype=X.dtype))
            W, b = layer.params["W"], layer.params["b"]
            direction = -H_g @ joined(grads, W, b, xp) @ self.H_a[position]
            for name, part in split_joined(direction, W, b):
                updates[name] = self.lr * heavy_ball(self.velocity, name, part, self.momentum)
        after, _ = self._linear_statistics(net, X, Y, {k: v + updates[k] for k, v in net.params.items()})
        for position, (pre, grad) in before.items():
            s_g, y_g = after[position][0] - pre, after[position][1] - grad
            s_g, y_g = double_damping(self.H_g[position], s_g, y_g, self.mu1, root)
            self.H_g[position] = bfgs_inverse_update(self.H_g[position], s_g, y_g)
        return updates


def make_optimizer(name: str, **options: Any) -> Any:
    """An optimiser by its command-line name."""
    from .hessian_free import HessianFree

    table = {"sgd": SGD, "adam": Adam, "hbp-newton": HBPNewton, "kfac": KFAC, "kbfgs": KBFGS,
             "hf-newton": functools.partial(HessianFree, matrix="hessian"),
             "hf-gn": functools.partial(HessianFree, matrix="gn")}
    if name not in table:
        raise McalcError(f"unknown optimizer '{name}'; available: {', '.join(table)}")
    return table[name](**{k: v for k, v in options.items() if v is not None})
