"""Curvature blocks as generated code returns them: Kronecker factors plus a dense remainder."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import McalcError
from .cuda_graph import matmul


class GramFactor:
    """The factor P Pᵀ of a batch matrix P (rows × B), applied through P without forming it.

    Forming it costs rows²·B once and rows² memory; applying it costs
    2·rows·B per column, so it stays implicit when rows > B.
    """

    scale = 1.0  # c of c·P Pᵀ (a class default: factors pickled before it existed have none)

    def __init__(self, p: Any, scale: float = 1.0) -> None:
        self.p, self.scale = p, scale
        self.shape = (p.shape[0], p.shape[0])
        self.size = p.shape[0] * p.shape[0]

    def right_apply(self, v: Any) -> Any:
        """V (c P Pᵀ)ᵀ = c (V P) Pᵀ."""
        return matmul(v @ self.p, self.p.T, self.scale)

    def dense(self) -> Any:
        return matmul(self.p, self.p.T, self.scale)


def _right_apply(v: Any, a: Any) -> Any:
    return a.right_apply(v) if isinstance(a, GramFactor) else v @ a.T


def dense_factor(a: Any) -> Any:
    """A Kronecker factor as a matrix (an implicit :class:`GramFactor` formed)."""
    return a.dense() if isinstance(a, GramFactor) else a


@dataclass
class CurvatureBlock:
    """C = Σⱼ (Aⱼ ⊗ Bⱼ) + M, the factors kept apart (M may be absent; a factor may be an implicit :class:`GramFactor`).

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
        out = self.dense @ v if self.dense is not None else None
        for a, b in self.kron:
            V = v.reshape(b.shape[1], a.shape[1], order="F")
            term = _right_apply(dense_factor(b) @ V, a).reshape(-1, order="F")
            out = term if out is None else out + term
        return out

    def split_rows(self, rows: int, groups: int) -> list[CurvatureBlock]:
        """The diagonal sub-blocks of a parameter with ``rows`` rows split row-wise into ``groups`` (Section 4).

        With column-stacking vec, entry (i, j) of an (m × n) parameter sits at
        i + m j, so the sub-block of the rows R is Σ A ⊗ B[R, R] + M[idx, idx]:
        Kronecker structure survives the split.
        """
        xp = namespace(dense_factor(self.kron[0][1]) if self.kron else self.dense)
        cols = self.size // rows
        out = []
        for part in row_groups(rows, groups, xp):
            kron = [(a, dense_factor(b)[part][:, part]) for a, b in self.kron]
            dense = None
            if self.dense is not None:
                index = (part[:, None] + rows * xp.arange(cols)[None, :]).reshape(-1, order="F")
                dense = self.dense[index][:, index]
            out.append(CurvatureBlock(kron, dense))
        return out

    @property
    def single_term(self) -> bool:
        """Whether C is one Kronecker product or one dense matrix: the blocks an :class:`Eigenbasis` covers."""
        return (len(self.kron) == 1 and self.dense is None) or (not self.kron and self.dense is not None)

    def factors(self) -> list[Any]:
        """[A, B] of a block A ⊗ B, or [C] of a dense block."""
        if not self.single_term:
            raise McalcError("an eigenbasis needs a block that is one Kronecker product or one dense matrix")
        return list(self.kron[0]) if self.kron else [self.dense]

    def eigenbasis(self) -> Eigenbasis:
        """The eigen-decomposition of C from those of its factors (:func:`factor_eigh` each)."""
        return Eigenbasis([factor_eigh(f) for f in self.factors()])

    def as_linear_operator(self) -> Any:
        """C as a ``scipy.sparse.linalg.LinearOperator`` on the column-stacking vec of the parameter, applied
        by :meth:`matvec` (never formed), on the host: ``eigsh`` and ``cg`` work on it."""
        from scipy.sparse.linalg import LinearOperator

        sample = dense_factor(self.kron[0][1]) if self.kron else self.dense
        xp = namespace(sample)

        def matvec(v: Any) -> Any:
            out = self.matvec(xp.asarray(np.ravel(v), dtype=sample.dtype))
            return out.get() if hasattr(out, "get") else out

        return LinearOperator((self.size, self.size), matvec=matvec, rmatvec=matvec, dtype=np.dtype(str(sample.dtype)))

    def to_dense(self) -> Any:
        """C as one matrix (only when a dense matrix is really wanted)."""
        parts = [namespace(dense_factor(a)).kron(dense_factor(a), dense_factor(b)) for a, b in self.kron]
        if self.dense is not None:
            parts.append(self.dense)
        total = parts[0]
        for p in parts[1:]:
            total = total + p
        return total


@dataclass
class Eigenbasis:
    """C = (Q_a ⊗ Q_b) diag(λ_a ⊗ λ_b) (Q_a ⊗ Q_b)ᵀ for C = A ⊗ B with A = Q_a Λ_a Q_aᵀ, B = Q_b Λ_b Q_bᵀ
    (the mixed-product rule), or C = Q Λ Qᵀ for a dense block on vec of the parameter.

    ``pairs`` holds (λ, Q) per factor in the order of :meth:`CurvatureBlock.factors`. Kept
    instead of C to solve damped systems with it: a Kronecker block is never formed, and only
    its factors (n³ + m³, not (nm)³) are decomposed.
    """

    pairs: list[tuple[Any, Any]]

    def __post_init__(self) -> None:
        # the eigenvalues of C, λ_b λ_aᵀ shaped like the parameter (flat for a dense C): every solve divides by them
        if len(self.pairs) == 1:
            self.spectrum = self.pairs[0][0]
        else:
            (lam_a, _), (lam_b, _) = self.pairs
            self.spectrum = lam_b[:, None] * lam_a[None, :]

    def solve_damped(self, g: Any, alpha: float, beta: float, floor: float = 0.0) -> Any:
        """[α I + β C]⁻¹ vec G for a parameter-shaped G, returned parameter-shaped; with ``floor``,
        each eigenvalue α + β λ is taken as at least ``floor`` (no direction amplified by more than
        1/floor).

        By (S.1) vec(Q_bᵀ G Q_a) = (Q_a ⊗ Q_b)ᵀ vec G: rotate into the eigenbasis,
        divide by α + β λ_b λ_aᵀ, rotate back.
        """
        damped = namespace(g).maximum(alpha + beta * self.spectrum, floor)
        if len(self.pairs) == 1:
            q, v = self.pairs[0][1], g.reshape(-1, order="F")
            return (q @ ((q.T @ v) / damped)).reshape(g.shape, order="F")
        (_, q_a), (_, q_b) = self.pairs
        return q_b @ ((q_b.T @ g @ q_a) / damped) @ q_a.T


def row_groups(rows: int, groups: int, xp: Any) -> list[Any]:
    """The rows of a parameter split into ``groups`` contiguous index arrays of near-equal size (Section 4):
    the one partition that a block's sub-blocks and the gradient's pieces must share."""
    return xp.array_split(xp.arange(rows), groups)


def factor_eigh(a: Any) -> tuple[Any, Any]:
    """Eigenvalues (ascending) and orthonormal eigenvectors of a symmetric factor (a :class:`GramFactor`
    formed first)."""
    dense = dense_factor(a)
    return namespace(dense).linalg.eigh(dense)


def namespace(a: Any) -> Any:
    """numpy or cupy, whichever ``a`` belongs to."""
    module = type(a).__module__.split(".")[0]
    if module == "cupy":
        import cupy

        return cupy
    import numpy

    return numpy
