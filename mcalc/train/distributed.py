"""Data parallelism over MPI: `mpiexec -n N mcalc train …`, equal to one process on the global batch.

Every rank holds the whole network and data set, draws the same batch order (the same seed), and takes
its contiguous shard of every global batch (:meth:`DataParallel.shard`). A batch mean over the global
batch is the sum over ranks of each shard's mean weighted by its share of the batch, so every batch mean
a step needs (the loss, gradients, curvature products, K-FAC's and K-BFGS's factors) is all-reduced that
way (:meth:`DataParallel.mean`), where the network and the optimisers compute it, and every rank takes
the same step. HBP's blocks are reduced inside the generated code, at every batch mean it forms, before
anything reads it (a PSD cast of the summed concave term, a product of means under (7) or 6-kfac):
:mod:`mcalc.runtime.rank_sum`. Eq. (8)'s block solves and decompositions and K-FAC's inverses are shared
out, each to one rank by cost (:meth:`DataParallel.assign`), and their results all-reduced, so every rank
keeps the state of one process (and a checkpoint of any rank resumes on any number of them). Rank 0
alone prints, writes the history, the plot and the checkpoints.

Without an MPI launcher (or with one rank) a :class:`SingleProcess` stands in and nothing is
communicated. mpi4py and an MPI library (the ``mpich`` wheel) come with the ``mpi`` extra. On the
CuPy backend the sums run through NCCL on the GPUs where CuPy has it (:class:`NCCLCommunicator`),
else through the host.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import McalcError
from ..runtime.blocks import namespace

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


class NCCLCommunicator:
    """The ranks of an MPI communicator whose sums NCCL makes on their GPUs (``cupy.cuda.nccl``): CuPy
    arrays never leave the device. Each rank takes GPU rank mod the GPUs it sees (before CuPy allocates
    anything there); MPI hands NCCL's id from rank 0 to the others and aborts a failed run."""

    def __init__(self, mpi: MPICommunicator, comm: Any = None) -> None:
        import cupy
        from cupy.cuda import nccl

        self.mpi, self._nccl = mpi, nccl
        world = comm if comm is not None else mpi.comm  # an mpi4py communicator (COMM_SELF in a test)
        self.rank, self.size = world.Get_rank(), world.Get_size()
        cupy.cuda.Device(self.rank % cupy.cuda.runtime.getDeviceCount()).use()
        unique_id = world.bcast(nccl.get_unique_id() if self.rank == 0 else None, root=0)
        self.comm = nccl.NcclCommunicator(self.size, unique_id, self.rank)

    @property
    def xp(self) -> Any:
        import cupy

        return cupy

    def allreduce(self, a: Any) -> Any:
        """The elementwise sum over the ranks of a float64 CuPy array, on the current stream."""
        import cupy

        a = cupy.ascontiguousarray(a, dtype=cupy.float64)
        out = cupy.empty_like(a)
        self.comm.allReduce(a.data.ptr, out.data.ptr, a.size, self._nccl.NCCL_FLOAT64, self._nccl.NCCL_SUM,
                            cupy.cuda.get_current_stream().ptr)
        return out

    def abort(self, code: int) -> None:
        self.mpi.abort(code)


Communicator = SingleProcess | MPICommunicator | NCCLCommunicator


def nccl_unavailable_reason() -> str | None:
    """Why CuPy's arrays cannot be summed by NCCL here, or None when they can."""
    try:
        import cupy
        from cupy.cuda import nccl  # noqa: F401
    except ImportError as exc:
        return f"no CuPy with NCCL ({exc})"
    return None if getattr(cupy.cuda, "nccl_enabled", False) else "CuPy was built without NCCL"


def communicator(backend: str = "numpy") -> Communicator:
    """MPI's world where an MPI launcher started more than one rank, else a single process; for the
    ``cupy`` backend its sums made by NCCL on the GPUs where CuPy has NCCL (through the host otherwise)."""
    sizes = [os.environ[name] for name in _LAUNCHER_SIZE if os.environ.get(name, "").isdigit()]
    if not (sizes and int(sizes[0]) > 1):
        return SingleProcess()
    mpi = MPICommunicator()
    return NCCLCommunicator(mpi) if backend == "cupy" and nccl_unavailable_reason() is None else mpi


class DataParallel:
    """The global batch shared out over the ranks of ``comm``, and the means that put it back together.
    Every rank must make the same calls in the same order (each reduction waits for all of them)."""

    def __init__(self, comm: Communicator | None = None) -> None:
        self.comm = comm or SingleProcess()
        self.batch = 0  # the current global batch's size (:meth:`shard`)
        self.reductions, self.communicated = 0, 0  # all-reduces made, and the bytes of their buffers

    @property
    def is_root(self) -> bool:
        return self.comm.rank == 0

    def shard(self, index: np.ndarray) -> np.ndarray:
        """This rank's contiguous part of a global batch's sample indices, sizes differing by at most one; a
        batch smaller than the ranks is every rank's whole (:meth:`mean` weighs it so)."""
        self.batch = len(index)
        return self.local(index)

    def local(self, values: np.ndarray) -> np.ndarray:
        """This rank's part of something drawn for every sample of the current global batch (K-FAC's
        sampled labels), cut as :meth:`shard` cuts the batch."""
        if self.comm.size == 1 or len(values) < self.comm.size:
            return values
        return np.array_split(values, self.comm.size)[self.comm.rank]

    def sum(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Σ_r v_r over the ranks, everything in one all-reduce; arrays keep their type (NumPy or CuPy) and
        dtype, numbers come back as floats."""
        return self._all_reduce(values, None)

    def mean(self, values: Mapping[str, Any], count: int) -> dict[str, Any]:
        """The mean over the global batch of quantities each rank has averaged over its ``count`` samples:
        Σ_r n_r v_r / Σ_r n_r, in one all-reduce (as :meth:`sum`)."""
        return self._all_reduce(values, count)

    def _all_reduce(self, values: Mapping[str, Any], count: int | None) -> dict[str, Any]:
        """Σ_r v_r, or with ``count`` Σ_r n_r v_r / Σ_r n_r, the weights summed in the same buffer (float64
        throughout, so a float32 value loses nothing to the weighting)."""
        if self.comm.size == 1:
            return dict(values)
        xp = getattr(self.comm, "xp", np)  # where the communicator sums: the host (MPI), or the GPUs (NCCL)
        parts = [xp.asarray(v.get() if xp is np and hasattr(v, "get") else v, dtype=xp.float64)
                 for v in values.values()]
        flat = xp.concatenate([xp.ones(1)] + [h.reshape(-1) for h in parts]) * (1 if count is None else count)
        summed = self.comm.allreduce(flat)
        self.reductions, self.communicated = self.reductions + 1, self.communicated + flat.nbytes
        divisor = 1.0 if count is None else summed[0]
        out, start = {}, 1
        for (name, value), h in zip(values.items(), parts):
            part = summed[start : start + h.size].reshape(h.shape) / divisor
            start += h.size
            out[name] = float(part) if isinstance(value, (int, float)) else \
                namespace(value).asarray(part, dtype=getattr(value, "dtype", np.float64))
        return out

    def assign(self, costs: Sequence[float]) -> list[int]:
        """The rank that does each of several jobs of these ``costs``: the costliest first, each to the
        least loaded rank (longest processing time first, as KAISA balances K-FAC's inverses over its
        workers); the same answer on every rank, whose costs must agree."""
        loads, owners = [0.0] * self.comm.size, [0] * len(costs)
        for job in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
            owners[job] = min(range(self.comm.size), key=lambda r: (loads[r], r))
            loads[owners[job]] += costs[job]
        return owners

    def share(self, costs: Sequence[float], work: Callable[[int], dict[str, Any]],
              blank: Callable[[int], dict[str, Any]]) -> list[dict[str, Any]]:
        """Jobs shared out, KAISA's way: job i is done by the rank :meth:`assign` gives it, ``work(i)`` (named
        arrays and numbers), every other rank contributing ``blank(i)``, zeros of the same shapes; one
        all-reduce then hands every rank every job's results. In one process: every ``work(i)``."""
        owners = self.assign(costs)
        flat = {f"{job}/{name}": value for job, owner in enumerate(owners)
                for name, value in (work(job) if owner == self.comm.rank else blank(job)).items()}
        out: list[dict[str, Any]] = [{} for _ in owners]
        for key, value in self.sum(flat).items():
            job, name = key.split("/", 1)
            out[int(job)][name] = value
        return out

    def samples(self, count: int) -> int:
        """Σ_r n_r: the samples of the global batch, from this rank's ``count``."""
        return count if self.comm.size == 1 else round(self.sum({"": float(count)})[""])

    def array_sum(self, a: Any) -> Any:
        """One array summed over the ranks (what generated HBP code reduces at a batch mean)."""
        return self.sum({"": a})[""]
