"""Curvature blocks as generated code returns them: Kronecker factors plus a dense remainder."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class Gram:
    """The factor P Pᵀ of a batch matrix P (rows × B), applied through P without forming it.

    Forming it costs rows²·B once and rows² memory; applying it costs
    2·rows·B per column, so it stays implicit when rows > B.
    """

    def __init__(self, p: Any) -> None:
        self.p = p
        self.shape = (p.shape[0], p.shape[0])
        self.size = p.shape[0] * p.shape[0]

    def right_apply(self, v: Any) -> Any:
        """V (P Pᵀ)ᵀ = (V P) Pᵀ."""
        return (v @ self.p) @ self.p.T

    def dense(self) -> Any:
        return self.p @ self.p.T


def _right_apply(v: Any, a: Any) -> Any:
    return a.right_apply(v) if isinstance(a, Gram) else v @ a.T


def _dense(a: Any) -> Any:
    return a.dense() if isinstance(a, Gram) else a


@dataclass
class CurvatureBlock:
    """C = Σⱼ (Aⱼ ⊗ Bⱼ) + M, the factors kept apart (M may be absent; a factor may be an implicit :class:`Gram`).

    ``matvec`` multiplies vec V by C as Σⱼ vec(Bⱼ V Aⱼᵀ) + M vec V, never
    forming a Kronecker product (S.1).
    """

    kron: list[tuple[Any, Any]] = field(default_factory=list)
    dense: Any = None

    @property
    def size(self) -> int:
        if self.kron:
            a, b = self.kron[0]
            return a.shape[0] * b.shape[0]
        return self.dense.shape[0]

    def matvec(self, v: Any) -> Any:
        """C v for a flat v (column-stacking vec of the parameter)."""
        xp = namespace(v)
        out = self.dense @ v if self.dense is not None else xp.zeros_like(v)
        for a, b in self.kron:
            V = v.reshape(b.shape[1], a.shape[1], order="F")
            out = out + _right_apply(_dense(b) @ V, a).reshape(-1, order="F")
        return out

    def split_rows(self, rows: int, groups: int) -> list[CurvatureBlock]:
        """The diagonal sub-blocks of a parameter with ``rows`` rows split row-wise into ``groups`` (Section 4).

        With column-stacking vec, entry (i, j) of an (m × n) parameter sits at
        i + m j, so the sub-block of the rows R is Σ A ⊗ B[R, R] + M[idx, idx]:
        Kronecker structure survives the split.
        """
        xp = namespace(_dense(self.kron[0][1]) if self.kron else self.dense)
        cols = self.size // rows
        out = []
        for part in xp.array_split(xp.arange(rows), groups):
            kron = [(a, _dense(b)[part][:, part]) for a, b in self.kron]
            dense = None
            if self.dense is not None:
                index = (part[:, None] + rows * xp.arange(cols)[None, :]).reshape(-1, order="F")
                dense = self.dense[index][:, index]
            out.append(CurvatureBlock(kron, dense))
        return out

    def to_dense(self) -> Any:
        """C as one matrix (only when a dense matrix is really wanted)."""
        parts = [namespace(_dense(a)).kron(_dense(a), _dense(b)) for a, b in self.kron]
        if self.dense is not None:
            parts.append(self.dense)
        total = parts[0]
        for p in parts[1:]:
            total = total + p
        return total


def namespace(a: Any) -> Any:
    """numpy or cupy, whichever ``a`` belongs to."""
    module = type(a).__module__.split(".")[0]
    if module == "cupy":
        import cupy

        return cupy
    import numpy

    return numpy
