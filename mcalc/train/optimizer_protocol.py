"""What the training loop asks of an optimiser, written once: the base class every optimiser derives.

The loop calls :meth:`Optimizer.curvature_request` before each backward pass (which HBP blocks, if
any, the next step needs), :meth:`Optimizer.prepare` once before the first step, :meth:`Optimizer.step`
for the update and, for a :attr:`Optimizer.second_order` optimiser whose step it rejected (its loss rose
past the trust bound, :mod:`.trainer`), :meth:`Optimizer.reject` once the weights and the optimiser's
state are restored. The defaults are a first-order optimiser's. A step's mini-batch comes as a
:class:`MiniBatch`, which computes its loss before and after the proposed update once for whoever asks,
and holds the whole training set as another (``training``) for an optimiser that measures on it.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from ..modes import Approximation, Curvature

if TYPE_CHECKING:
    from ..runtime.blocks import CurvatureBlock
    from .network import Network


class MiniBatch:
    """A step's mini-batch (X, Y), which unpacks as that pair, with its mean loss at the weights before the
    step and after a proposed update, each computed once however many ask: the optimiser's reduction
    ratio asks for both, the training loop's rejection test for the second. (hbp-newton's step had made
    three forward passes besides the backward pass's; it makes one.)"""

    def __init__(self, net: Network, X: Any, Y: Any, loss: float | None = None,
                 training: MiniBatch | None = None) -> None:
        self.net, self.X, self.Y = net, X, Y
        self.training = training  # the whole training set (this rank's shard), for Martens' HF, which measures on it
        self._before = loss  # the backward pass's, when the caller has it
        self._after: tuple[dict[str, Any], tuple[int, ...], float] | None = None

    @classmethod
    def of(cls, net: Network, batch: MiniBatch | tuple[Any, Any]) -> MiniBatch:
        """``batch`` itself, or a plain (X, Y) made one."""
        return batch if isinstance(batch, MiniBatch) else cls(net, *batch)

    def __iter__(self) -> Iterator[Any]:  # read as the pair (X, Y) it replaces in ``step``'s signature
        return iter((self.X, self.Y))

    def __getitem__(self, index: int) -> Any:
        return (self.X, self.Y)[index]

    def __len__(self) -> int:
        return 2

    def loss(self, updates: dict[str, Any] | None = None) -> float:
        """The batch's mean loss at the network's weights, or at the weights plus ``updates``. The value
        after an update is kept for that dict of those arrays (held here, so their identities stay
        theirs): an update is never changed in place once proposed."""
        if updates is None:
            if self._before is None:
                self._before = self.net.loss(self.X, self.Y)
            return self._before
        identity = tuple(id(u) for u in updates.values())
        if self._after is None or self._after[0] is not updates or self._after[1] != identity:
            self._after = (updates, identity, self.net.loss(self.X, self.Y, self.net.params_plus(updates)))
        return self._after[2]


class CurvatureRequest(NamedTuple):
    """The HBP blocks a step needs: a curvature mode, a batch approximation and the parameters whose blocks
    it reads (None: every parameter's). Below the lowest layer with such a parameter the backward pass
    carries no curvature (K-FAC's own factors serve the layers below an attention)."""

    curvature: Curvature
    approximation: Approximation
    parameters: frozenset[str] | None = None


class Optimizer:
    """Base of the optimisers: gradients only, no preparation, no damping to raise."""

    second_order: ClassVar[bool] = False  # its steps are guarded by the trust bound and rejected by reject()

    def curvature_request(self) -> CurvatureRequest | None:
        """The blocks the next step needs; None: gradients only."""
        return None

    def prepare(self, net: Network, X_train: Any) -> None:
        """Called once with the training inputs before the first step (K-BFGS's pass over the data)."""

    def step(self, net: Network, grads: dict[str, Any], blocks: dict[str, CurvatureBlock],
             batch: MiniBatch | tuple[Any, Any]) -> dict[str, Any]:
        """The update of every parameter for the mini-batch ``batch`` = (X, Y), from its gradients and
        the blocks :meth:`curvature_request` asked for."""
        raise NotImplementedError

    def reject(self) -> None:
        """The step just proposed was rejected and undone: make the next one more conservative."""
