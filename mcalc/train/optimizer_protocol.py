"""What the training loop asks of an optimiser, written once: the base class every optimiser derives.

The loop calls :meth:`Optimizer.curvature_request` before each backward pass (which HBP blocks, if
any, the next step needs), :meth:`Optimizer.prepare` once before the first step, :meth:`Optimizer.step`
for the update and, for a :attr:`Optimizer.second_order` optimiser whose step it rejected (its loss rose
past the trust bound, :mod:`.trainer`), :meth:`Optimizer.reject` once the weights and the optimiser's
state are restored. The defaults are a first-order optimiser's.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from ..modes import Approximation, Curvature

if TYPE_CHECKING:
    from ..runtime.blocks import CurvatureBlock
    from .network import Network


class CurvatureRequest(NamedTuple):
    """The HBP blocks a step needs: a curvature mode and a batch approximation."""

    curvature: Curvature
    approximation: Approximation


class Optimizer:
    """Base of the optimisers: gradients only, no preparation, no damping to raise."""

    second_order: ClassVar[bool] = False  # its steps are guarded by the trust bound and rejected by reject()

    def curvature_request(self) -> CurvatureRequest | None:
        """The blocks the next step needs; None: gradients only."""
        return None

    def prepare(self, net: Network, X_train: Any) -> None:
        """Called once with the training inputs before the first step (K-BFGS's pass over the data)."""

    def step(self, net: Network, grads: dict[str, Any], blocks: dict[str, CurvatureBlock],
             batch: tuple[Any, Any]) -> dict[str, Any]:
        """The update of every parameter for the mini-batch ``batch`` = (X, Y), from its gradients and
        the blocks :meth:`curvature_request` asked for."""
        raise NotImplementedError

    def reject(self) -> None:
        """The step just proposed was rejected and undone: make the next one more conservative."""
