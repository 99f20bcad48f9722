"""First differentials and Jacobians (Magnus & Neudecker ch. 9; the paper's S.1–S.3).

Each rule states the first differential of one operation, vectorised with
vec(ABC) = (Cᵀ ⊗ A) vec B (S.1), in the form d vec z = J_node d vec v where
d vec(child) = J_child d vec v. By the first identification table (M&N 9.6)
J_node is then the Jacobian Dz(v) = ∂ vec z / ∂ (vec v)ᵀ (S.2), and chaining
the rules is the chain rule (S.3).

Rules are registered per node type (in the style of JAX's ``defjvp``); an
operation without one is an error that names it.
"""
from __future__ import annotations

from collections.abc import Callable

from ..errors import UnsupportedOperationError
from ..expr import (
    ONE,
    Add,
    Apply,
    Commutation,
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
    Seed,
    Softmax,
    Sum,
    Symbol,
    Trace,
    Transpose,
    Unfold,
    UnfoldMatrix,
    Vec,
    WindowArgmax,
    Zero,
    product,
)
from ..simplification import simplify

JacobianOf = Callable[[Expr], Expr]
JVP_RULES: dict[type, Callable[[Expr, JacobianOf], Expr]] = {}


def defjvp(node_type: type) -> Callable:
    """Register the first-differential rule of ``node_type``."""

    def register(fn: Callable[[Expr, JacobianOf], Expr]) -> Callable[[Expr, JacobianOf], Expr]:
        JVP_RULES[node_type] = fn
        return fn

    return register


def no_rule(node: Expr) -> UnsupportedOperationError:
    return UnsupportedOperationError(
        f"no differential rule for operation '{type(node).__name__}' in {node!r}"
    )


class Jacobians:
    """Jacobians of every subexpression with respect to one symbol, memoised and simplified."""

    def __init__(self, wrt: Symbol) -> None:
        self.wrt = wrt
        self._memo: dict[Expr, Expr] = {}

    def __call__(self, node: Expr) -> Expr:
        if node in self._memo:
            return self._memo[node]
        v = self.wrt
        if node == v:
            result: Expr = Identity(v.size)
        elif v not in node.symbols:
            result = Zero(node.size, v.size)
        else:
            rule = JVP_RULES.get(type(node))
            if rule is None:
                raise no_rule(node)
            result = simplify(rule(node, self))
        self._memo[node] = result
        return result


def jacobian(expr: Expr, wrt: Symbol) -> Expr:
    """Dz(v) for z = ``expr``, v = ``wrt``: shape (size z, size v), structured."""
    return Jacobians(wrt)(expr)


@defjvp(MatMul)
def _matmul(node: MatMul, jac: JacobianOf) -> Expr:
    # d(A₁…Aₙ) = Σᵢ L dAᵢ R, and vec(L dAᵢ R) = (Rᵀ ⊗ L) vec dAᵢ  (S.1)
    terms = []
    for i, a in enumerate(node.args):
        left = product(node.args[:i], a.rows)
        right = product(node.args[i + 1 :], a.cols)
        terms.append(MatMul(Kron(Transpose(right), left), jac(a)))
    return Add(*terms) if len(terms) > 1 else terms[0]


@defjvp(Add)
def _add(node: Add, jac: JacobianOf) -> Expr:
    return Add(*[jac(t) for t in node.args])  # d(A + B) = dA + dB


@defjvp(ScalarMul)
def _scalar_mul(node: ScalarMul, jac: JacobianOf) -> Expr:
    return ScalarMul(node.coefficient, jac(node.operand))  # d(cA) = c dA


@defjvp(ScaleBy)
def _scale_by(node: ScaleBy, jac: JacobianOf) -> Expr:
    s, a = node.args  # d(sA) = (ds) A + s dA; vec: vec(A) ds + s vec dA
    return Add(MatMul(Vec(a), jac(s)), ScaleBy(s, jac(a)))


@defjvp(Hadamard)
def _hadamard(node: Hadamard, jac: JacobianOf) -> Expr:
    a, b = node.args  # d(A⊙B) = dA⊙B + A⊙dB; vec(dA⊙B) = diag(vec B) vec dA
    return Add(MatMul(Diag(Vec(b)), jac(a)), MatMul(Diag(Vec(a)), jac(b)))


@defjvp(Transpose)
def _transpose(node: Transpose, jac: JacobianOf) -> Expr:
    (a,) = node.args  # vec(dAᵀ) = K_{m,n} vec dA  (M&N 3.7)
    return MatMul(Commutation(a.rows, a.cols), jac(a))


@defjvp(Apply)
def _apply(node: Apply, jac: JacobianOf) -> Expr:
    # dφ(A) = φ'(A) ⊙ dA = diag(vec φ'(A)) vec dA  (Supplement B.2)
    derivative = node.function.derivative(1)
    return MatMul(Diag(Vec(Apply(derivative, node.operand))), jac(node.operand))


@defjvp(Sum)
def _sum(node: Sum, jac: JacobianOf) -> Expr:
    (a,) = node.args  # d(1ᵀ vec A) = 1ᵀ vec dA
    return MatMul(Ones(ONE, a.size), jac(a))


@defjvp(Trace)
def _trace(node: Trace, jac: JacobianOf) -> Expr:
    (a,) = node.args  # d tr A = tr dA = (vec I)ᵀ vec dA  (M&N 2.4)
    return MatMul(Transpose(Vec(Identity(a.rows))), jac(a))


@defjvp(Softmax)
def _softmax(node: Softmax, jac: JacobianOf) -> Expr:
    # dp = (diag p − p pᵀ) dx for p = softmax(x); of a matrix S = softmax(A), column by column, the block
    # diagonal of those: diag(vec S) − diag(vec S) (I_T ⊗ 1 1ᵀ) diag(vec S)
    p = node
    if p.cols != ONE:
        s = Diag(Vec(p))
        return MatMul(Add(s, ScalarMul(-1, MatMul(s, column_blocks(p), s))), jac(node.args[0]))
    return MatMul(Add(Diag(p), ScalarMul(-1, MatMul(p, Transpose(p)))), jac(node.args[0]))


def column_blocks(a: Expr) -> Expr:
    """I_T ⊗ 1 1ᵀ for A (n × T): on vec A, each column's entries summed and spread down that column."""
    return Kron(Identity(a.cols), Ones(a.rows, a.rows))


@defjvp(LogSoftmax)
def _log_softmax(node: LogSoftmax, jac: JacobianOf) -> Expr:
    # d log softmax(x) = dx − 1 pᵀ dx = (I − 1 pᵀ) dx
    (x,) = node.args
    p = Softmax(x)
    return MatMul(Add(Identity(x.rows), ScalarMul(-1, MatMul(Ones(x.rows, ONE), Transpose(p)))), jac(x))


@defjvp(Inverse)
def _inverse(node: Inverse, jac: JacobianOf) -> Expr:
    # dA⁻¹ = −A⁻¹ dA A⁻¹; vec: −(A⁻ᵀ ⊗ A⁻¹) vec dA  (M&N 8.4, S.1)
    inv = node
    return ScalarMul(-1, MatMul(Kron(Transpose(inv), inv), jac(node.args[0])))


@defjvp(Vec)
def _vec(node: Vec, jac: JacobianOf) -> Expr:
    return jac(node.args[0])  # d vec A = vec dA


@defjvp(Unfold)
def _unfold(node: Unfold, jac: JacobianOf) -> Expr:
    x, spec, size = node.args  # vec unfold(X) = P vec X, P the index map (M&N's selection matrices)
    return MatMul(UnfoldMatrix(spec, x.rows, size), jac(x))


@defjvp(Fold)
def _fold(node: Fold, jac: JacobianOf) -> Expr:
    u, spec, size = node.args  # fold is unfold's adjoint: vec fold(U) = Pᵀ vec U
    return MatMul(Transpose(UnfoldMatrix(spec, node.rows, size)), jac(u))


@defjvp(Diag)
def _diag(node: Diag, jac: JacobianOf) -> Expr:
    # vec diag(v) = E v with E = (Iₙ ⊗ 1ₙ) ⊙ (1ₙ ⊗ Iₙ), the n² × n matrix with a 1 at (i + n·i, i)
    n = node.args[0].rows
    E = Hadamard(Kron(Identity(n), Ones(n, ONE)), Kron(Ones(n, ONE), Identity(n)))
    return MatMul(E, jac(node.args[0]))


for _constant in (Seed, Identity, Zero, Ones, Commutation, UnfoldMatrix, WindowArgmax):  # WindowArgmax: a.e.
    JVP_RULES[_constant] = lambda node, jac: Zero(node.size, jac.wrt.size)  # type: ignore[attr-defined]

# PSDProjection appears in derived rules only: no rule on purpose. Kron has a differential (the
# adjoint of Vec makes one) but no Jacobian or adjoint: a module that takes mc.kron of its variables is
# refused with a clear error.
