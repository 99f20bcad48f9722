"""Declaration: matrix symbols and the operations a module is written with."""
from __future__ import annotations

import keyword
import re
from collections.abc import Sequence

import sympy as sp

from . import dims
from .errors import DeclarationError, ShapeError, UnsupportedOperationError
from .expr import (
    ONE,
    Diag,
    Expr,
    Fold,
    Hadamard,
    Identity,
    Inverse,
    Kron,
    LogSoftmax,
    Ones,
    Softmax,
    Sum,
    Symbol,
    Trace,
    Unfold,
    UnfoldSpec,
    Vec,
    WindowArgmax,
    spatial_size,
)

_NAME = re.compile(r"^[A-Za-z_][A-Za-z_0-9]*$")
_HINTS = {"positive", "simplex"}


def _symbol(name: str, rows: str | int, cols: str | int, hints: tuple[str, ...]) -> Symbol:
    if not isinstance(name, str) or not _NAME.match(name) or keyword.iskeyword(name):
        raise DeclarationError(f"symbol name {name!r} must be a Python identifier")
    unknown = set(hints) - _HINTS
    if unknown:
        raise DeclarationError(f"symbol '{name}': unknown hint {sorted(unknown)}; known: {sorted(_HINTS)}")
    where = f"the declaration of '{name}'"
    return Symbol(name, dims.dim(rows, where=where), dims.dim(cols, where=where), hints)


def _hints(positive: bool, simplex: bool) -> tuple[str, ...]:
    return tuple(h for h, on in (("positive", positive), ("simplex", simplex)) if on)


def Vector(name: str, n: str | int, *, positive: bool = False, simplex: bool = False) -> Symbol:
    """A column vector symbol of length ``n``.

    ``positive`` asks verification to sample positive values (e.g. under a log);
    ``simplex`` marks a label that is non-negative and sums to one (a one-hot or
    a probability vector).
    """
    return _symbol(name, n, 1, _hints(positive, simplex))


def Matrix(name: str, rows: str | int, cols: str | int, *, positive: bool = False) -> Symbol:
    """A matrix symbol of shape ``(rows, cols)``."""
    return _symbol(name, rows, cols, _hints(positive, False))


def Scalar(name: str, *, positive: bool = False) -> Symbol:
    """A scalar symbol, shape (1, 1)."""
    return _symbol(name, 1, 1, _hints(positive, False))


def _expr(value: object, op: str) -> Expr:
    if not isinstance(value, Expr):
        raise UnsupportedOperationError(f"{op}({value!r}): the argument is not an mcalc expression")
    return value


def sum(a: Expr) -> Expr:
    """The sum of all entries, a scalar."""
    return Sum(_expr(a, "sum"))


def mean(a: Expr) -> Expr:
    """The mean of all entries, a scalar."""
    a = _expr(a, "mean")
    return (1 / a.size) * Sum(a)


def trace(a: Expr) -> Expr:
    """The trace of a square matrix."""
    return Trace(_expr(a, "trace"))


def _vector(x: object, op: str) -> Expr:
    x = _expr(x, op)
    if not x.is_vector:
        raise ShapeError(f"{op} expects a vector, got {x!r} of shape ({x.rows}, {x.cols})")
    return x


def softmax(x: Expr) -> Expr:
    """softmax of a vector, or of each column of a matrix (attention's weights, one column per query)."""
    return Softmax(_expr(x, "softmax"))


def log_softmax(x: Expr) -> Expr:
    """log-softmax of a vector (numerically the stable form)."""
    return LogSoftmax(_vector(x, "log_softmax"))


def inv(a: Expr) -> Expr:
    """The inverse of a square matrix."""
    return Inverse(_expr(a, "inv"))


# Structured factors, for writing closed forms (the engine has no differential
# rule for them: they appear in derived rules, not in modules).
def kron(a: Expr, b: Expr) -> Expr:
    """The Kronecker product a ⊗ b."""
    return Kron(_expr(a, "kron"), _expr(b, "kron"))


def diag(v: Expr) -> Expr:
    """The diagonal matrix of a vector."""
    return Diag(_expr(v, "diag"))


def vec(a: Expr) -> Expr:
    """Column-stacking vectorisation."""
    return Vec(_expr(a, "vec"))


def ones(rows: str | int, cols: str | int = 1) -> Expr:
    """The all-ones matrix (a column by default): ``mc.mean(x) * mc.ones("n")`` broadcasts a scalar
    over a vector, as in mean-centring x − 1·mean(x)."""
    return Ones(dims.dim(rows, where="ones"), dims.dim(cols, where="ones"))


def identity(n: str | int) -> Expr:
    """The identity matrix I_n."""
    return Identity(dims.dim(n, where="identity"))


Size = str | int | Sequence[str | int]


def _size(x: Expr, spec: UnfoldSpec, size: Size | None, where: str) -> sp.Tuple:
    """The spatial extents of an input X (channels × positions) under ``spec``: a signal's length by default
    (X's columns), an image's (height, width) given, their product X's columns."""
    if size is None:
        if spec.ndim > 1:
            raise ShapeError(f"{where} over {spec.ndim} dimensions needs the input's size, e.g. size=('H', 'W')")
        return spatial_size((x.cols,))
    extents = [size] if isinstance(size, (str, int)) else list(size)
    if len(extents) != spec.ndim:
        raise ShapeError(f"{where}: size {tuple(extents)} has {len(extents)} dimensions, its kernel "
                         f"{spec.kernel} {spec.ndim}")
    return spatial_size([dims.dim(e, where=where) for e in extents])


def unfold(x: Expr, kernel: int | Sequence[int], stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0,
           dilation: int | Sequence[int] = 1, size: Size | None = None) -> Expr:
    """The patches of an input X (channels × positions) as columns (im2col), (channels·taps × patches), in
    PyTorch's order (its ``unfold``): entry (ch·taps + j, t) is X at tap j of patch t, 0 in the padding.
    A signal's positions are X's columns; an image's pixels are too, row by row (PyTorch's
    ``reshape(c, H*W)``), with ``size=(H, W)`` and a kernel, stride, padding and dilation that are each a
    number for both dimensions or a pair. A convolution is ``W @ mc.unfold(X, k)`` with W (out channels ×
    channels·taps)."""
    x = _expr(x, "unfold")
    spec = UnfoldSpec.of(kernel, stride, padding, dilation, ndim=None if size is None or isinstance(size, (str, int))
                         else len(size))
    unfolded = Unfold(x, spec, _size(x, spec, size, "unfold"))
    if not dims.same(x.cols, sp.Mul(*unfolded.args[2])):
        raise ShapeError(f"unfold: an input of size {tuple(unfolded.args[2])} has {sp.Mul(*unfolded.args[2])} "
                         f"positions, but X has {x.cols} columns")
    return unfolded


def max_pool(x: Expr, kernel: int | Sequence[int], stride: int | Sequence[int] | None = None,
             padding: int | Sequence[int] = 0, size: Size | None = None) -> Expr:
    """Max pooling of an input X (channels × positions) over windows of ``kernel`` positions, ``stride`` apart
    (``kernel`` by default), the input padded with ``padding`` positions that no window's maximum takes
    (PyTorch's MaxPool1d, or MaxPool2d with ``size=(H, W)``): the piecewise-linear selection
    (I_c ⊗ 1ᵀ) (mask(U) ⊙ U) of U = unfold(X), 1 over a window's taps, mask the 0/1 argmax of each window
    (the first of equal maxima), constant under differentiation."""
    patches = unfold(x, kernel, stride=kernel if stride is None else stride, padding=padding, size=size)
    _, spec, extents = patches.args
    mask = WindowArgmax(patches, spec, extents)
    return Kron(Identity(x.rows), Ones(ONE, sp.Integer(spec.taps))) @ Hadamard(mask, patches)


def fold(u: Expr, size: Size, kernel: int | Sequence[int], stride: int | Sequence[int] = 1,
         padding: int | Sequence[int] = 0, dilation: int | Sequence[int] = 1) -> Expr:
    """The adjoint of :func:`unfold` (col2im): patches (channels·taps × patches) added back into an input of
    ``size`` (a signal's length, or an image's (H, W)), each entry to the position it was read from."""
    u = _expr(u, "fold")
    spec = UnfoldSpec.of(kernel, stride, padding, dilation,
                         ndim=None if isinstance(size, (str, int)) else len(size))
    size = _size(u, spec, size, "fold")
    if not dims.same(u.cols, spec.positions(size)):
        raise ShapeError(f"fold: an input of size {tuple(size)} has {spec.positions(size)} patches under "
                         f"{spec.kernel} taps, but U has {u.cols} columns")
    return Fold(u, spec, size)


__all__ = [
    "Matrix",
    "Scalar",
    "Vector",
    "diag",
    "fold",
    "identity",
    "inv",
    "kron",
    "log_softmax",
    "max_pool",
    "mean",
    "ones",
    "softmax",
    "sp",
    "sum",
    "trace",
    "unfold",
    "vec",
]
