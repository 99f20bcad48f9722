"""Data parallelism over MPI: `mpiexec -n N mcalc train …`, equal to one process on the global batch.

Every rank holds the whole network and data set, draws the same batch order (the same seed), and takes
its contiguous shard of every global batch (:meth:`DataParallel.shard`). A batch mean over the global
batch is the sum over ranks of each shard's mean weighted by its share of the batch, so the loss and the
gradients are all-reduced that way (:meth:`DataParallel.average`), and every rank takes the same step.
Rank 0 alone prints, writes the history, the plot and the checkpoints.

Without an MPI launcher (or with one rank) a :class:`SingleProcess` stands in and nothing is
communicated. mpi4py and an MPI library (the ``mpich`` wheel) come with the ``mpi`` extra.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import McalcError

# what MPI launchers set in every rank's environment (MPICH's Hydra and gforker, Open MPI, Intel MPI, Slurm)
_LAUNCHER_SIZE = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "PMIX_SIZE")


class SingleProcess:
    """One process: rank 0 of 1, every reduction the identity."""

    rank, size = 0, 1

    def allreduce(self, a: np.ndarray) -> np.ndarray:
        return a

    def abort(self, code: int) -> None:
        raise SystemExit(code)


class MPICommunicator:
    """The ranks of ``MPI.COMM_WORLD``, through mpi4py."""

    def __init__(self) -> None:
        try:
            from mpi4py import MPI
        except ImportError:
            raise McalcError("running under an MPI launcher needs mpi4py and an MPI library: "
                             "pip install -e '.[mpi]'") from None
        self.comm = MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()

    def allreduce(self, a: np.ndarray) -> np.ndarray:
        """The elementwise sum over the ranks of a float64 array, the same on every rank."""
        out = np.empty_like(a)
        self.comm.Allreduce(np.ascontiguousarray(a), out)
        return out

    def abort(self, code: int) -> None:
        """End every rank: one that failed must not leave the others waiting in a reduction."""
        self.comm.Abort(code)


Communicator = SingleProcess | MPICommunicator


def communicator() -> Communicator:
    """MPI's world where an MPI launcher started more than one rank, else a single process."""
    sizes = [os.environ[name] for name in _LAUNCHER_SIZE if os.environ.get(name, "").isdigit()]
    return MPICommunicator() if sizes and int(sizes[0]) > 1 else SingleProcess()


class DataParallel:
    """The global batch shared out over the ranks of ``comm``, and the means that put it back together."""

    def __init__(self, comm: Communicator | None = None) -> None:
        self.comm = comm or SingleProcess()

    @property
    def is_root(self) -> bool:
        return self.comm.rank == 0

    def shard(self, index: np.ndarray) -> np.ndarray:
        """This rank's contiguous part of a global batch's sample indices (sizes differing by at most one)."""
        return np.array_split(index, self.comm.size)[self.comm.rank]

    def average(self, loss: float, grads: Mapping[str, Any], local: int, total: int,
                xp: Any = np) -> tuple[float, dict[str, Any]]:
        """The global batch's mean loss and gradients from each rank's mean over its ``local`` of ``total``
        samples: Σ_r (n_r / n) mean_r, one all-reduce of everything flattened into one buffer."""
        if self.comm.size == 1:
            return loss, dict(grads)
        weight = local / total
        names = list(grads)
        host = [np.asarray(g.get() if hasattr(g, "get") else g, dtype=np.float64) for g in grads.values()]
        flat = np.concatenate([[loss if local else 0.0]] + [h.reshape(-1) for h in host]) * weight
        summed = self.comm.allreduce(flat)
        out, start = {}, 1
        for name, h, g in zip(names, host, grads.values()):
            out[name] = xp.asarray(summed[start : start + h.size].reshape(h.shape), dtype=g.dtype)
            start += h.size
        return float(summed[0]), out

    def mean_loss(self, loss: float, local: int, total: int) -> float:
        """The global batch's mean loss from each rank's mean over its shard."""
        if self.comm.size == 1:
            return loss
        return float(self.comm.allreduce(np.array([loss * local / total if local else 0.0]))[0])
