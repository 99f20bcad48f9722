"""Safeguards shared by the second-order optimisers, written once.

- :class:`LevenbergMarquardt`: a damping adapted from the reduction ratio ρ of the step just taken
  (Moré 1978; Martens 2010, Section 4.1; Martens & Grosse 2015, Section 6.5; kfac-jax's
  ``_compute_new_damping_and_rho``): raised when the loss fell by less than a quarter of what the
  quadratic model promised, lowered when by more than three quarters.
- :func:`damped_solve`: solves a damped symmetric system, and when NumPy or CuPy finds it singular or
  the solution is not finite, raises the damping and warns instead of ending the run with a traceback
  (an eigen-decomposition that fails likewise leaves its block to CG, :mod:`.block_solvers`).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any


def reduction_ratio(old_loss: float, new_loss: float, model_change: float) -> float:
    """ρ = (f(θ + d) − f(θ)) / q(d): the actual change of the loss over the change the quadratic model
    q predicted. A loss that is not finite, or a model that predicts no decrease, counts as ρ = −∞."""
    if not math.isfinite(new_loss) or not model_change < 0:
        return -math.inf
    return (new_loss - old_loss) / model_change


@dataclass
class LevenbergMarquardt:
    """λ ← λ·``increase`` when ρ < ``lower``, λ ← λ·``decrease`` when ρ > ``upper``, kept in
    [``minimum``, ``maximum``] (the rule of Moré 1978 as Martens 2010 and kfac-jax apply it)."""

    value: float
    increase: float = 1.5
    decrease: float = 2.0 / 3.0
    lower: float = 0.25
    upper: float = 0.75
    minimum: float = 0.0
    maximum: float = math.inf

    def update(self, rho: float) -> float:
        """Adapt λ to the reduction ratio ``rho`` (NaN counts as a failure); returns the new λ."""
        if not rho >= self.lower:
            self.value *= self.increase
        elif rho > self.upper:
            self.value *= self.decrease
        self.value = min(self.maximum, max(self.minimum, self.value))
        return self.value


def is_linalg_error(exc: Exception) -> bool:
    """Whether ``exc`` is NumPy's or CuPy's report of a failed factorisation (singular, no convergence)."""
    return "LinAlgError" in type(exc).__name__ or "singular" in str(exc).lower()


def damped_solve(matrix: Any, rhs: Any, xp: Any, *, what: str = "system", attempts: int = 6) -> Any:
    """``matrix⁻¹ rhs`` for a symmetric matrix that ought to be positive definite.

    When the solve fails (singular to working precision) or gives a result that is not finite, the
    diagonal is raised by 10⁻⁸·(1 + mean |diagonal|), then tenfold each further attempt, with a
    warning naming ``what``; only when every attempt fails is the run stopped with an
    :class:`~mcalc.errors.McalcError`.
    """
    from ..errors import McalcError

    shift = 0.0
    scale = 1.0 + float(xp.abs(xp.diagonal(matrix)).mean())
    for attempt in range(attempts):
        shifted = matrix if shift == 0.0 else matrix + shift * xp.eye(matrix.shape[0], dtype=matrix.dtype)
        try:
            solution = xp.linalg.solve(shifted, rhs)
            if bool(xp.isfinite(solution).all()):
                if shift:
                    warnings.warn(f"{what} was singular; solved with the diagonal raised by {shift:.1e}",
                                  RuntimeWarning, stacklevel=2)
                return solution
        except Exception as exc:  # numpy.linalg.LinAlgError, or CuPy's own
            if not is_linalg_error(exc):
                raise
        shift = 1e-8 * scale if attempt == 0 else shift * 100
    raise McalcError(f"{what} stays singular with its diagonal raised by {shift:.1e}: the curvature is not finite")
