"""Rewrites that a code generator wants and a reader does not.

``diag(a) H diag(b) = H ⊙ a bᵀ`` turns two scalings into one elementwise pass
that fuses with its neighbours; the paper's (S.9) form stays the display form.
"""
from __future__ import annotations

from ..expr import Diag, Expr, Hadamard, MatMul, Transpose
from .engine import rule


@rule(MatMul, "diag(a) H diag(b) = H ⊙ (a bᵀ)", ruleset="fusion")
def diagonal_sandwich(e: MatMul) -> Expr | None:
    f = e.args
    for i in range(len(f) - 2):
        left, middle, right = f[i], f[i + 1], f[i + 2]
        if isinstance(left, Diag) and isinstance(right, Diag) and not isinstance(middle, Diag):
            a, b = left.args[0], right.args[0]
            fused = Hadamard(middle, MatMul(a, Transpose(b)))
            rest = f[:i] + (fused,) + f[i + 3 :]
            return rest[0] if len(rest) == 1 else MatMul(*rest)
    return None
