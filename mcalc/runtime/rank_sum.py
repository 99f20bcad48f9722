"""The sums over ranks that generated HBP code makes at every batch mean (data parallelism).

A batch mean over a global batch of B_all samples shared out over ranks is (1/B_all) Σ_ranks of each
rank's sum over its own shard. Generated HBP code writes every batch mean that way, as
``(1/B_all) * _rank_sum(this rank's sum)`` with ``B_all = _samples(B)``, so that whatever reads a mean
(a PSD cast of the summed concave term, a product of means under (7) or 6-kfac) reads the global one:
the blocks equal one process's on the global batch. In one process (the default) ``rank_sum`` is the
identity and ``samples(B)`` is B; inside :func:`across_ranks` they sum over the ranks and give the
global count.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from .blocks import GramFactor

_sum: Callable[[Any], Any] | None = None  # an all-reduce, while inside across_ranks
_samples = 0


@contextlib.contextmanager
def across_ranks(all_reduce: Callable[[Any], Any], samples: int) -> Iterator[None]:
    """Generated code called inside sums its batch means over the ranks with ``all_reduce`` (every rank
    must make the same calls) and averages over ``samples``, every rank's shard together."""
    global _sum, _samples
    previous = _sum, _samples
    _sum, _samples = all_reduce, samples
    try:
        yield
    finally:
        _sum, _samples = previous


def rank_sum(a: Any) -> Any:
    """Σ over the ranks of this rank's batch sum ``a`` (an implicit Gram factor formed first); ``a``
    itself in one process."""
    if _sum is None:
        return a
    return _sum(a.dense() if isinstance(a, GramFactor) else a)


def samples(batch: int) -> int:
    """The samples a batch mean is over: ``batch`` in one process, every rank's inside :func:`across_ranks`."""
    return batch if _sum is None else _samples
