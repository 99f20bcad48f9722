"""Second differentials: the module's own curvature Σₖ [Hzₖ(v)] δzₖ of (4a)/(4b).

That term is the Hessian of the scalar ⟨Λ, z(v)⟩ with the adjoint Λ = unvec δz
held fixed. Its second differential splits over the nodes of z: every node
adds the part of d²(node) that comes from its own non-linearity (a *local*
term, stated below per operation from M&N ch. 10), and passes the adjoint on
to its children (:mod:`adjoint`), whose own d² terms are weighted by it.

Each local term is a quadratic form in d vec v, d²⟨Λ, z⟩ = (d vec v)ᵀ B d vec v;
the second identification table (M&N 10.4; S.4–S.7) then reads off the
Hessian ½(B + Bᵀ), which is what the rules return.
"""
from __future__ import annotations

from collections.abc import Callable

from ..expr import (
    ONE,
    Add,
    Apply,
    Commutation,
    Diag,
    Expr,
    Hadamard,
    Inverse,
    Kron,
    LogSoftmax,
    MatMul,
    ScalarMul,
    ScaleBy,
    Softmax,
    Sum,
    Symbol,
    Transpose,
    Vec,
    Zero,
    product,
)
from ..simplification import simplify
from .adjoint import VJP_RULES, child_adjoints
from .jacobian import Jacobians, column_blocks

LOCAL_RULES: dict[type, Callable[[Expr, Expr, Jacobians], list[Expr]]] = {}


def deflocal(node_type: type) -> Callable:
    """Register the local second-differential term of ``node_type``."""

    def register(fn: Callable[[Expr, Expr, Jacobians], list[Expr]]) -> Callable:
        LOCAL_RULES[node_type] = fn
        return fn

    return register


def _depends(jac: Expr) -> bool:
    return not isinstance(jac, Zero)


def _symmetrised(left: Expr, middle: Expr, right: Expr) -> list[Expr]:
    """Hessian of the form (d vec v)ᵀ 2 Lᵀ M R d vec v: Lᵀ M R + Rᵀ Mᵀ L (M&N 10.4)."""
    term = MatMul(Transpose(left), middle, right)
    return [term, Transpose(term)]


def second_order_term(expr: Expr, wrt: Symbol, adjoint: Expr, jac: Jacobians | None = None) -> Expr:
    """H⟨Λ, z⟩(v): Σₖ [Hzₖ(v)] δzₖ for Λ = unvec δz, structured and simplified."""
    jac = jac or Jacobians(wrt)
    terms: list[Expr] = []

    def visit(node: Expr, lam: Expr) -> None:
        if wrt not in node.symbols or node == wrt:
            return
        local = LOCAL_RULES.get(type(node))
        if local is not None:
            terms.extend(local(node, lam, jac))
        for child, child_lam in zip(node.children, child_adjoints(node, lam)):
            visit(child, child_lam)

    visit(expr, adjoint)
    if not terms:
        return Zero(wrt.size, wrt.size)
    return simplify(Add(*terms) if len(terms) > 1 else terms[0])


@deflocal(MatMul)
def _matmul(node: MatMul, lam: Expr, jac: Jacobians) -> list[Expr]:
    # d²(…Aᵢ…Aⱼ…) ∋ 2 L dAᵢ M dAⱼ R. With P = R Λᵀ L:
    # ⟨Λ, L dAᵢ M dAⱼ R⟩ = tr(P dAᵢ M dAⱼ) = vec(dAⱼ)ᵀ K_{cⱼ,rⱼ} (Mᵀ ⊗ P) vec dAᵢ  (M&N 2.4, 3.7)
    f = node.args
    out: list[Expr] = []
    for i in range(len(f)):
        for j in range(i + 1, len(f)):
            ji, jj = jac(f[i]), jac(f[j])
            if not (_depends(ji) and _depends(jj)):
                continue
            left = product(f[:i], f[i].rows)
            middle = product(f[i + 1 : j], f[i].cols)
            right = product(f[j + 1 :], f[j].cols)
            p = MatMul(right, Transpose(lam), left)
            bilinear = MatMul(Commutation(f[j].cols, f[j].rows), Kron(Transpose(middle), p))
            out += _symmetrised(jj, bilinear, ji)
    return out


@deflocal(Hadamard)
def _hadamard(node: Hadamard, lam: Expr, jac: Jacobians) -> list[Expr]:
    # d²(A⊙B) ∋ 2 dA⊙dB; ⟨Λ, dA⊙dB⟩ = (vec dA)ᵀ diag(vec Λ) vec dB
    a, b = node.args
    ja, jb = jac(a), jac(b)
    if not (_depends(ja) and _depends(jb)):
        return []
    return _symmetrised(ja, Diag(Vec(lam)), jb)


@deflocal(ScaleBy)
def _scale_by(node: ScaleBy, lam: Expr, jac: Jacobians) -> list[Expr]:
    # d²(sA) ∋ 2 ds dA; ⟨Λ, ds dA⟩ = ds (vec Λ)ᵀ vec dA
    s, a = node.args
    js, ja = jac(s), jac(a)
    if not (_depends(js) and _depends(ja)):
        return []
    return _symmetrised(js, Transpose(Vec(lam)), ja)


@deflocal(Apply)
def _apply(node: Apply, lam: Expr, jac: Jacobians) -> list[Expr]:
    # d²φ(A) ∋ φ''(A) ⊙ dA ⊙ dA: Hessian Jᵀ diag(vec(Λ ⊙ φ''(A))) J  (S.9)
    ja = jac(node.operand)
    curvature = Hadamard(lam, Apply(node.function.derivative(2), node.operand))
    return [MatMul(Transpose(ja), Diag(Vec(curvature)), ja)]


@deflocal(Softmax)
def _softmax(node: Softmax, lam: Expr, jac: Jacobians) -> list[Expr]:
    # H⟨λ, softmax(x)⟩ = diag(u) − u pᵀ − p uᵀ with u = (diag p − p pᵀ) λ; of a matrix, column by column:
    # the block diagonal diag(vec U) − diag(vec U) C diag(vec S) − diag(vec S) C diag(vec U), C = I_T ⊗ 1 1ᵀ
    p = node
    jx = jac(node.args[0])
    if p.cols != ONE:
        (u,) = VJP_RULES[Softmax](p, lam)
        s, du, blocks = Diag(Vec(p)), Diag(Vec(u)), column_blocks(p)
        middle = Add(du, ScalarMul(-1, MatMul(du, blocks, s)), ScalarMul(-1, MatMul(s, blocks, du)))
        return [MatMul(Transpose(jx), middle, jx)]
    u = Add(Hadamard(p, lam), ScalarMul(-1, MatMul(p, Transpose(p), lam)))
    middle = Add(Diag(u), ScalarMul(-1, MatMul(u, Transpose(p))), ScalarMul(-1, MatMul(p, Transpose(u))))
    return [MatMul(Transpose(jx), middle, jx)]


@deflocal(LogSoftmax)
def _log_softmax(node: LogSoftmax, lam: Expr, jac: Jacobians) -> list[Expr]:
    # d² log softmax(x) = −1 (dxᵀ (diag p − p pᵀ) dx): weighted by λ, −(1ᵀλ)(diag p − p pᵀ)
    (x,) = node.args
    p = Softmax(x)
    middle = ScalarMul(-1, ScaleBy(Sum(lam), Add(Diag(p), ScalarMul(-1, MatMul(p, Transpose(p))))))
    jx = jac(x)
    return [MatMul(Transpose(jx), middle, jx)]


@deflocal(Inverse)
def _inverse(node: Inverse, lam: Expr, jac: Jacobians) -> list[Expr]:
    # d²A⁻¹ ∋ 2 A⁻¹ dA A⁻¹ dA A⁻¹; ⟨Λ, ·⟩ = tr(P dA Q dA), Q = A⁻¹, P = Q Λᵀ Q  (M&N 8.4)
    q = node
    (a,) = node.args
    ja = jac(a)
    p = MatMul(q, Transpose(lam), q)
    bilinear = MatMul(Commutation(a.cols, a.rows), Kron(Transpose(q), p))
    return _symmetrised(ja, bilinear, ja)


# Add, ScalarMul, Transpose, Sum, Trace, Vec, Unfold, Fold are linear: d² of a linear map is 0, no local term;
# WindowArgmax is piecewise constant, its d² 0 almost everywhere.
