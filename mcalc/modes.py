"""The named choices of Hessian backpropagation, shared by the compiler, the generated code, the runtime
and the command line: curvature modes, batch approximations and eigenvalue projections.

Each is a string enum: a member equals its value (``Curvature.PCH_ABS == "pch-abs"``), so the keys of
generated tables and the command line's words are the enum's values, and :meth:`parse` turns a user's
word into a member with an error that names the choices.
"""
from __future__ import annotations

from enum import StrEnum
from typing import Any, TypeVar

from .errors import McalcError

E = TypeVar("E", bound="_Choice")


class _Choice(StrEnum):
    @classmethod
    def parse(cls: type[E], value: Any) -> E:
        """The member named by ``value`` (a member or its value); a :class:`McalcError` naming the choices
        otherwise (``6`` as a number, say, for the approximation ``"6"``)."""
        try:
            return cls(value)
        except ValueError:
            raise McalcError(f"unknown {cls.__name__.lower()} {value!r}; choose one of "
                             f"{', '.join(repr(m.value) for m in cls)}") from None

    @property
    def identifier(self) -> str:
        """The value as a Python identifier part (``pch-abs`` → ``pch_abs``), for generated names."""
        return self.value.replace("-", "_")


class Projection(_Choice):
    """How a symmetric matrix is made positive semi-definite through its eigenvalues (Section 3.2)."""

    ABS = "abs"  # λ → |λ|
    CLIP = "clip"  # λ → max(λ, 0)


class Curvature(_Choice):
    """What HBP keeps of the second term Σₖ [Hzₖ(v)] δzₖ of (4a)/(4b) (Section 3.2)."""

    EXACT = "exact"  # all of it: the Hessian
    GGN = "ggn"  # none: the generalised Gauss–Newton matrix
    PCH_ABS = "pch-abs"  # its eigenvalues cast to |λ|: the positive-curvature Hessian
    PCH_CLIP = "pch-clip"  # its negative eigenvalues set to 0

    @property
    def projection(self) -> Projection | None:
        """The eigenvalue projection of a positive-curvature mode; None for ``exact`` and ``ggn``."""
        return Projection(self.value.removeprefix("pch-")) if self.value.startswith("pch-") else None


class Approximation(_Choice):
    """How a module's curvature is averaged over a batch (Section 3.3); the values are the equations."""

    MEAN_OF_SANDWICHES = "6"  # E[Jᵀ E(𝓗) J]: exact for the batch-mean loss, eq. (6)
    SANDWICH_OF_MEANS = "7"  # E(J)ᵀ E(𝓗) E(J) + the second-order term of (6): averaged Jacobians, eq. (7)
    # (6) with every batch mean of a Kronecker product of per-sample factors factored, E[Aᵢ ⊗ Bᵢ] ≈ E[Aᵢ] ⊗ E[Bᵢ]
    # (K-FAC's assumption, Martens & Grosse 2015): where (6) has no closed batch form, a block stays two factors.
    # A weight shared over T positions, E[(Uᵢ ⊗ I) 𝓗 (Uᵢᵀ ⊗ I)], is factored as K-FAC-expand (Eschenhagen et
    # al. 2023; KFC's for convolutions, Grosse & Martens 2016): E[U Uᵀ]/T ⊗ Σₜ 𝓗ₜₜ, the positions as more samples
    KRONECKER_FACTORED = "6-kfac"
    # the same, with a shared weight factored as K-FAC-reduce: E[ū ūᵀ] ⊗ Σₜₛ 𝓗ₜₛ, ū = U 1/T the mean position
    KRONECKER_FACTORED_REDUCE = "6-kfac-reduce"
    # chosen per module by a cost model (mcalc's): (6) where it has a closed batch form (every layer of an
    # MLP, the paper's networks), 6-kfac where (6) would be formed sample by sample (a convolution's
    # weight, a gated unit's inner weights); a choice of the training driver, not a batch rule of its own
    AUTO = "auto"

    @property
    def factored(self) -> bool:
        """Whether batch means of Kronecker products are factored (K-FAC's approximations)."""
        return self in (Approximation.KRONECKER_FACTORED, Approximation.KRONECKER_FACTORED_REDUCE)


CURVATURES = tuple(Curvature)
APPROXIMATIONS = tuple(a for a in Approximation if a is not Approximation.AUTO)  # the batch rules


class CurvatureMatrix(_Choice):
    """The whole network's curvature that a matrix-free product applies (Hessian-free optimisation)."""

    GAUSS_NEWTON = "gn"  # Jᵀ 𝓗L J (Schraudolph 2002)
    HESSIAN = "hessian"  # the exact Hessian (Pearlmutter 1994)
