"""Hessian backpropagation, equations (4a)/(4b), in four curvature modes (Section 3.2).

    𝓗v = [Dz(v)]ᵀ 𝓗z [Dz(v)] + Σₖ [Hzₖ(v)] δzₖ

``exact``     both terms;
``ggn``       the first term only (generalised Gauss-Newton);
``pch-abs``   the second term's eigenvalues cast to |λ| (positive-curvature Hessian);
``pch-clip``  the second term's negative eigenvalues set to 0.
"""
from __future__ import annotations

from ..expr import Add, Expr, MatMul, PSDProjection, Seed, Symbol, Transpose, Zero
from ..modes import CURVATURES, Curvature
from ..simplification import simplify

__all__ = ["CURVATURES", "cast_concave", "gauss_newton_term", "hbp", "variable_label"]


def gauss_newton_term(jacobian: Expr, hz: Seed) -> Expr:
    """[Dz(v)]ᵀ 𝓗z [Dz(v)], the first term of (4a)/(4b)."""
    return simplify(MatMul(Transpose(jacobian), hz, jacobian))


def cast_concave(second_order: Expr, curvature: Curvature | str) -> Expr:
    """The second term of (4a)/(4b) as the curvature mode treats it."""
    curvature = Curvature.parse(curvature)
    if curvature is Curvature.EXACT:
        return second_order
    if curvature is Curvature.GGN:
        return Zero(*second_order.shape)
    return simplify(PSDProjection(curvature.projection, second_order))


def hbp(ggn_term: Expr, second_order: Expr, curvature: Curvature | str) -> Expr:
    """(4a)/(4b) in the given curvature mode."""
    return simplify(Add(ggn_term, cast_concave(second_order, curvature)))


def variable_label(v: Symbol) -> str:
    """'x' for a vector, 'vec W' for a matrix: what 𝓗 and D act on."""
    return v.name if v.is_vector else f"vec {v.name}"
