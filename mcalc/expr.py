"""The expression IR: immutable matrix-valued nodes with symbolic shapes.

One IR serves every layer of the compiler. A user's declaration builds nodes
of the first group (symbols, products, elementwise functions, ...); the
differential engine answers with nodes of the same IR plus the structured
factors of matrix calculus (Kronecker products, diagonals, identities,
commutation matrices) so that a derived rule is an expression like any other:
printable, simplifiable, evaluable and, later, compilable.

Every node is a matrix: vectors are ``(n, 1)``, scalars ``(1, 1)``. Nodes
compare structurally, so they can key dictionaries and be rewritten.
"""
from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sympy as sp

from . import dims
from .errors import ShapeError, UnsupportedOperationError
from .modes import Projection

if TYPE_CHECKING:
    from .functions import ElementwiseFunction

ONE = sp.Integer(1)


class Expr:
    """A matrix-valued expression node.

    ``args`` holds the children (``Expr``) and the parameters (names, SymPy
    numbers, dimensions, functions) that define the node; ``shape`` is
    ``(rows, cols)`` as SymPy expressions in the dimension symbols.
    """

    __slots__ = ("_hash", "_symbols", "args", "shape")
    symmetric = False  # known to equal its own transpose

    def __init__(self, *args: Any) -> None:
        self.args = args
        self.shape = self._infer_shape()
        self._hash = hash((type(self).__name__, args))
        self._symbols: frozenset[Symbol] | None = None

    # --- structure -------------------------------------------------------
    def _infer_shape(self) -> dims.Shape:
        raise NotImplementedError

    @property
    def children(self) -> tuple[Expr, ...]:
        return tuple(a for a in self.args if isinstance(a, Expr))

    def rebuild(self, children: list[Expr]) -> Expr:
        """The same node over new children (parameters kept in place)."""
        it = iter(children)
        return type(self)(*[next(it) if isinstance(a, Expr) else a for a in self.args])

    @property
    def symbols(self) -> frozenset[Symbol]:
        """The declared symbols this expression depends on."""
        if self._symbols is None:
            found: set[Symbol] = set()
            for c in self.children:
                found |= c.symbols
            self._symbols = frozenset(found)
        return self._symbols

    def walk(self) -> Iterator[Expr]:
        """Every node, children before parents (duplicates included)."""
        for c in self.children:
            yield from c.walk()
        yield self

    @property
    def rows(self) -> sp.Expr:
        return self.shape[0]

    @property
    def cols(self) -> sp.Expr:
        return self.shape[1]

    @property
    def size(self) -> sp.Expr:
        return self.shape[0] * self.shape[1]

    @property
    def is_scalar(self) -> bool:
        return self.shape == (ONE, ONE)

    @property
    def is_vector(self) -> bool:
        return self.shape[1] == ONE

    def __eq__(self, other: object) -> bool:
        return self is other or (
            type(self) is type(other) and self._hash == other._hash and self.args == other.args
        )

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        from .printing.text import to_text

        return to_text(self)

    def _repr_latex_(self) -> str:
        from .printing.latex import to_latex

        return f"${to_latex(self)}$"

    # --- declaration operators --------------------------------------------
    @property
    def T(self) -> Expr:
        return Transpose(self)

    def __matmul__(self, other: Any) -> Expr:
        return MatMul(self, _operand(other, "@"))

    def __rmatmul__(self, other: Any) -> Expr:
        return MatMul(_operand(other, "@"), self)

    def __mul__(self, other: Any) -> Expr:
        if _is_number(other):
            return ScalarMul(sp.sympify(other), self)
        return _elementwise_product(self, _operand(other, "*"))

    def __rmul__(self, other: Any) -> Expr:
        if _is_number(other):
            return ScalarMul(sp.sympify(other), self)
        return _elementwise_product(_operand(other, "*"), self)

    def __add__(self, other: Any) -> Expr:
        return _sum_of(self, other)

    def __radd__(self, other: Any) -> Expr:
        return _sum_of(other, self)

    def __sub__(self, other: Any) -> Expr:
        return _sum_of(self, -1 * other if _is_number(other) else -_operand(other, "-"))

    def __rsub__(self, other: Any) -> Expr:
        return _sum_of(other, -self)

    def __neg__(self) -> Expr:
        return ScalarMul(sp.Integer(-1), self)

    def __truediv__(self, other: Any) -> Expr:
        from .functions import reciprocal

        if _is_number(other):
            if sp.sympify(other) == 0:
                raise UnsupportedOperationError(f"division of {self!r} by zero")
            return ScalarMul(1 / sp.sympify(other), self)
        return self * reciprocal(_operand(other, "/"))

    def __rtruediv__(self, other: Any) -> Expr:
        from .functions import reciprocal

        return other * reciprocal(self)

    def __pow__(self, exponent: Any) -> Expr:
        from .functions import power

        if not _is_number(exponent):
            raise UnsupportedOperationError(
                f"'{self!r} ** {exponent!r}': only a constant exponent is supported; "
                "use mc.elementwise for other functions"
            )
        return power(sp.sympify(exponent))(self)

    def _unsupported(self, op: str) -> Any:
        raise UnsupportedOperationError(
            f"operation '{op}' on {self!r} is not supported by mcalc; declare it with "
            "mc.elementwise(name, sympy_expr, var) if it acts elementwise"
        )

    def __abs__(self) -> Expr:
        return self._unsupported("abs")

    def __lt__(self, other: Any) -> Expr:
        return self._unsupported("<")

    __le__ = __lt__
    __gt__ = __lt__
    __ge__ = __lt__

    def __floordiv__(self, other: Any) -> Expr:
        return self._unsupported("//")

    def __mod__(self, other: Any) -> Expr:
        return self._unsupported("%")

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        return self._unsupported(f"numpy.{ufunc.__name__}")

    def __bool__(self) -> bool:
        return True


def _is_number(value: Any) -> bool:
    if isinstance(value, Expr) or isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    return isinstance(value, sp.Expr) and not value.free_symbols - _dimension_symbols(value)


def _dimension_symbols(value: sp.Expr) -> set:
    return {s for s in value.free_symbols if s.is_integer and s.is_positive}


def _operand(value: Any, op: str) -> Expr:
    if isinstance(value, Expr):
        return value
    raise UnsupportedOperationError(
        f"operand {value!r} of '{op}' is not an mcalc expression; declare it with "
        "mc.Vector / mc.Matrix / mc.Scalar (NumPy arrays are values, not declarations)"
    )


def _elementwise_product(a: Expr, b: Expr) -> Expr:
    if a.is_scalar and not b.is_scalar:
        return ScaleBy(a, b)
    if b.is_scalar and not a.is_scalar:
        return ScaleBy(b, a)
    return Hadamard(a, b)


def _sum_of(a: Any, b: Any) -> Expr:
    """``a + b`` with numbers and (1,1) expressions broadcast over matrices."""
    if _is_number(a):
        a, b = b, a
    if _is_number(b):
        b = ScalarMul(sp.sympify(b), Ones(*a.shape))
    b = _operand(b, "+")
    a = _operand(a, "+")
    if a.is_scalar and not b.is_scalar:
        a = ScaleBy(a, Ones(*b.shape))
    elif b.is_scalar and not a.is_scalar:
        b = ScaleBy(b, Ones(*a.shape))
    return Add(a, b)


def _require_same_shape(op: str, *operands: Expr) -> dims.Shape:
    first = operands[0].shape
    for o in operands[1:]:
        if not (dims.same(o.shape[0], first[0]) and dims.same(o.shape[1], first[1])):
            listing = ", ".join(f"{x!r} is {_fmt(x.shape)}" for x in operands)
            raise ShapeError(f"shape mismatch in {op}: {listing}")
    return first


def _fmt(shape: dims.Shape) -> str:
    return f"({shape[0]}, {shape[1]})"


# =============================================================================
# Leaves
# =============================================================================
class Symbol(Expr):
    """A declared matrix symbol. ``hints`` guide sampling (e.g. 'positive')."""

    __slots__ = ()

    def __init__(self, name: str, rows: sp.Expr, cols: sp.Expr, hints: tuple[str, ...] = ()) -> None:
        super().__init__(name, rows, cols, tuple(sorted(hints)))

    def _infer_shape(self) -> dims.Shape:
        return (self.args[1], self.args[2])

    @property
    def name(self) -> str:
        return self.args[0]

    @property
    def hints(self) -> tuple[str, ...]:
        return self.args[3]

    @property
    def symbols(self) -> frozenset[Symbol]:
        return frozenset((self,))


class Seed(Expr):
    """A quantity passed into a module's rules from outside: 𝓗z (``'Hz'``), δz (``'dz'``),
    or a direction of the R-operator: the tangent of a variable v (``'V:v'``) or
    R{δz} (``'Rdz'``), the directional derivative of δz (Pearlmutter 1994).

    δz has the shape of the module output z (its vec is the gradient); 𝓗z is
    the (size z × size z) Hessian of the loss with respect to vec z; a tangent
    has the shape of what it is the tangent of.
    """

    __slots__ = ()

    def __init__(self, kind: str, rows: sp.Expr, cols: sp.Expr) -> None:
        super().__init__(kind, rows, cols)

    def _infer_shape(self) -> dims.Shape:
        return (self.args[1], self.args[2])

    @property
    def kind(self) -> str:
        return self.args[0]

    @property
    def symmetric(self) -> bool:  # a Hessian is symmetric
        return self.kind == "Hz"


TANGENT_PREFIX = "V:"


def tangent(v: Symbol) -> Seed:
    """The direction dv of a variable in a directional derivative (the R-operator's V)."""
    return Seed(TANGENT_PREFIX + v.name, *v.shape)


def tangent_of(seed: Seed) -> str | None:
    """The variable name a tangent seed stands for, None for other seeds."""
    return seed.kind[len(TANGENT_PREFIX):] if seed.kind.startswith(TANGENT_PREFIX) else None


class Identity(Expr):
    """The identity matrix I_n."""

    __slots__ = ()
    symmetric = True

    def __init__(self, n: sp.Expr) -> None:
        super().__init__(sp.sympify(n))

    def _infer_shape(self) -> dims.Shape:
        return (self.args[0], self.args[0])


class Zero(Expr):
    """The zero matrix of a shape."""

    __slots__ = ()

    def __init__(self, rows: sp.Expr, cols: sp.Expr) -> None:
        super().__init__(sp.sympify(rows), sp.sympify(cols))

    def _infer_shape(self) -> dims.Shape:
        return (self.args[0], self.args[1])

    @property
    def symmetric(self) -> bool:
        return self.args[0] == self.args[1]


class Ones(Expr):
    """The all-ones matrix (1_n for a vector)."""

    __slots__ = ()

    def __init__(self, rows: sp.Expr, cols: sp.Expr) -> None:
        super().__init__(sp.sympify(rows), sp.sympify(cols))

    def _infer_shape(self) -> dims.Shape:
        return (self.args[0], self.args[1])

    @property
    def symmetric(self) -> bool:
        return self.args[0] == self.args[1]


class Commutation(Expr):
    """The commutation matrix K_{m,n}: K vec(A) = vec(Aᵀ) for A of shape (m, n)."""

    __slots__ = ()

    def __init__(self, m: sp.Expr, n: sp.Expr) -> None:
        super().__init__(sp.sympify(m), sp.sympify(n))

    def _infer_shape(self) -> dims.Shape:
        size = self.args[0] * self.args[1]
        return (size, size)


@dataclass(frozen=True)
class UnfoldSpec:
    """The patches of a convolution over n spatial dimensions (1 for a signal, 2 for an image): per
    dimension, ``kernel`` taps ``dilation`` apart, every ``stride`` positions, over the input padded with
    ``padding`` zeros at both ends (PyTorch's ConvNd arguments, one entry per dimension), or a pair
    (before, after) where they differ (TensorFlow's 'same' padding, PyTorch's ZeroPad2d before a layer).
    Built by :meth:`of`, which repeats a single number over the dimensions."""

    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int | tuple[int, int], ...]
    dilation: tuple[int, ...]

    @classmethod
    def of(cls, kernel: int | Sequence[int], stride: int | Sequence[int] = 1,
           padding: int | Sequence[int | tuple[int, int]] = 0, dilation: int | Sequence[int] = 1,
           ndim: int | None = None) -> UnfoldSpec:
        """The spec of these arguments, each a number (repeated over ``ndim`` dimensions, by default those
        of the first argument given as a sequence, else 1) or one entry per dimension (a padding's may be
        a pair (before, after))."""
        given = [a for a in (kernel, stride, padding, dilation) if not isinstance(a, int)]
        n = ndim or (len(given[0]) if given else 1)
        spread = [tuple(v if isinstance(v, int) else tuple(map(int, v)) for v in a) if not isinstance(a, int)
                  else (int(a),) * n for a in (kernel, stride, padding, dilation)]
        if any(len(a) != n for a in spread):
            raise ShapeError(f"unfold over {n} dimensions needs one kernel, stride, padding and dilation each, "
                             f"not {spread}")
        return cls(*spread)

    def __post_init__(self) -> None:
        if min(*self.kernel, *self.stride, *self.dilation) < 1 or min(p for pair in self.pads for p in pair) < 0:
            raise ShapeError(f"unfold needs kernel, stride, dilation ≥ 1 and padding ≥ 0, not {self}")

    @property
    def pads(self) -> tuple[tuple[int, int], ...]:
        """The padding (before, after) along each dimension."""
        return tuple((p, p) if isinstance(p, int) else p for p in self.padding)

    @property
    def ndim(self) -> int:
        return len(self.kernel)

    @property
    def taps(self) -> int:
        """The taps of one channel's patch, the product of the kernel's extents."""
        return math.prod(self.kernel)

    def grid(self, size: Sequence[sp.Expr | int]) -> tuple[sp.Expr | int, ...]:
        """The patches along each dimension of an input of ``size``: ⌊(L + p₀ + p₁ − d(k − 1) − 1)/s⌋ + 1
        (Python integers of integers)."""
        return tuple((length + sum(p) - d * (k - 1) - 1) // s + 1 if isinstance(length, int) else
                     sp.floor((length + sum(p) - d * (k - 1) - 1) / s) + 1 for length, k, s, p, d in
                     zip(size, self.kernel, self.stride, self.pads, self.dilation, strict=True))

    def positions(self, size: Sequence[sp.Expr | int]) -> sp.Expr | int:
        """T, the number of patches of an input of ``size`` (per dimension)."""
        return math.prod(self.grid(size))

    def tap_positions(self, size: Sequence[int]) -> Iterator[tuple[int, int, int]]:
        """(j, t, position) of every tap j of every patch t that reads the input (not its padding), each
        index over the dimensions in row-major order (PyTorch's)."""
        grid = [int(g) for g in self.grid(size)]
        kernel_dims = [range(k) for k in self.kernel]
        for t, patch in enumerate(itertools.product(*map(range, grid))):
            for j, tap in enumerate(itertools.product(*kernel_dims)):
                where = [q * s - p + i * d for q, i, s, (p, _), d in
                         zip(patch, tap, self.stride, self.pads, self.dilation)]
                if all(0 <= w < length for w, length in zip(where, size)):
                    yield j, t, functools.reduce(lambda flat, wl: flat * wl[1] + wl[0], zip(where, size), 0)

    def matrix_ones(self, channels: int, size: Sequence[int]) -> Iterator[tuple[int, int]]:
        """(row, column) of every 1 of :class:`UnfoldMatrix` P: vec(unfold X) = P vec X, both vecs
        column-major, patch rows ch·taps + j."""
        rows = channels * self.taps
        for j, t, position in self.tap_positions(size):
            for ch in range(channels):
                yield t * rows + ch * self.taps + j, position * channels + ch


def spatial_size(size: Sequence[Any]) -> sp.Tuple:
    """An input's extents along its spatial dimensions as the SymPy tuple the index-map nodes keep (their
    dimensions substitute like any other)."""
    return sp.Tuple(*[sp.sympify(s) for s in size])


class UnfoldMatrix(Expr):
    """P, the 0/1 matrix of unfold: vec(unfold X) = P vec X for X (c × N), N = ΠLᵢ positions,
    (c·taps·T × c·N). Applied by index maps, never formed. ``args`` = (spec, c, size)."""

    __slots__ = ()

    def __init__(self, spec: UnfoldSpec, channels: sp.Expr, size: sp.Tuple) -> None:
        super().__init__(spec, sp.sympify(channels), size)

    def _infer_shape(self) -> dims.Shape:
        spec, c, size = self.args
        return (c * spec.taps * spec.positions(size), c * sp.Mul(*size))


# =============================================================================
# Operations a declaration uses
# =============================================================================
class MatMul(Expr):
    """The matrix product A B C ... (n-ary, at least two factors)."""

    __slots__ = ()

    def _infer_shape(self) -> dims.Shape:
        if len(self.args) < 2:
            raise ValueError("MatMul needs two factors")
        for left, right in zip(self.args, self.args[1:]):
            if not dims.same(left.cols, right.rows):
                raise ShapeError(
                    f"shape mismatch in matrix product {left!r} @ {right!r}: "
                    f"{_fmt(left.shape)} @ {_fmt(right.shape)}"
                )
        return (self.args[0].rows, self.args[-1].cols)


class Add(Expr):
    """The sum A + B + ... of equally shaped terms (n-ary)."""

    __slots__ = ()

    def _infer_shape(self) -> dims.Shape:
        return _require_same_shape("sum", *self.args)


class ScalarMul(Expr):
    """A constant multiple c·A; c is a SymPy number or an expression in the dimensions."""

    __slots__ = ()

    def __init__(self, coefficient: sp.Expr, operand: Expr) -> None:
        super().__init__(sp.sympify(coefficient), operand)

    def _infer_shape(self) -> dims.Shape:
        return self.args[1].shape

    @property
    def coefficient(self) -> sp.Expr:
        return self.args[0]

    @property
    def operand(self) -> Expr:
        return self.args[1]

    @property
    def symmetric(self) -> bool:
        return self.args[1].symmetric


class ScaleBy(Expr):
    """A matrix scaled by a (1, 1) expression s: s·A."""

    __slots__ = ()

    def _infer_shape(self) -> dims.Shape:
        scale, operand = self.args
        if not scale.is_scalar:
            raise ShapeError(f"{scale!r} scales {operand!r} but is {_fmt(scale.shape)}, not (1, 1)")
        return operand.shape

    @property
    def symmetric(self) -> bool:
        return self.args[1].symmetric


class Hadamard(Expr):
    """The elementwise (Hadamard) product A ⊙ B."""

    __slots__ = ()

    def _infer_shape(self) -> dims.Shape:
        return _require_same_shape("elementwise product", *self.args)


class Transpose(Expr):
    """The transpose Aᵀ."""

    __slots__ = ()

    def _infer_shape(self) -> dims.Shape:
        return (self.args[0].cols, self.args[0].rows)


class Apply(Expr):
    """An elementwise function φ applied to every entry of A."""

    __slots__ = ()

    def __init__(self, function: ElementwiseFunction, operand: Expr) -> None:
        super().__init__(function, operand)

    def _infer_shape(self) -> dims.Shape:
        return self.args[1].shape

    @property
    def function(self) -> ElementwiseFunction:
        return self.args[0]

    @property
    def operand(self) -> Expr:
        return self.args[1]


class Sum(Expr):
    """The sum of all entries, 1ᵀ vec(A): a (1, 1) expression."""

    __slots__ = ()

    def _infer_shape(self) -> dims.Shape:
        return (ONE, ONE)


class Trace(Expr):
    """The trace of a square matrix."""

    __slots__ = ()

    def _infer_shape(self) -> dims.Shape:
        (a,) = self.args
        if not dims.same(a.rows, a.cols):
            raise ShapeError(f"trace of non-square {a!r} {_fmt(a.shape)}")
        return (ONE, ONE)


class Softmax(Expr):
    """softmax(x) = exp(x) / 1ᵀexp(x), column by column (a declaration applies it to a vector)."""

    __slots__ = ()

    def _infer_shape(self) -> dims.Shape:
        return self.args[0].shape


class LogSoftmax(Expr):
    """log softmax(x) = x − log(1ᵀexp(x)) 1, column by column."""

    __slots__ = ()

    def _infer_shape(self) -> dims.Shape:
        return self.args[0].shape


class Inverse(Expr):
    """The inverse A⁻¹ of a square matrix."""

    __slots__ = ()

    def _infer_shape(self) -> dims.Shape:
        (a,) = self.args
        if not dims.same(a.rows, a.cols):
            raise ShapeError(f"inverse of non-square {a!r} {_fmt(a.shape)}")
        return a.shape


# =============================================================================
# Structured factors of derived rules
# =============================================================================
class Unfold(Expr):
    """The patches of X (c × N) as columns (im2col), (c·taps × T). X's N = ΠLᵢ columns are the positions of an
    input of ``size`` (L₁, …, Lₙ) in row-major order (a signal's positions; an image's pixels row by row, as
    PyTorch's ``reshape(c, H*W)``). Entry (ch·taps + j, t) is X at tap j of patch t (0 in the padding), both
    indices row-major over the dimensions, PyTorch's ``unfold`` order, so that a convolution is W unfold(X)
    with W (m × c·taps). Of samples side by side (c × N·B, as :class:`Stacked`), each sample's patches side
    by side (c·taps × T·B). ``args`` = (X, spec, size); a signal's size is (L,), X's columns."""

    __slots__ = ()

    def __init__(self, x: Expr, spec: UnfoldSpec, size: sp.Tuple | None = None) -> None:
        super().__init__(x, spec, spatial_size((x.cols,)) if size is None else size)

    def _infer_shape(self) -> dims.Shape:
        x, spec, size = self.args
        if len(size) != spec.ndim:
            raise ShapeError(f"unfold over {spec.ndim} dimensions of an input of size {tuple(size)}")
        return (x.rows * spec.taps, spec.positions(size) * sp.cancel(x.cols / sp.Mul(*size)))


class WindowArgmax(Expr):
    """The 0/1 mask of each window's maximum: for patches U = unfold(X) (c·k × T) under ``spec`` over an
    input of ``size``, rows ch·k + j, a 1 at the first largest of the k taps (an image's window's
    k = kh·kw) of every channel and position that read the input, never its padding (PyTorch pads max
    pooling with −∞), 0 elsewhere. Piecewise constant in U (its differential is 0 almost everywhere, as a
    step's is), so that max pooling is the piecewise-linear selection (I_c ⊗ 1_kᵀ) (mask(U) ⊙ U).
    ``args`` = (U, spec, size)."""

    __slots__ = ()

    def __init__(self, u: Expr, spec: UnfoldSpec, size: sp.Tuple) -> None:
        super().__init__(u, spec, size)

    def _infer_shape(self) -> dims.Shape:
        return self.args[0].shape


class Fold(Expr):
    """The adjoint of :class:`Unfold` (col2im): patches U (c·taps × T) added back into an input (c × N) of
    ``size``, each entry to the position it was read from. ``args`` = (U, spec, size)."""

    __slots__ = ()

    def __init__(self, u: Expr, spec: UnfoldSpec, size: sp.Tuple) -> None:
        super().__init__(u, spec, size)

    def _infer_shape(self) -> dims.Shape:
        u, spec, size = self.args
        return (sp.cancel(u.rows / spec.taps), sp.Mul(*size) * sp.cancel(u.cols / spec.positions(size)))


class BlockTrace(Expr):
    """Σₜ Mₜₜ, the sum of the T diagonal blocks of M (T·m × T·m): the partial trace over positions of a
    curvature on vec Z, Z (m × T). ``args`` = (M, T)."""

    __slots__ = ()

    def __init__(self, m: Expr, blocks: sp.Expr) -> None:
        super().__init__(m, sp.sympify(blocks))

    def _infer_shape(self) -> dims.Shape:
        m, blocks = self.args
        return (sp.cancel(m.rows / blocks), sp.cancel(m.cols / blocks))

    @property
    def symmetric(self) -> bool:
        return self.args[0].symmetric


class Kron(Expr):
    """The Kronecker product A ⊗ B."""

    __slots__ = ()

    def _infer_shape(self) -> dims.Shape:
        a, b = self.args
        return (a.rows * b.rows, a.cols * b.cols)

    @property
    def symmetric(self) -> bool:
        return self.args[0].symmetric and self.args[1].symmetric


class Diag(Expr):
    """diag(v): the square matrix with the vector v on its diagonal."""

    __slots__ = ()
    symmetric = True

    def _infer_shape(self) -> dims.Shape:
        (v,) = self.args
        if not v.is_vector:
            raise ShapeError(f"diag expects a vector, got {v!r} of shape {_fmt(v.shape)}")
        return (v.rows, v.rows)


class Gram(Expr):
    """c·P Pᵀ for a batch matrix P (rows × B): a Kronecker factor such as E[x xᵀ] = (1/B)·X Xᵀ.

    Kept as P so that a backend can decide from the sizes whether to form it
    (cost rows²·B once, the scale c riding on the product) or apply it through P
    (cost 2·rows·B per product). ``args`` = (P,) or (P, c).
    """

    __slots__ = ()
    symmetric = True

    def _infer_shape(self) -> dims.Shape:
        return (self.args[0].rows, self.args[0].rows)

    @property
    def scale(self) -> sp.Expr:
        return self.args[1] if len(self.args) > 1 else ONE


class Vec(Expr):
    """vec(A): the columns of A stacked into one vector (column-major)."""

    __slots__ = ()

    def _infer_shape(self) -> dims.Shape:
        return (self.args[0].size, ONE)


class PSDProjection(Expr):
    """A symmetric matrix with its negative eigenvalues cast by ``mode``.

    ``mode`` is ``'abs'`` (eigenvalues → |λ|) or ``'clip'`` (→ max(λ, 0)), the
    positive-curvature Hessian's treatment of concave terms (Section 3.2).
    """

    __slots__ = ()
    symmetric = True

    def __init__(self, mode: Projection | str, operand: Expr) -> None:
        super().__init__(str(Projection.parse(mode)), operand)  # the plain value: printed as it is

    def _infer_shape(self) -> dims.Shape:
        return self.args[1].shape

    @property
    def mode(self) -> str:
        return self.args[0]

    @property
    def operand(self) -> Expr:
        return self.args[1]


# =============================================================================
# Batch forms (layer 4: a per-sample rule lowered over a batch of B samples)
# =============================================================================
BATCH = sp.Symbol("B", integer=True, positive=True)  # the batch size
# the samples a batch mean is over: B in one process, every rank's shard together in data parallelism
SAMPLES = sp.Symbol("B_all", integer=True, positive=True)


class Stacked(Expr):
    """A per-sample quantity (an input, a label, δz) over the batch, its samples side by side: a vector's
    batch is (rows × B), column i sample i; a matrix's (rows × cols) is (rows × cols·B), columns
    i·cols … (i+1)·cols − 1 sample i (a convolution's patches, a sequence's positions)."""

    __slots__ = ()

    def _infer_shape(self) -> dims.Shape:
        (v,) = self.args
        return (v.rows, v.cols * BATCH)


class SampleProduct(Expr):
    """M's samples each multiplied on the right by a shared V: M (r × c·B) side by side (as
    :class:`Stacked`), V (c × c′), the result (r × c′·B), i.e. M (I_B ⊗ V). ``args`` = (M, V)."""

    __slots__ = ()

    def _infer_shape(self) -> dims.Shape:
        m, v = self.args
        return (m.rows, v.cols * BATCH)


class SampleMatMul(Expr):
    """The per-sample products Lᵢ Rᵢ of two batches side by side (as :class:`Stacked`): L (r × k·B), R (k × c·B),
    the result (r × c·B), blockdiag(L₁ … L_B) [R₁; …; R_B]; a batched product, sample i's blocks only.
    ``args`` = (L, R)."""

    __slots__ = ()

    def _infer_shape(self) -> dims.Shape:
        left, right = self.args
        return (left.rows, right.cols)


class SampleTranspose(Expr):
    """Each sample's block transposed, the samples still side by side: M (r × c·B) to (c × r·B).
    ``args`` = (M, c)."""

    __slots__ = ()

    def _infer_shape(self) -> dims.Shape:
        m, cols = self.args
        return (cols, m.rows * BATCH)


class UnvecOfSamples(Expr):
    """The inverse of :class:`VecOfSamples`: per-sample vectors (r·c × B), each the vec of an (r × c)
    matrix, to those matrices side by side, (r × c·B). ``args`` = (M, r)."""

    __slots__ = ()

    def _infer_shape(self) -> dims.Shape:
        m, rows = self.args
        return (rows, m.rows / rows * BATCH)


class VecOfSamples(Expr):
    """The batch of vec(Xᵢ): from the samples side by side, M (r × c·B), to one column per sample,
    (r·c × B), as per-sample vectors are stacked. ``args`` = (M, c)."""

    __slots__ = ()

    def _infer_shape(self) -> dims.Shape:
        m, cols = self.args
        return (m.rows * cols, BATCH)


class BatchMean(Expr):
    """(1/B) Σᵢ e(sample i) for a rule with no closed batch form: evaluated sample by sample.

    ``args`` = (e, per-sample leaves of e as a tuple).
    """

    __slots__ = ()

    def __init__(self, operand: Expr, leaves: tuple[Expr, ...]) -> None:
        super().__init__(operand, tuple(leaves))

    def _infer_shape(self) -> dims.Shape:
        return self.args[0].shape

    @property
    def children(self) -> tuple[Expr, ...]:
        return (self.args[0],)

    def rebuild(self, children: list[Expr]) -> Expr:
        return BatchMean(children[0], self.args[1])


class RankSum(Expr):
    """The sum over the ranks of data parallelism of a sum over this rank's samples: what a batch mean
    (1/B_all) Σᵢ sums, every rank's shard of the batch at once. In one process it is its operand.
    ``args`` = (e,)."""

    __slots__ = ()

    def _infer_shape(self) -> dims.Shape:
        return self.args[0].shape


def product(factors: tuple[Expr, ...], rows: sp.Expr) -> Expr:
    """The matrix product of ``factors``; I_rows when there are none."""
    if not factors:
        return Identity(rows)
    return factors[0] if len(factors) == 1 else MatMul(*factors)


def is_broadcast(node: Expr) -> bool:
    """v 1ᵀ or 1 wᵀ: a vector repeated, read in place by a kernel."""
    return isinstance(node, MatMul) and len(node.args) == 2 and (
        (isinstance(node.args[1], Ones) and node.args[0].cols == ONE and node.args[1].rows == ONE)
        or (isinstance(node.args[0], Ones) and node.args[1].rows == ONE and node.args[0].cols == ONE))


def broadcast_source(node: Expr) -> Expr:
    """v for the broadcast v 1ᵀ or 1 vᵀ; any other node itself."""
    if not is_broadcast(node):
        return node
    return node.args[1] if isinstance(node.args[0], Ones) else node.args[0]


def substitute(expr: Expr, mapping: dict[Expr, Expr]) -> Expr:
    """Replace subexpressions (typically symbols) by others of the same shape."""
    memo: dict[Expr, Expr] = {}

    def go(node: Expr) -> Expr:
        if node in mapping:
            return mapping[node]
        if node in memo:
            return memo[node]
        kids = node.children
        out = node.rebuild([go(c) for c in kids]) if kids else node
        memo[node] = out
        return out

    return go(expr)


def map_dims(expr: Expr, mapping: dict[sp.Symbol, sp.Expr]) -> Expr:
    """``expr`` with its dimension symbols replaced (in symbols' shapes and every sized node)."""
    if not mapping:
        return expr
    memo: dict[Expr, Expr] = {}

    def go(node: Expr) -> Expr:
        if node not in memo:
            args = [go(a) if isinstance(a, Expr) else a.xreplace(mapping) if isinstance(a, sp.Basic) else a
                    for a in node.args]
            memo[node] = type(node)(*args)
        return memo[node]

    return go(expr)
