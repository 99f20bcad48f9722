"""Adjoint (reverse-mode) rules: transposed Jacobians applied to a matrix-shaped adjoint.

For z = f(A, B, ...) and an adjoint Λ of z's shape, each rule returns the
adjoints of the children, unvec(J_childᵀ vec Λ), in matrix form. This is
gradient backpropagation δx = [Dz(x)]ᵀ δz (Section 3) and also the "δz held
fixed" that the second-order term of (4a)/(4b) passes down to every node.
"""
from __future__ import annotations

from collections.abc import Callable

from ..errors import UnsupportedOperationError
from ..expr import (
    ONE,
    Add,
    Apply,
    Diag,
    Expr,
    Fold,
    Hadamard,
    Identity,
    Inverse,
    Kron,
    LogSoftmax,
    MatMul,
    Ones,
    ScalarMul,
    ScaleBy,
    Softmax,
    Sum,
    Symbol,
    Trace,
    Transpose,
    Unfold,
    Vec,
    WindowArgmax,
    Zero,
    product,
)
from ..simplification import simplify

VJP_RULES: dict[type, Callable[[Expr, Expr], list[Expr]]] = {}


def defvjp(node_type: type) -> Callable:
    """Register the adjoint rule of ``node_type``."""

    def register(fn: Callable[[Expr, Expr], list[Expr]]) -> Callable[[Expr, Expr], list[Expr]]:
        VJP_RULES[node_type] = fn
        return fn

    return register


def child_adjoints(node: Expr, adjoint: Expr) -> list[Expr]:
    """The adjoints of ``node``'s children given the adjoint of ``node``."""
    rule = VJP_RULES.get(type(node))
    if rule is None:
        raise UnsupportedOperationError(f"no adjoint rule for operation '{type(node).__name__}' in {node!r}")
    return [simplify(a) for a in rule(node, adjoint)]


def backprop(expr: Expr, wrt: Symbol, adjoint: Expr) -> Expr:
    """unvec([Dz(v)]ᵀ vec Λ): the gradient of ⟨Λ, z⟩ with respect to v, in v's shape."""
    contributions: list[Expr] = []

    def visit(node: Expr, lam: Expr) -> None:
        if node == wrt:
            contributions.append(lam)
            return
        if wrt not in node.symbols:
            return
        for child, child_lam in zip(node.children, child_adjoints(node, lam)):
            visit(child, child_lam)

    visit(expr, adjoint)
    return simplify(Add(*contributions) if len(contributions) > 1 else contributions[0])


@defvjp(MatMul)
def _matmul(node: MatMul, lam: Expr) -> list[Expr]:
    out = []  # ⟨Λ, L dA R⟩ = ⟨Lᵀ Λ Rᵀ, dA⟩
    for i, a in enumerate(node.args):
        left = product(node.args[:i], a.rows)
        right = product(node.args[i + 1 :], a.cols)
        out.append(MatMul(Transpose(left), lam, Transpose(right)))
    return out


@defvjp(Add)
def _add(node: Add, lam: Expr) -> list[Expr]:
    return [lam for _ in node.args]


@defvjp(ScalarMul)
def _scalar_mul(node: ScalarMul, lam: Expr) -> list[Expr]:
    return [ScalarMul(node.coefficient, lam)]


@defvjp(ScaleBy)
def _scale_by(node: ScaleBy, lam: Expr) -> list[Expr]:
    s, a = node.args  # ⟨Λ, ds A + s dA⟩ = ds·sum(Λ⊙A) + ⟨sΛ, dA⟩
    return [Sum(Hadamard(lam, a)), ScaleBy(s, lam)]


@defvjp(Hadamard)
def _hadamard(node: Hadamard, lam: Expr) -> list[Expr]:
    a, b = node.args
    return [Hadamard(lam, b), Hadamard(lam, a)]


@defvjp(Transpose)
def _transpose(node: Transpose, lam: Expr) -> list[Expr]:
    return [Transpose(lam)]


@defvjp(Apply)
def _apply(node: Apply, lam: Expr) -> list[Expr]:
    return [Hadamard(lam, Apply(node.function.derivative(1), node.operand))]


@defvjp(Sum)
def _sum(node: Sum, lam: Expr) -> list[Expr]:
    (a,) = node.args
    return [ScaleBy(lam, Ones(*a.shape))]


@defvjp(Trace)
def _trace(node: Trace, lam: Expr) -> list[Expr]:
    (a,) = node.args
    return [ScaleBy(lam, Identity(a.rows))]


@defvjp(Softmax)
def _softmax(node: Softmax, lam: Expr) -> list[Expr]:
    p = node  # (diag p − p pᵀ) λ = p ⊙ λ − p (pᵀ λ), column by column for a matrix (the Jacobian is symmetric)
    if p.cols != ONE:
        scaled = Hadamard(p, lam)
        return [Add(scaled, ScalarMul(-1, Hadamard(p, MatMul(Ones(p.rows, p.rows), scaled))))]
    return [Add(Hadamard(p, lam), ScalarMul(-1, MatMul(p, Transpose(p), lam)))]


@defvjp(LogSoftmax)
def _log_softmax(node: LogSoftmax, lam: Expr) -> list[Expr]:
    (x,) = node.args  # (I − 1 pᵀ)ᵀ λ = λ − p (1ᵀ λ)
    return [Add(lam, ScalarMul(-1, ScaleBy(Sum(lam), Softmax(x))))]


@defvjp(Inverse)
def _inverse(node: Inverse, lam: Expr) -> list[Expr]:
    return [ScalarMul(-1, MatMul(Transpose(node), lam, Transpose(node)))]  # −A⁻ᵀ Λ A⁻ᵀ


@defvjp(Diag)
def _diag(node: Diag, lam: Expr) -> list[Expr]:
    (v,) = node.args  # ⟨Λ, diag dv⟩ = ⟨(Λ ⊙ I) 1, dv⟩: the diagonal of Λ
    return [MatMul(Hadamard(lam, Identity(v.rows)), Ones(v.rows, ONE))]


@defvjp(Unfold)
def _unfold(node: Unfold, lam: Expr) -> list[Expr]:
    _, spec, size = node.args  # ⟨Λ, unfold dX⟩ = ⟨fold Λ, dX⟩: each patch entry back to where it was read
    return [Fold(lam, spec, size)]


@defvjp(WindowArgmax)
def _window_argmax(node: WindowArgmax, lam: Expr) -> list[Expr]:
    return [Zero(*node.args[0].shape)]  # piecewise constant: nothing flows back through the mask


@defvjp(Fold)
def _fold(node: Fold, lam: Expr) -> list[Expr]:
    _, spec, size = node.args
    return [Unfold(lam, spec, size)]


@defvjp(Vec)
def _vec(node: Vec, lam: Expr) -> list[Expr]:
    (a,) = node.args  # ⟨λ, vec dA⟩ = ⟨unvec λ, dA⟩
    if a.cols == ONE:
        return [lam]  # vec of a column is the column
    # unvec λ = (vec(Iₙ)ᵀ ⊗ Iₘ)(Iₙ ⊗ λ) for A of shape (m, n): column j of Iₙ ⊗ λ holds λ in block
    # row j, and vec(Iₙ)ᵀ ⊗ Iₘ adds block j of that column, λ's entries m·j … m·j + m − 1, into column j
    n = Identity(a.cols)
    return [MatMul(Kron(Transpose(Vec(n)), Identity(a.rows)), Kron(n, lam))]
