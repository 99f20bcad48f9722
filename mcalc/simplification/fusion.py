"""Rewrites that a code generator wants and a reader does not, applied to every node a program plans.

``C diag(a)² Cᵀ = (C diag(a))(C diag(a))ᵀ`` turns a product into a Gram matrix,
which BLAS forms by half (syrk) from a scaled C that the forward pass may hold
already (LayerNorm's normalised input (x − μ)/σ, in its gain's block).
"""
from __future__ import annotations

from ..expr import Expr, Hadamard, MatMul, Ones, Transpose, broadcast_source, is_broadcast
from .engine import Simplifier, rule, simplify


def _squared_column_scale(node: Expr) -> tuple[Expr, Expr] | None:
    """(a, C) for (1 (a ⊙ a)) ⊙ C, C diag(a)² with a a row: each column of C scaled by a square."""
    if not isinstance(node, Hadamard):
        return None
    for scale, c in (node.args, node.args[::-1]):
        row = broadcast_source(scale) if is_broadcast(scale) and isinstance(scale.args[0], Ones) else None
        if isinstance(row, Hadamard) and row.args[0] == row.args[1]:
            return row.args[0], c
    return None


@rule(MatMul, "C diag(a)² Cᵀ = (C diag(a)) (C diag(a))ᵀ, C diag(a) = (1 aᵀ) ⊙ C", ruleset="fusion")
def scaled_gram(e: MatMul) -> Expr | None:
    f = e.args
    for i in range(len(f) - 1):
        found = _squared_column_scale(f[i])
        if found is not None and simplify(Transpose(found[1])) == f[i + 1]:
            a, c = found
            p = simplify(Hadamard(MatMul(Ones(c.rows, a.rows), a), c))
            return MatMul(*f[:i], p, Transpose(p), *f[i + 2 :])
    return None


for_codegen = Simplifier(("fusion",))  # a node as code is planned: the fusion rules alone, remembered
