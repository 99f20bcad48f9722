"""Curvature blocks as generated code returns them: Kronecker factors plus a dense remainder."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class CurvatureBlock:
    """C = Σⱼ (Aⱼ ⊗ Bⱼ) + M, the factors kept apart (M may be absent).

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
        xp = _namespace(v)
        out = self.dense @ v if self.dense is not None else xp.zeros_like(v)
        for a, b in self.kron:
            V = v.reshape(b.shape[1], a.shape[1], order="F")
            out = out + (b @ V @ a.T).reshape(-1, order="F")
        return out

    def to_dense(self) -> Any:
        """C as one matrix (only when a dense matrix is really wanted)."""
        parts = [_namespace(a).kron(a, b) for a, b in self.kron]
        if self.dense is not None:
            parts.append(self.dense)
        total = parts[0]
        for p in parts[1:]:
            total = total + p
        return total


def _namespace(a: Any) -> Any:
    module = type(a).__module__.split(".")[0]
    if module == "cupy":
        import cupy

        return cupy
    import numpy

    return numpy
