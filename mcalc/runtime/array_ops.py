"""Array helpers the generated code calls, for NumPy and CuPy arrays alike."""
from __future__ import annotations

from typing import Any

from ..modes import Projection
from .blocks import GramFactor, namespace
from .cuda_graph import matmul


def plus_diagonal(m: Any, v: Any, copy: bool) -> Any:
    """m + diag(v); ``m`` is written in place unless it is an argument (``copy``) or a view."""
    xp = namespace(m)
    out = xp.array(m, copy=True) if copy or m.base is not None else m
    index = xp.arange(out.shape[0])
    out[index, index] += xp.reshape(xp.asarray(v, dtype=out.dtype), (-1,))
    return out


def softmax(x: Any) -> Any:
    """Column-wise softmax."""
    xp = namespace(x)
    e = xp.exp(x - x.max(axis=0, keepdims=True))
    return e / e.sum(axis=0, keepdims=True)


def log_softmax(x: Any) -> Any:
    """Column-wise log-softmax, in the stable form."""
    xp = namespace(x)
    shifted = x - x.max(axis=0, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=0, keepdims=True))


def commutation(m: int, n: int, xp: Any, dtype: Any = float) -> Any:
    """K_{m,n}: K vec(A) = vec(Aᵀ) for A of shape (m, n)."""
    k = xp.zeros((m * n, m * n), dtype=dtype)
    i, j = xp.meshgrid(xp.arange(m), xp.arange(n), indexing="ij")
    k[(j + n * i).ravel(), (i + m * j).ravel()] = 1.0
    return k


def psd_project(a: Any, mode: Projection | str) -> Any:
    """V f(Λ) Vᵀ of the symmetric part of ``a``, f = |·| ('abs') or max(·, 0) ('clip')."""
    xp = namespace(a)
    w, v = xp.linalg.eigh(0.5 * (a + a.T))
    return matmul(v * (xp.abs(w) if mode == Projection.ABS else xp.maximum(w, 0.0)), v.T)


def kron(scale: Any, a: Any, b: Any) -> tuple[Any, Any]:
    """Kronecker factors with a scalar folded into the smaller one (the cheaper pass); an implicit
    :class:`GramFactor` cannot take it, so with two of them the smaller is formed first."""
    if isinstance(scale, (int, float)) and scale == 1:
        return a, b
    if isinstance(a, GramFactor) and isinstance(b, GramFactor):
        a, b = (a.dense(), b) if a.size <= b.size else (a, b.dense())
    scale_a = not isinstance(a, GramFactor) and (a.size <= b.size or isinstance(b, GramFactor))
    return (a * scale, b) if scale_a else (a, b * scale)


def gram(p: Any) -> Any:
    """P Pᵀ formed when that is cheaper than applying it through P (rows ≤ columns), else kept implicit."""
    return matmul(p, p.T) if p.shape[0] <= p.shape[1] else GramFactor(p)


def special(a: Any) -> Any:
    """The special functions (erf, erfc, gamma, …) for the array ``a``: ``scipy.special`` for NumPy,
    ``cupyx.scipy.special`` for CuPy; imported when a generated function first uses one."""
    if type(a).__module__.split(".")[0] == "cupy":
        import cupyx.scipy.special as module
    else:
        import scipy.special as module
    return module
