"""The errors mcalc raises for bad input.

Every error a user can provoke is an :class:`McalcError`; the command line
prints its message and exits with status 2 instead of a traceback.
"""
from __future__ import annotations


class McalcError(Exception):
    """Base class of every error caused by the user's input."""


class DeclarationError(McalcError):
    """A malformed declaration: bad name, bad role, bad module."""


class ShapeError(DeclarationError):
    """Operands whose shapes do not fit the operation."""


class DimensionError(McalcError):
    """A dimension that is malformed, unknown, or bound inconsistently."""


class UnsupportedOperationError(McalcError):
    """An operation the engine has no rule for."""


class DifferentiabilityError(McalcError):
    """A derivative asked of a function that does not have one."""


class ModuleFileError(McalcError):
    """A FILE.py that cannot be loaded or defines no module."""


class EvaluationError(McalcError):
    """Numeric values that do not fit a module (missing, wrong shape, not finite)."""
