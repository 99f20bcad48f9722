"""Declaration: matrix symbols and the operations a module is written with."""
from __future__ import annotations

import keyword
import re

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
    """softmax of a vector."""
    return Softmax(_vector(x, "softmax"))


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


def unfold(x: Expr, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> Expr:
    """The patches of a signal X (channels × length) as columns (im2col), (channels·kernel × positions):
    entry (ch·kernel + j, t) is X[ch, t·stride − padding + j·dilation], 0 in the padding (PyTorch's
    order). A 1-D convolution is ``W @ mc.unfold(X, k)`` with W (out channels × channels·k)."""
    x = _expr(x, "unfold")
    return Unfold(x, UnfoldSpec(int(kernel), int(stride), int(padding), int(dilation)))


def max_pool(x: Expr, kernel: int) -> Expr:
    """Max pooling of a signal X (channels × length) over windows of ``kernel`` positions, ``kernel`` apart
    (PyTorch's MaxPool1d(k)): the piecewise-linear selection (I_c ⊗ 1_kᵀ) (mask(U) ⊙ U) of U = unfold(X),
    mask the 0/1 argmax of each window (the first of equal maxima), constant under differentiation."""
    x = _expr(x, "max_pool")
    patches = Unfold(x, UnfoldSpec(int(kernel), int(kernel)))
    return Kron(Identity(x.rows), Ones(ONE, sp.Integer(kernel))) @ Hadamard(WindowArgmax(patches, kernel), patches)


def fold(u: Expr, length: str | int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> Expr:
    """The adjoint of :func:`unfold` (col2im): patches (channels·kernel × positions) added back into a
    signal of ``length``, each entry to the position it was read from."""
    u = _expr(u, "fold")
    return Fold(u, UnfoldSpec(int(kernel), int(stride), int(padding), int(dilation)), dims.dim(length, where="fold"))


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
