"""The differential engine (layers 2–3): Jacobians, second differentials, HBP rules."""
from .derivation import Derivation, DerivedRule, derive
from .hbp import CURVATURES
from .jacobian import jacobian

__all__ = ["CURVATURES", "Derivation", "DerivedRule", "derive", "jacobian"]
