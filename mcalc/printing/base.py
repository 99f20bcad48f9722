"""The printer skeleton: one ``_print_<Node>`` method per node type, as SymPy's printers.

Parentheses come from precedence: a child is wrapped when it binds looser
than the position it is printed in.
"""
from __future__ import annotations

import sympy as sp

from ..expr import Expr, ScalarMul

PRECEDENCE = {
    "Add": 10,
    "Kron": 20,
    "Hadamard": 25,
    "ScalarMul": 30,
    "ScaleBy": 30,
    "MatMul": 40,
    "Transpose": 90,
    "Inverse": 90,
}
ATOM = 100


class Printer:
    """Base class; subclasses define the ``_print_<Node>`` methods. ``names``: subexpressions printed as
    a name (common subexpressions a report defines once, :mod:`.shared`)."""

    def __init__(self, names: dict[Expr, str] | None = None) -> None:
        self.names = names or {}

    def doprint(self, expr: Expr, *, define: bool = False) -> str:
        """``expr`` printed; ``define``: it is itself named, and is printed out (its definition)."""
        return self._print(expr, top=define)

    def _print(self, expr: Expr, top: bool = False) -> str:
        if not top and expr in self.names:
            return self.names[expr]
        method = getattr(self, f"_print_{type(expr).__name__}", None)
        if method is None:
            raise NotImplementedError(f"{type(self).__name__} cannot print {type(expr).__name__}")
        return method(expr)

    def precedence(self, expr: Expr) -> int:
        return ATOM if expr in self.names else PRECEDENCE.get(type(expr).__name__, ATOM)

    def parens(self, text: str) -> str:
        return f"({text})"

    def wrap(self, expr: Expr, level: int, strict: bool = False) -> str:
        """``expr`` printed, parenthesised if it binds looser than ``level``."""
        p = self.precedence(expr)
        text = self._print(expr)
        return self.parens(text) if p < level or (strict and p == level) else text

    def dim(self, d: sp.Expr) -> str:
        return str(d).replace("*", "")

    minus = "-"

    def _print_Add(self, e: Expr) -> str:
        """A sum, a negative constant multiple written as a subtraction (``minus`` is the sign)."""
        out = self._print(e.args[0])
        for t in e.args[1:]:
            if isinstance(t, ScalarMul) and t.coefficient.is_number and t.coefficient < 0:
                positive = t.operand if t.coefficient == -1 else ScalarMul(-t.coefficient, t.operand)
                out += f" {self.minus} " + self.wrap(positive, 10, strict=True)
            else:
                out += " + " + self._print(t)
        return out


def spec_text(values: tuple) -> str:
    """A convolution's hyper-parameter over its dimensions: 5, or 3x3 for an image's; a padding that
    differs before and after, 0_1."""
    return "x".join(str(v) if isinstance(v, int) else f"{v[0]}_{v[1]}" for v in values)
