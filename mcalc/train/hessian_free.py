"""Hessian-free optimisation (Martens 2010): truncated CG on exact curvature-vector products.

Each step minimises the local quadratic model q(d) = gᵀd + ½ dᵀ C d by CG on
(C + λI) d = −g, where C is the network's Gauss–Newton matrix (``hf-gn``) or
its Hessian (``hf-newton``), applied through the generated R-operator code
(:meth:`Network.curvature_product`), never formed. Following Martens (2010):

- CG starts from the previous step's solution decayed by ``warm_start``, stops
  on his relative-progress test (or the residual tolerance, or n_CG), and stops
  early at negative curvature, which only the Hessian can produce;
- the Levenberg–Marquardt damping λ adapts by the reduction ratio
  ρ = (f(θ + d) − f(θ)) / q(d): λ ← 3/2 λ when ρ < 1/4, λ ← 2/3 λ when ρ > 3/4
  (q without the damping term, as in Martens & Sutskever 2012);
- the step length is found by backtracking from the learning rate until the
  Armijo condition f(θ + αd) ≤ f(θ) + 10⁻² α gᵀd holds on the mini-batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import McalcError
from ..runtime.blocks import CurvatureBlock
from .network import Network


@dataclass
class CGResult:
    """The last iterate, A x for it (so the model needs no extra product), iterations, and whether
    CG stopped at a direction of negative curvature."""

    x: Any
    Ax: Any
    iterations: int
    negative_curvature: bool


def truncated_cg(matvec: Any, b: Any, x0: Any, *, max_iterations: int, tolerance: float,
                 progress_tolerance: float = 5e-4) -> CGResult:
    """Minimise φ(x) = ½ xᵀAx − bᵀx by CG from x0 (Martens 2010, Algorithm and Section 4.4).

    Stops when ‖r‖ ≤ tolerance·‖b‖, when φ made too little relative progress over
    the last k = max(10, i/10) iterations — φ(xᵢ) − φ(xᵢ₋ₖ) > progress_tolerance·k·φ(xᵢ)
    (φ < 0 once CG has made progress) — or at pᵀAp ≤ 0 (the current iterate is kept).
    """
    Ax = matvec(x0)
    x, r = x0, b - Ax
    p = r
    rr = float(r @ r)
    target = tolerance**2 * float(b @ b)
    phi = [0.5 * float(x @ (Ax - 2 * b))]  # φ(x) = ½ xᵀ(Ax − 2b)
    for i in range(1, max_iterations + 1):
        if rr <= target:
            return CGResult(x, Ax, i - 1, False)
        Ap = matvec(p)
        curvature = float(p @ Ap)
        if curvature <= 0:
            return CGResult(x, Ax, i - 1, True)
        alpha = rr / curvature
        x, Ax, r = x + alpha * p, Ax + alpha * Ap, r - alpha * Ap
        rr_new = float(r @ r)
        p, rr = r + (rr_new / rr) * p, rr_new
        phi.append(0.5 * float(x @ (Ax - 2 * b)))
        k = max(10, i // 10)
        if i > k and phi[-1] < 0 and (phi[-1] - phi[-1 - k]) / phi[-1] < k * progress_tolerance:
            return CGResult(x, Ax, i, False)
    return CGResult(x, Ax, max_iterations, False)


@dataclass
class HessianFree:
    """Hessian-free Newton (``matrix='hessian'``) or Gauss–Newton (``'gn'``); see the module docstring.

    Seed 002 uses λ = 32 for HF-Newton and λ = 4 for HF-GN with learning rate 0.5 on MNIST; these
    defaults (λ = 1 adapted, learning rate 1, n_CG = 20) suit the digits demo. λ is kept above
    ``min_damping``: measured on the mini-batch the step was fitted to, ρ is optimistic, and
    without a floor λ shrinks until each step fits its own batch.
    """

    matrix: str = "gn"
    lr: float = 1.0
    damping: float = 1.0
    adapt_damping: bool = True
    cg_iterations: int = 20
    cg_tolerance: float = 1e-2
    warm_start: float = 0.95
    min_damping: float = 0.03
    curvature: str | None = None  # no HBP blocks: the curvature comes from R-operator products
    previous: Any = None
    cg_steps: list[int] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)

    def step(self, net: Network, grads: dict[str, Any], blocks: dict[str, CurvatureBlock],
             batch: tuple[Any, Any] | None = None) -> dict[str, Any]:
        if batch is None:
            raise McalcError("hessian-free optimisation needs the mini-batch for its curvature products")
        xp = net.xp
        X, Y = batch
        pack = lambda d: xp.concatenate([d[n].reshape(-1) for n in grads])  # noqa: E731

        def unpack(v: Any) -> dict[str, Any]:
            out, start = {}, 0
            for n, g in grads.items():
                out[n] = v[start:start + g.size].reshape(g.shape)
                start += g.size
            return out

        product = net.curvature_product(X, Y, self.matrix)
        g = pack(grads)
        damping = self.damping
        start = self.warm_start * self.previous if self.previous is not None else xp.zeros_like(g)
        result = truncated_cg(lambda v: pack(product(unpack(v))) + damping * v, -g, start,
                              max_iterations=self.cg_iterations, tolerance=self.cg_tolerance)
        d = result.x
        self.cg_steps.append(result.iterations)
        if not float(d @ d) > 0:
            d = -g  # negative curvature before any progress: fall back on the gradient
        self.previous = d
        base = net.loss(X, Y)
        slope = float(g @ d)
        model = slope + 0.5 * (float(d @ result.Ax) - damping * float(d @ d)) if d is result.x else slope
        f = lambda step: net.loss(X, Y, {n: net.params[n] + step * u for n, u in unpack(d).items()})  # noqa: E731
        full = f(1.0)
        rho = (full - base) / model if model < 0 else -1.0
        self.ratios.append(rho)
        if self.adapt_damping:  # Levenberg–Marquardt by the reduction ratio (Martens 2010, Section 4.1)
            if not rho >= 0.25 or result.negative_curvature:  # (a NaN loss counts as a failure)
                self.damping *= 1.5
            elif rho > 0.75:
                self.damping = max(self.min_damping, self.damping * 2 / 3)
        alpha, value = self.lr, full if self.lr == 1.0 else f(self.lr)
        for _ in range(12):  # backtracking (Armijo)
            if value <= base + 1e-2 * alpha * slope:
                break
            alpha *= 0.8
            value = f(alpha)
        else:
            alpha = 0.0  # no decrease along d: keep the weights; the damping has gone up
        return {n: alpha * u for n, u in unpack(d).items()}
