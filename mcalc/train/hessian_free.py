"""Hessian-free optimisation (Martens 2010) as his code does it (``nnet_train_2.m``).

Each step minimises the local quadratic model q(d) = gᵀd + ½ dᵀ C d by preconditioned CG on
(C + λI) d = −g, where C is the network's Gauss–Newton matrix (``hf-gn``) or its Hessian
(``hf-newton``), applied through the generated R-operator code (:meth:`Network.curvature_product`),
never formed. Following the paper and the code:

- g, the preconditioner's squared gradients, CG-backtracking and the line search are measured on the
  whole training set, C and ρ on the step's mini-batch (his chunk, a part of the training set cycled
  through: "the gradient and line-search are still computed using the full training set");
- the preconditioner is diag(Σᵢ gᵢ²/N + λ)^¾, gᵢ the per-sample gradients (Section 4.7);
- CG starts from the previous step's solution decayed by 0.95, runs at most 250 iterations, stops on
  the relative-progress test (Section 4.4) or at negative curvature (which only the Hessian has: below),
  and keeps its iterates at i = ⌈5·1.3ᵏ⌉ and the last;
- CG-backtracking (Section 4.6): the last iterate, then earlier ones while the loss keeps falling;
- λ adapts by the reduction ratio ρ = (f(θ + d) − f(θ)) / q(d) of the chosen iterate on the mini-batch
  (q without the damping): λ ← 3/2 λ when ρ < 1/4, λ ← 2/3 λ when ρ > 3/4, from λ₀ = 45 (Section 4.1);
- the step length is backtracked from 1 by 0.8 until the Armijo condition
  f(θ + αd) ≤ f(θ) + 10⁻² α gᵀd holds (at most 60 times; else the step is not taken).

mcalc's own choice, a named option: ``measured_on='batch'`` measures everything on the mini-batch, a
step's cost independent of the training set's size. ρ on the batch the step was fitted to is then
optimistic and, without a floor, λ shrinks until each step fits its own batch, so λ is kept above
``min_damping`` = 0.6 there (over ``benchmarks/robustness.py`` the Gauss–Newton matrix was within 0.03
of the better first-order method in 17 of 27 cells with a floor of 0.3, 25 with 0.6 and 24 with 1).
Measured on the training set, as Martens does, λ has no floor.

The Hessian is indefinite, and Martens' CG, written for the Gauss–Newton matrix, has no case for a
direction p with pᵀ(C + λI)p ≤ 0. ``negative_curvature`` says what hf-newton does there:

- ``'gauss-newton'`` (the default): this step is the Gauss–Newton one, CG run again on G + λI from the
  same start (G is the Hessian without the network's second derivatives, positive semi-definite for a
  convex loss, Schraudolph 2002; Martens 2010, Section 4.2, prefers it for that);
- ``'raise'``: λ is raised so that C's curvature along p, damped, is the λ the step began with, and CG
  starts again from 0, at most ``damping_raises`` times (the Levenberg–Marquardt condition
  λ > −λ_min(C) of Moré & Sorensen 1983).

Measured on the mini-batch, over the same matrix, the Hessian was within 0.03 in 22 cells with the
Gauss–Newton step, 14 with the raise, and 7 when CG stopped there with a floor of 3 (the README says what
else was tried); measured on the training set, both matrices are within 0.03 in all 27.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..errors import McalcError
from ..modes import CurvatureMatrix
from ..runtime.blocks import CurvatureBlock
from .network import Network
from .optimizer_protocol import MiniBatch, Optimizer
from .safeguards import LevenbergMarquardt, reduction_ratio

RECENT = 100  # CG steps and reduction ratios kept, for diagnostics


@dataclass
class CGResult:
    """The kept iterates (at i = ⌈5·1.3ᵏ⌉ and the last) with their iteration counts, C x for the last (so
    the model needs no extra product), and whether CG stopped at a direction of negative curvature."""

    iterates: list[Any]
    counts: list[int]
    Ax: Any
    negative_curvature: bool
    curvature: float = 0.0  # pᵀAp / pᵀp along the direction where CG stopped at negative curvature

    @property
    def x(self) -> Any:
        return self.iterates[-1]

    @property
    def iterations(self) -> int:
        return self.counts[-1]


def truncated_cg(matvec: Any, b: Any, x0: Any, *, max_iterations: int, tolerance: float = 0.0,
                 progress_tolerance: float = 5e-4, preconditioner: Any = None) -> CGResult:
    """Minimise φ(x) = ½ xᵀAx − bᵀx by preconditioned CG from x0 (Martens 2010, Algorithm 2 and
    Section 4.4; ``conjgrad`` of his code).

    ``preconditioner``: the diagonal M, applied as M⁻¹r. Stops when ‖r‖ ≤ tolerance·‖b‖, when φ made
    too little relative progress over the last k = max(10, ⌈i/10⌉) iterations —
    (φ(xᵢ) − φ(xᵢ₋ₖ))/φ(xᵢ) < k·progress_tolerance, φ < 0 — or at pᵀAp ≤ 0 (the iterate before is kept).
    """
    Ax = matvec(x0)
    x, r = x0, b - Ax  # r is the negative of Martens' residual Ax − b
    y = r if preconditioner is None else r / preconditioner
    p = y
    ry = float(r @ y)
    target = tolerance**2 * float(b @ b)
    phi = [0.5 * float(x @ (Ax - 2 * b))]
    iterates, counts, keep_next = [], [], 5.0
    negative, rayleigh = False, 0.0
    i = 0
    for i in range(1, max_iterations + 1):
        # rᵀM⁻¹r = 0 with r ≠ 0: the residual is lost below the float's range (float32's first): solved
        if float(r @ r) <= target or ry == 0:
            i -= 1
            break
        Ap = matvec(p)
        curvature = float(p @ Ap)
        if curvature <= 0:
            length = float(p @ p)  # 0 where p is lost below the float's range too: solved, not negative
            negative, rayleigh, i = length > 0, curvature / length if length > 0 else 0.0, i - 1
            break
        alpha = ry / curvature
        x, Ax, r = x + alpha * p, Ax + alpha * Ap, r - alpha * Ap
        y = r if preconditioner is None else r / preconditioner
        ry_new = float(r @ y)
        p, ry = y + (ry_new / ry) * p, ry_new
        phi.append(0.5 * float(x @ (Ax - 2 * b)))
        if i == math.ceil(keep_next):
            iterates.append(x)
            counts.append(i)
            keep_next *= 1.3
        k = max(10, math.ceil(i / 10))
        if i > k and phi[-1] < 0 and (phi[-1] - phi[-1 - k]) / phi[-1] < k * progress_tolerance:
            break
    if not counts or counts[-1] != i:
        iterates.append(x)
        counts.append(i)
    return CGResult(iterates, counts, Ax, negative, rayleigh)


def squared_gradients(net: Network, X: Any, Y: Any, taps: dict[int, tuple[Any, Any]] | None = None) -> dict[str, Any]:
    """Σᵢ gᵢ²/B for every parameter, gᵢ the gradient of sample i's loss (Martens' ``grad2``): for a
    linear layer z = W a + b with δᵢ = ∂ℓᵢ/∂zᵢ, (δ ⊙ δ)(a ⊙ a)ᵀ/B and Σᵢ δᵢ²/B. A user's module has no
    closed form here: its parameters get 0, so the preconditioner is the damping's alone there. ``taps``:
    the layers' inputs and δZ that :meth:`Network.backward` kept for (X, Y), else a pass of its own."""
    if taps is None:
        Z, inputs = net.forward(X, matrices=True)  # a Linear layer's inputs are columns whatever the layout
        adjoints = net.adjoints(inputs, net.output_gradient(Z, Y))
        taps = {position: (inputs[position], adjoints[position]) for position in range(len(net.layers))}
    B = X.shape[1]
    out = {name: net.xp.zeros_like(value) for name, value in net.params.items()}
    for position, layer in enumerate(net.layers):
        if layer.module == "Linear":
            a, delta = taps[position]
            delta = delta * B  # δZ carries 1/B: per-sample gradients, one per column
            out[layer.params["W"]] = (delta * delta) @ (a * a).T / B
            out[layer.params["b"]] = (delta * delta).sum(axis=1, keepdims=True) / B
    return net.parallel.mean(out, B)  # over every rank's shard of the batch


@dataclass
class HessianFree(Optimizer):
    """Hessian-free Newton (``matrix='hessian'``) or Gauss–Newton (``'gn'``); see the module docstring.

    Defaults are Martens' (λ₀ = 45, n_CG = 250, warm start 0.95, preconditioner exponent ¾, at most 60
    step-length reductions, the gradient and the line search on the training set, which the training loop
    hands each step as ``batch.training``; a step given a bare (X, Y) measures on it); ``measured_on='batch'``,
    ``min_damping``, ``negative_curvature`` and ``damping_raises`` are mcalc's (the module docstring says why).
    """

    matrix: CurvatureMatrix = CurvatureMatrix.GAUSS_NEWTON
    lr: float = 1.0
    damping: float = 45.0
    adapt_damping: bool = True
    cg_iterations: int = 250
    cg_tolerance: float = 0.0
    warm_start: float = 0.95
    precondition: bool = True
    exponent: float = 0.75
    backtrack: bool = True
    line_search_steps: int = 60
    min_damping: float | None = None  # 0 measured on the training set (Martens'), 0.6 on the mini-batch
    measured_on: str = "training-set"  # or 'batch'
    negative_curvature: str = "gauss-newton"  # or 'raise'
    damping_raises: int = 5
    previous: Any = None
    cg_steps: list[int] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    second_order = True  # its curvature comes from R-operator products, not HBP blocks
    SAVED_BEFORE: ClassVar[dict[str, str]] = {"measured_on": "batch"}  # a checkpoint from before the option

    def __post_init__(self) -> None:
        self.matrix = CurvatureMatrix.parse(self.matrix)
        if self.negative_curvature not in ("gauss-newton", "raise"):
            raise McalcError(f"negative_curvature is 'gauss-newton' or 'raise', not {self.negative_curvature!r}")
        if self.measured_on not in ("training-set", "batch"):
            raise McalcError(f"measured_on is 'training-set' or 'batch', not {self.measured_on!r}")
        if self.min_damping is None:
            self.min_damping = 0.0 if self.measured_on == "training-set" else 0.6

    def step(self, net: Network, grads: dict[str, Any], blocks: dict[str, CurvatureBlock],
             batch: tuple[Any, Any] | None = None) -> dict[str, Any]:
        if batch is None:
            raise McalcError("hessian-free optimisation needs the mini-batch for its curvature products")
        xp = net.xp
        batch = MiniBatch.of(net, batch)
        X, Y = batch
        measured, taps = batch, None  # where g, its squares, CG-backtracking and the line search are measured
        if self.measured_on == "training-set" and batch.training is not None:
            taps = {}  # the pass's inputs and δZ, from which the squared gradients follow without another pass
            loss, grads, _ = net.backward(*batch.training, taps=taps)  # Martens' gradient: the training set's
            measured = MiniBatch(net, *batch.training, loss)
        pack, unpack = net.flat, net.unflat
        product = net.curvature_product(X, Y, self.matrix)  # Martens' chunk: the mini-batch
        g = pack(grads)
        damping = self.damping
        preconditioner = ((pack(squared_gradients(net, *measured, taps)) + damping) ** self.exponent
                          if self.precondition else None)
        start = self.warm_start * self.previous if self.previous is not None else xp.zeros_like(g)

        def solve(product: Any, damping: float, start: Any) -> CGResult:
            return truncated_cg(lambda v: pack(product(unpack(v))) + damping * v, -g, start,
                                max_iterations=self.cg_iterations, tolerance=self.cg_tolerance,
                                preconditioner=preconditioner)

        result = solve(product, damping, start)
        if result.negative_curvature and self.negative_curvature == "gauss-newton":
            product = net.curvature_product(X, Y, CurvatureMatrix.GAUSS_NEWTON)  # G, positive semi-definite
            result = solve(product, damping, start)
        for _ in range(self.damping_raises if self.negative_curvature == "raise" else 0):
            if not result.negative_curvature:
                break
            # C + λI is indefinite along CG's direction p: λ rises until C's curvature there, κ − λ, damped is
            # the λ the step began with (Moré & Sorensen 1983: λ above −λ_min(C)), and CG starts again
            damping += self.damping - result.curvature
            start = xp.zeros_like(g)
            result = solve(product, damping, start)
        if self.adapt_damping:  # a fixed λ (Martens' seed runs) raised at negative curvature: this step only
            self.damping = damping
        self.previous = result.x
        loss = lambda d: measured.loss(unpack(d))  # noqa: E731
        base = measured.loss()
        chosen = len(result.iterates) - 1
        value = loss(result.iterates[chosen])
        while self.backtrack and chosen > 0:  # CG-backtracking (Section 4.6): earlier iterates while better
            earlier = loss(result.iterates[chosen - 1])
            if not earlier < value:
                break
            chosen, value = chosen - 1, earlier
        d = result.iterates[chosen]
        self.cg_steps.append(result.counts[chosen])
        if not float(d @ d) > 0:
            d, value = -g, loss(-g)  # negative curvature before any progress: fall back on the gradient
        slope = float(g @ d)
        Cd = result.Ax - damping * d if d is result.x else pack(product(unpack(d)))
        model = slope + 0.5 * float(d @ Cd)  # q without the damping term
        # ρ on the chunk whose curvature made the model (Martens' oldll_chunk − ll_chunk), with the gradient's
        # slope from the training set
        rho = reduction_ratio(base, value, model) if measured is batch else \
            reduction_ratio(batch.loss(), batch.loss(unpack(d)), model)
        self.ratios.append(rho)
        del self.cg_steps[:-RECENT], self.ratios[:-RECENT]  # the recent ones: the training loop copies the state
        if self.adapt_damping:  # Levenberg–Marquardt by the reduction ratio (Section 4.1)
            self.damping = LevenbergMarquardt(self.damping, minimum=self.min_damping).update(rho)
        rate = self.lr
        direction = unpack(d)
        updates = {n: rate * u for n, u in direction.items()}
        if rate != 1.0:
            value = measured.loss(updates)
        for reduction in range(self.line_search_steps + 1):  # Armijo backtracking; every rate is tested
            if value <= base + 1e-2 * rate * slope:
                break
            if reduction == self.line_search_steps:  # no decrease along d: keep the weights; the damping has gone up
                updates = {n: 0.0 * u for n, u in direction.items()}
                break
            rate *= 0.8
            updates = {n: rate * u for n, u in direction.items()}
            value = measured.loss(updates)
        return updates  # measured on the batch, the last loss the line search tested is kept for the rejection test

    def reject(self) -> None:
        """After a rejected step: λ raised as for a failed reduction ratio, and CG started afresh."""
        self.damping *= 1.5
        self.previous = None
