"""Directional derivatives in matrix form: the R-operator (Pearlmutter 1994) on the IR.

For an expression e and directions for some of its leaves (V for a variable,
R{δz} for the seed δz), the rules below give R{e} = d e in those directions,
as a matrix of e's shape. They are the first-differential rules of
:mod:`mcalc.calculus.jacobian` before vectorisation (M&N ch. 8–9): where that
table writes d vec z = J d vec v, this one writes dz itself, so a direction
is applied through products and Hadamards instead of through J.

Two uses: the forward tangent of a module's output (Jacobian-vector product),
and R{δv}, the directional derivative of the gradient rule δv, which is
Pearlmutter's R-backprop: exact curvature-vector products for Hessian-free
optimisation (Martens 2010).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

from ..errors import UnsupportedOperationError
from ..expr import (
    ONE,
    Add,
    Apply,
    Diag,
    Expr,
    Fold,
    Hadamard,
    Inverse,
    Kron,
    LogSoftmax,
    MatMul,
    Ones,
    ScalarMul,
    ScaleBy,
    Softmax,
    Sum,
    Trace,
    Transpose,
    Unfold,
    Vec,
    WindowArgmax,
    Zero,
)
from ..simplification import simplify

DifferentialOf = Callable[[Expr], Expr]
DIFFERENTIAL_RULES: dict[type, Callable[[Expr, DifferentialOf], Expr]] = {}


def defdifferential(node_type: type) -> Callable:
    """Register the matrix-form differential rule of ``node_type``."""

    def register(fn: Callable[[Expr, DifferentialOf], Expr]) -> Callable[[Expr, DifferentialOf], Expr]:
        DIFFERENTIAL_RULES[node_type] = fn
        return fn

    return register


class Differentials:
    """d e of every subexpression e for given directions of its leaves, memoised and simplified."""

    def __init__(self, directions: Mapping[Expr, Expr]) -> None:
        self.directions = dict(directions)
        self._memo: dict[Expr, Expr] = {}
        self._depends: dict[Expr, bool] = {}

    def depends(self, node: Expr) -> bool:
        """Whether ``node`` changes in the directions given."""
        if node not in self._depends:
            self._depends[node] = node in self.directions or any(self.depends(c) for c in node.children)
        return self._depends[node]

    def __call__(self, node: Expr) -> Expr:
        if node in self._memo:
            return self._memo[node]
        if node in self.directions:
            result = self.directions[node]
        elif not self.depends(node):
            result = Zero(*node.shape)
        else:
            rule = DIFFERENTIAL_RULES.get(type(node))
            if rule is None:
                raise UnsupportedOperationError(
                    f"no directional-derivative rule for operation '{type(node).__name__}' in {node!r}")
            result = simplify(rule(node, self))
        self._memo[node] = result
        return result


def directional_derivative(expr: Expr, directions: Mapping[Expr, Expr]) -> Expr:
    """d ``expr`` when each leaf in ``directions`` moves along its direction (a matrix of expr's shape)."""
    return Differentials(directions)(expr)


def _sum(terms: list[Expr], like: Expr) -> Expr:
    terms = [t for t in terms if not isinstance(t, Zero)]
    if not terms:
        return Zero(*like.shape)
    return terms[0] if len(terms) == 1 else Add(*terms)


@defdifferential(MatMul)
def _matmul(node: MatMul, d: DifferentialOf) -> Expr:
    # d(A₁…Aₙ) = Σᵢ A₁…dAᵢ…Aₙ  (M&N 8.2)
    args = node.args
    return _sum([MatMul(*args[:i], d(a), *args[i + 1:]) for i, a in enumerate(args) if not isinstance(d(a), Zero)],
                node)


@defdifferential(Add)
def _add(node: Add, d: DifferentialOf) -> Expr:
    return _sum([d(t) for t in node.args], node)  # d(A + B) = dA + dB


@defdifferential(ScalarMul)
def _scalar_mul(node: ScalarMul, d: DifferentialOf) -> Expr:
    return ScalarMul(node.coefficient, d(node.operand))  # d(cA) = c dA


@defdifferential(ScaleBy)
def _scale_by(node: ScaleBy, d: DifferentialOf) -> Expr:
    s, a = node.args  # d(sA) = (ds) A + s dA, s a (1×1) scalar
    return _sum([ScaleBy(d(s), a), ScaleBy(s, d(a))], node)


@defdifferential(Hadamard)
def _hadamard(node: Hadamard, d: DifferentialOf) -> Expr:
    a, b = node.args  # d(A ⊙ B) = dA ⊙ B + A ⊙ dB  (M&N 8.2)
    return _sum([Hadamard(d(a), b), Hadamard(a, d(b))], node)


@defdifferential(Transpose)
def _transpose(node: Transpose, d: DifferentialOf) -> Expr:
    return Transpose(d(node.args[0]))  # d(Aᵀ) = (dA)ᵀ


@defdifferential(Apply)
def _apply(node: Apply, d: DifferentialOf) -> Expr:
    # dφ(A) = φ'(A) ⊙ dA  (Supplement B.2)
    return Hadamard(Apply(node.function.derivative(1), node.operand), d(node.operand))


@defdifferential(Sum)
def _total(node: Sum, d: DifferentialOf) -> Expr:
    return Sum(d(node.args[0]))  # d(1ᵀ vec A) = 1ᵀ vec dA


@defdifferential(Trace)
def _trace(node: Trace, d: DifferentialOf) -> Expr:
    return Trace(d(node.args[0]))  # d tr A = tr dA  (M&N 8.2)


@defdifferential(Softmax)
def _softmax(node: Softmax, d: DifferentialOf) -> Expr:
    p = node  # dp = (diag p − p pᵀ) dx = p ⊙ dx − p (pᵀ dx)
    dx = d(node.args[0])
    if p.cols != ONE:  # column by column: dS = S ⊙ dA − S ⊙ (1 1ᵀ (S ⊙ dA)), each column's pᵀ dx spread down it
        scaled = Hadamard(p, dx)
        return Add(scaled, ScalarMul(-1, Hadamard(p, MatMul(Ones(p.rows, p.rows), scaled))))
    return Add(Hadamard(p, dx), ScalarMul(-1, MatMul(p, Transpose(p), dx)))


@defdifferential(LogSoftmax)
def _log_softmax(node: LogSoftmax, d: DifferentialOf) -> Expr:
    (x,) = node.args  # d log softmax(x) = dx − 1 (pᵀ dx)
    dx = d(x)
    return Add(dx, ScalarMul(-1, MatMul(Ones(x.rows, ONE), Transpose(Softmax(x)), dx)))


@defdifferential(Inverse)
def _inverse(node: Inverse, d: DifferentialOf) -> Expr:
    return ScalarMul(-1, MatMul(node, d(node.args[0]), node))  # dA⁻¹ = −A⁻¹ dA A⁻¹  (M&N 8.4)


@defdifferential(Vec)
def _vec(node: Vec, d: DifferentialOf) -> Expr:
    return Vec(d(node.args[0]))  # d vec A = vec dA


@defdifferential(Unfold)
@defdifferential(Fold)
def _index_map(node: Unfold | Fold, d: DifferentialOf) -> Expr:
    operand, spec, size = node.args  # linear: d unfold(X) = unfold(dX), d fold(U) = fold(dU)
    return type(node)(d(operand), spec, size)


@defdifferential(WindowArgmax)
def _window_argmax(node: WindowArgmax, d: DifferentialOf) -> Expr:
    return Zero(node.rows, node.cols)  # piecewise constant: d mask = 0 (almost everywhere)


@defdifferential(Diag)
def _diag(node: Diag, d: DifferentialOf) -> Expr:
    return Diag(d(node.args[0]))  # d diag(v) = diag(dv)


@defdifferential(Kron)
def _kron(node: Kron, d: DifferentialOf) -> Expr:
    a, b = node.args  # d(A ⊗ B) = dA ⊗ B + A ⊗ dB  (M&N 8.2)
    da, db = d(a), d(b)
    return _sum([term for term, moves in ((Kron(da, b), da), (Kron(a, db), db)) if not isinstance(moves, Zero)], node)
