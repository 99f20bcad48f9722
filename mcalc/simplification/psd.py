"""Rewrites of the positive-curvature projection (PCH, Section 3.2; Chen et al. 2018).

A concave term S of (4a)/(4b) is replaced by V f(Λ) Vᵀ with f = |·| ('abs') or
max(·, 0) ('clip') over its eigen-decomposition S = V Λ Vᵀ. Where S has
structure, the decomposition is known without computing it, and these
rewrites keep the result structured: a diagonal term is cast entry by entry,
a Kronecker term factor by factor.
"""
from __future__ import annotations

from ..expr import (
    Add,
    Apply,
    Diag,
    Expr,
    Hadamard,
    Identity,
    Kron,
    MatMul,
    PSDProjection,
    RankSum,
    ScalarMul,
    ScaleBy,
    Transpose,
    Zero,
)
from ..functions import absolute, relu
from ..modes import Projection
from .engine import rule

_CAST = {Projection.ABS: absolute, Projection.CLIP: relu}


def is_symmetric(e: Expr) -> bool:
    """Symmetry that follows from structure (palindromic products, symmetric factors, sums, Hadamard
    products and sums over the ranks of symmetric terms)."""
    if e.symmetric:
        return True
    if isinstance(e, MatMul):
        factors = e.args
        half = len(factors) // 2
        mirrored = all(Transpose(factors[i]) == factors[-1 - i] or factors[i] == Transpose(factors[-1 - i])
                       for i in range(half))
        middle_ok = len(factors) % 2 == 0 or is_symmetric(factors[half])
        return mirrored and middle_ok
    if isinstance(e, (Add, Hadamard)):
        return all(is_symmetric(t) for t in e.args)
    if isinstance(e, RankSum):
        return is_symmetric(e.args[0])
    if isinstance(e, (ScalarMul, ScaleBy)):
        return is_symmetric(e.args[1])
    if isinstance(e, Kron):
        return is_symmetric(e.args[0]) and is_symmetric(e.args[1])
    return False


def is_psd(e: Expr) -> bool:
    """Positive semi-definiteness that follows from structure: A Aᵀ, Aᵀ P A, I, cast diagonals..."""
    if isinstance(e, (Identity, PSDProjection)):
        return True
    if isinstance(e, Diag):
        v = e.args[0]
        return isinstance(v, Apply) and v.function in (absolute, relu)
    if isinstance(e, MatMul) and is_symmetric(e):
        factors = e.args
        return len(factors) % 2 == 0 or is_psd(factors[len(factors) // 2])
    if isinstance(e, Kron):
        return is_psd(e.args[0]) and is_psd(e.args[1])
    if isinstance(e, ScalarMul):
        return bool(e.coefficient.is_nonnegative) and is_psd(e.operand)
    if isinstance(e, Add):
        return all(is_psd(t) for t in e.args)
    return False


@rule(PSDProjection, "P(S) = S for S ⪰ 0; P(0) = 0 (Section 3.2)")
def psd_trivial(e: PSDProjection) -> Expr | None:
    if isinstance(e.operand, Zero) or is_psd(e.operand):
        return e.operand
    return None


@rule(PSDProjection, "eigenvalues of diag(v) are v: cast the diagonal entrywise (S.9, Section 3.2)")
def psd_diagonal(e: PSDProjection) -> Expr | None:
    if isinstance(e.operand, Diag):
        return Diag(Apply(_CAST[e.mode], e.operand.args[0]))
    return None


@rule(PSDProjection, "|c S| = |c| |S|; clip(c S) = c clip(S) for c ≥ 0")
def psd_constant(e: PSDProjection) -> Expr | None:
    a = e.operand
    if isinstance(a, ScalarMul) and a.coefficient.is_number:
        c = a.coefficient
        if c >= 0:
            return ScalarMul(c, PSDProjection(e.mode, a.operand))
        if e.mode == Projection.ABS:
            return ScalarMul(-c, PSDProjection(e.mode, a.operand))
    if isinstance(a, ScaleBy) and e.mode == Projection.ABS:
        return ScaleBy(Apply(absolute, a.args[0]), PSDProjection(e.mode, a.args[1]))
    return None


@rule(PSDProjection, "eig(A⊗B) = {λᵢμⱼ} with vectors uᵢ⊗vⱼ (M&N 2.2): cast factor by factor")
def psd_kronecker(e: PSDProjection) -> Expr | None:
    a = e.operand
    if not isinstance(a, Kron) or not (is_symmetric(a.args[0]) and is_symmetric(a.args[1])):
        return None
    left, right = a.args
    if e.mode == Projection.ABS:  # |λμ| = |λ||μ|
        return Kron(PSDProjection(Projection.ABS, left), PSDProjection(Projection.ABS, right))
    if is_psd(left):  # max(λμ, 0) = λ max(μ, 0) for λ ≥ 0
        return Kron(left, PSDProjection(Projection.CLIP, right))
    if is_psd(right):
        return Kron(PSDProjection(Projection.CLIP, left), right)
    return None
