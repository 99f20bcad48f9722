"""Hessian backpropagation, equations (4a)/(4b), in four curvature modes (Section 3.2).

    𝓗v = [Dz(v)]ᵀ 𝓗z [Dz(v)] + Σₖ [Hzₖ(v)] δzₖ

``exact``     both terms;
``ggn``       the first term only (generalised Gauss-Newton);
``pch-abs``   the second term's eigenvalues cast to |λ| (positive-curvature Hessian);
``pch-clip``  the second term's negative eigenvalues set to 0.
"""
from __future__ import annotations

from ..errors import McalcError
from ..expr import Add, Expr, MatMul, PSDProjection, Seed, Symbol, Transpose, Zero
from ..simplify import simplify

CURVATURES = ("exact", "ggn", "pch-abs", "pch-clip")


def check_curvature(curvature: str) -> str:
    if curvature not in CURVATURES:
        raise McalcError(f"unknown curvature {curvature!r}; choose one of {', '.join(CURVATURES)}")
    return curvature


def gauss_newton_term(jacobian: Expr, hz: Seed) -> Expr:
    """[Dz(v)]ᵀ 𝓗z [Dz(v)], the first term of (4a)/(4b)."""
    return simplify(MatMul(Transpose(jacobian), hz, jacobian))


def cast_concave(second_order: Expr, curvature: str) -> Expr:
    """The second term of (4a)/(4b) as the curvature mode treats it."""
    if curvature == "exact":
        return second_order
    if curvature == "ggn":
        return Zero(*second_order.shape)
    return simplify(PSDProjection(curvature.removeprefix("pch-"), second_order))


def hbp(ggn_term: Expr, second_order: Expr, curvature: str) -> Expr:
    """(4a)/(4b) in the given curvature mode."""
    return simplify(Add(ggn_term, cast_concave(second_order, check_curvature(curvature))))


def variable_label(v: Symbol) -> str:
    """'x' for a vector, 'vec W' for a matrix: what 𝓗 and D act on."""
    return v.name if v.is_vector else f"vec {v.name}"
