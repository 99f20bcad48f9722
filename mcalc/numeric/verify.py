"""Verification of every derived rule of a module against the finite-difference oracle."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import sympy as sp

from ..calculus.derivation import Derivation
from ..calculus.hbp import CURVATURES
from ..errors import EvaluationError
from ..expr import Apply, Expr, Inverse, Symbol, Zero
from ..module import Module
from .evaluate import Evaluator
from .finite_diff import fd_gradient_tangents, fd_hbp, fd_jacobian, fd_jvp, fd_second_order

TOLERANCES = {"jacobian": 1e-6, "gradient": 1e-6, "hbp": 2e-5, "hessian": 2e-5}
SAMPLE_DIMS = (3, 2, 4, 5, 6)


@dataclass(frozen=True)
class Check:
    """One rule compared with its oracle: relative max-abs error against a tolerance."""

    module: str
    rule: str
    curvature: str
    error: float
    tolerance: float
    vacuous: bool = False  # its oracle was zero at every point tried, though the rule is not zero

    @property
    def ok(self) -> bool:
        return bool(self.error <= self.tolerance)

    def as_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def relative_error(value: np.ndarray, reference: np.ndarray) -> float:
    """max |value − reference| / max(1, max |reference|)."""
    value, reference = np.asarray(value, dtype=float), np.asarray(reference, dtype=float)
    if value.shape != reference.shape:
        return float("inf")
    scale = max(1.0, float(np.max(np.abs(reference), initial=0.0)))
    return float(np.max(np.abs(value - reference), initial=0.0)) / scale


def sample_values(module: Module, rng: np.random.Generator,
                  dims: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
    """A random point for ``module``: distinct small sizes, values shaped by the symbols' hints."""
    names = sorted({str(x) for s in module.symbols for d in s.shape for x in d.free_symbols})
    sizes = {sp.Symbol(n, integer=True, positive=True): (dims or {}).get(n, SAMPLE_DIMS[i % len(SAMPLE_DIMS)])
             for i, n in enumerate(names)}
    for _ in range(64):  # grow a signal until every shape is positive (a convolution's patches fit)
        short = {x for node in module.output.walk() for d in node.shape if d.free_symbols
                 and int(d.xreplace(sizes)) < 1 for x in d.free_symbols}
        if not short:
            break
        sizes.update({x: sizes[x] + 1 for x in short if (dims or {}).get(str(x)) is None})
    inverted = {node.args[0] for node in module.output.walk() if isinstance(node, Inverse)}
    values: dict[str, np.ndarray] = {}
    for s in module.symbols:
        rows, cols = (int(d.xreplace(sizes)) for d in s.shape)  # a product such as c*5 too
        values[s.name] = draw_value(s, rows, cols, rng, s in inverted)
    return values


def draw_value(s: Symbol, rows: int, cols: int, rng: np.random.Generator, inverted: bool) -> np.ndarray:
    """A random value for ``s`` honouring its hints (one-hot for simplex, positive, well-conditioned)."""
    if "simplex" in s.hints:
        a = np.zeros((rows, cols))
        a[rng.integers(rows), :] = 1.0  # one-hot per column
    elif "positive" in s.hints:
        a = rng.uniform(0.5, 1.5, size=(rows, cols))
    else:
        a = rng.normal(scale=0.8, size=(rows, cols))
        if inverted and rows == cols:
            a += rows * np.eye(rows)  # keep an inverted symbol well conditioned
    return a[:, 0] if s.is_vector else a


ATTEMPTS = 8  # sample points tried before a check whose oracle is zero there is reported as vacuous


def verify_module(module: Module, *, seed: int = 0, curvatures: tuple[str, ...] = CURVATURES,
                  derivation: Derivation | None = None) -> list[Check]:
    """Check every Jacobian, gradient and HBP rule (each curvature) of ``module`` at a random point.

    A check whose oracle is zero at the point while its rule is not zero symbolically (every unit of a
    ReLU dead there, say) tests nothing: the point is drawn again, up to :data:`ATTEMPTS` times, and a
    check still zero at every point is marked ``vacuous``."""
    d = derivation or Derivation(module)
    checks = _checks_at_point(module, d, seed, curvatures)
    for attempt in range(1, ATTEMPTS):
        if not any(c.vacuous for c in checks):
            break
        again = _checks_at_point(module, d, seed + attempt, curvatures)
        if sum(c.vacuous for c in again) < sum(c.vacuous for c in checks):
            checks = again
    return checks


def _checks_at_point(module: Module, d: Derivation, seed: int, curvatures: tuple[str, ...]) -> list[Check]:
    rng = np.random.default_rng(seed)
    values = sample_values(module, rng)
    ev = Evaluator.for_module(module, values)
    z = ev.value(module.output)
    if not np.all(np.isfinite(z)):
        raise EvaluationError(f"module '{module.name}': forward pass is not finite at the sample point"
                              + _domain_hint(module, ev))
    size = z.size
    dz = rng.normal(size=size)
    a = rng.normal(size=(size, size))
    Hz = a @ a.T / size  # a positive semi-definite loss Hessian, as from MSE or cross-entropy
    checks: list[Check] = []

    def check(rule: str, curvature: str, value: np.ndarray, reference: np.ndarray, tolerance: float,
              symbolic: Expr) -> None:
        vacuous = not np.any(np.abs(reference) > 1e-12) and not isinstance(symbolic, Zero)
        checks.append(Check(module.name, rule, curvature, relative_error(value, reference), tolerance, vacuous))

    # The R-operator: every variable moves along a random tangent, δz along R{δz}.
    tangents = {v.name: rng.normal(size=np.shape(values[v.name])) for v in module.variables}
    Rdz = rng.normal(size=size)
    check("R{z}", "-", d.evaluate_jvp(values, tangents), fd_jvp(module, values, tangents), TOLERANCES["jacobian"],
          d.jvp(tuple(v.name for v in module.variables)))
    gradient_tangents = fd_gradient_tangents(module, values, dz, tangents, Rdz)
    for v in module.variables:
        label = v.name if v.is_vector else f"vec {v.name}"
        J_fd = fd_jacobian(module, v.name, values)
        check(f"Dz({label})", "-", d.evaluate_jacobian(v.name, values), J_fd, TOLERANCES["jacobian"],
              d.jacobian(v.name))
        check(f"δ{v.name}", "-", d.evaluate_gradient(v.name, values, dz), J_fd.T @ dz, TOLERANCES["gradient"],
              d.gradient(v.name))
        for c in curvatures:
            check(f"𝓗{label}", c, d.evaluate_hbp(v.name, values, dz=dz, Hz=Hz, curvature=c),
                  fd_hbp(module, v.name, values, dz, Hz, c), TOLERANCES["hbp"], d.hbp(v.name, c))
        check(f"R{{δ{v.name}}}", "-",
              d.evaluate_gradient_tangent(v.name, values, dz=dz, tangents=tangents, Rdz=Rdz),
              gradient_tangents[v.name], TOLERANCES["hbp"],
              d.gradient_tangent(v.name, tuple(tangents)))
        if module.output.is_scalar:
            check(f"Hz({label})", "-", d.evaluate_hessian(v.name, values),
                  fd_second_order(module, v.name, values, np.ones(1)), TOLERANCES["hessian"], d.hessian(v.name))
    return checks


def _domain_hint(module: Module, ev: Evaluator) -> str:
    """Which function left its domain at the sample point, and the symbols it reads that could be declared
    positive (a sample is drawn from a normal distribution unless its symbol says ``positive=True``)."""
    for node in module.output.walk():
        if isinstance(node, Apply) and not np.all(np.isfinite(ev.value(node))):
            free = sorted((s for s in node.operand.symbols if "positive" not in s.hints), key=lambda s: s.name)
            where = f": {node.function.name} is not finite there"
            if not free:
                return where
            kind = "Scalar" if free[0].is_scalar else "Vector" if free[0].is_vector else "Matrix"
            return where + (f"; if {', '.join(s.name for s in free)} must be positive, declare it so "
                            f"(mc.{kind}({free[0].name!r}, ..., positive=True)) and verify samples it there")
    return ""
