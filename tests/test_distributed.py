"""Data parallelism over MPI (issue 16): `mpiexec -n 2 mcalc train` equal to one process on the global batch."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mcalc as mc
from mcalc.train.distributed import DataParallel, communicator

MPIEXEC = Path(sys.executable).parent / "mpiexec"
MODEL = ["--data", "synthetic", "--model", "20-16-tanh-5"]


def _mpi_unavailable() -> str | None:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed (pip install -e '.[mpi]')"
    return None if MPIEXEC.exists() or shutil.which("mpiexec") else "no mpiexec (pip install -e '.[mpi]')"


needs_mpi = pytest.mark.skipif(_mpi_unavailable() is not None, reason=_mpi_unavailable() or "")


def _train(ranks: int, *arguments: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mcalc.cli", "train", *MODEL, *arguments]
    if ranks > 1:
        command = [str(MPIEXEC if MPIEXEC.exists() else shutil.which("mpiexec")), "-n", str(ranks), *command]
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def _history(path: Path) -> list[dict]:
    return json.loads(path.read_text())["history"]


def _assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in ("train_loss", "test_loss", "test_accuracy"):
            assert x[key] == pytest.approx(y[key], rel=1e-6), key


class _Ranks:
    """Ranks simulated in one process: each all-reduce sums what every rank contributes in turn."""

    def __init__(self, size: int) -> None:
        self.size, self.rank, self.pending = size, 0, []

    def allreduce(self, a: np.ndarray) -> np.ndarray:
        self.pending.append(a)
        return a


def test_shards_and_weighted_means_give_the_global_batch_mean():
    """Uneven shards of a batch of 7 over 3 ranks; Σ_r (n_r/n) mean_r is the global mean of loss and gradients."""
    rng = np.random.default_rng(0)
    values = rng.normal(size=(7, 3))
    index = np.arange(7)
    ranks = _Ranks(3)
    shards = []
    for rank in range(3):
        ranks.rank = rank
        parallel = DataParallel(ranks)
        shard = parallel.shard(index)
        shards.append(shard)
        parallel.mean({"loss": float(values[shard, 0].mean()), "g": values[shard].mean(axis=0)}, len(shard))
    assert [len(s) for s in shards] == [3, 2, 2] and np.array_equal(np.concatenate(shards), index)
    total = sum(ranks.pending)  # [Σ n_r, Σ n_r loss_r, Σ n_r g_r]
    np.testing.assert_allclose(total[1] / total[0], values[:, 0].mean(), rtol=1e-14)
    np.testing.assert_allclose(total[2:] / total[0], values.mean(axis=0), rtol=1e-14)
    ranks.rank = 1  # a batch smaller than the ranks is every rank's whole, weighed so
    assert np.array_equal(DataParallel(ranks).shard(np.arange(2)), np.arange(2))


def test_jobs_go_to_the_least_loaded_rank_costliest_first():
    assert DataParallel(_Ranks(2)).assign([1.0, 8.0, 3.0, 3.0, 2.0]) == [0, 0, 1, 1, 1]  # loads 9 and 8
    assert DataParallel(_Ranks(3)).assign([5.0, 5.0]) == [0, 1]
    assert DataParallel().assign([1.0, 2.0]) == [0, 0]


def test_each_rank_solves_only_its_blocks(rng):
    """Rank 1 of 2, its all-reduce seeing no other rank: the directions of the blocks assigned to rank 0
    come back zero, its own equal one process's, and the two sets make up every block."""
    from mcalc.runtime.blocks import CurvatureBlock
    from mcalc.train.block_solvers import DampedBlockSolver

    parts = []
    for i, n in enumerate([3, 9, 5, 6]):
        a = rng.normal(size=(n, n))
        parts.append((f"W{i}", rng.normal(size=(n, 1)), CurvatureBlock(dense=a @ a.T)))
    whole_products, products = {}, [{}, {}]  # C Δ, from CG's residual: zeros where another rank solved
    whole = DampedBlockSolver().solve(parts, 0.1, None, whole_products)
    ranks = _Ranks(2)
    ranks.rank = 1
    mine = DampedBlockSolver().solve(parts, 0.1, DataParallel(ranks), products[1])
    solved = {key for key, d in mine.items() if np.abs(d).max() > 0}
    assert solved and solved != set(whole)
    for key in solved:
        np.testing.assert_array_equal(mine[key], whole[key])
    ranks.rank = 0
    assert {key for key, d in DampedBlockSolver().solve(parts, 0.1, DataParallel(ranks), products[0]).items()
            if np.abs(d).max() > 0} == set(whole) - solved
    for key in whole:  # the ranks' contributions sum to one process's products
        np.testing.assert_array_equal(products[0][key] + products[1][key], whole_products[key])


def test_nccl_sums_cupy_arrays_on_the_device():
    """NCCL's sum of one rank (MPI's COMM_SELF hands out its id): a CuPy array stays on the GPU. Needs a GPU
    and CuPy with NCCL; NCCL refuses two ranks on one GPU, so the two-rank run needs two GPUs."""
    from mcalc.runtime.backends import gpu_available, gpu_unavailable_reason
    from mcalc.train.distributed import MPICommunicator, NCCLCommunicator, nccl_unavailable_reason

    if not gpu_available():
        pytest.skip(f"no GPU: {gpu_unavailable_reason()}")
    if nccl_unavailable_reason() or _mpi_unavailable():
        pytest.skip(nccl_unavailable_reason() or _mpi_unavailable())
    import cupy
    from mpi4py import MPI

    nccl = NCCLCommunicator(MPICommunicator(), MPI.COMM_SELF)
    a = cupy.arange(7.0)
    summed = nccl.allreduce(a)
    assert isinstance(summed, cupy.ndarray) and bool((summed == a).all()) and nccl.size == 1


def test_a_single_process_communicates_nothing(monkeypatch):
    for name in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "PMIX_SIZE"):
        monkeypatch.delenv(name, raising=False)
    parallel = DataParallel(communicator())
    assert parallel.comm.size == 1 and parallel.is_root
    values = {"loss": 0.5, "W": np.ones((2, 2))}
    assert parallel.mean(values, 3) == values


@needs_mpi
@pytest.mark.parametrize("optimizer", ["sgd", "adam", "kfac", "kbfgs", "hf-gn --batch-size 256",
                                       "hf-newton --batch-size 256", "hf-gn --measure-on batch", "hbp-newton",
                                       "hbp-newton --solver eigen", "hbp-newton --solver auto"])
def test_two_ranks_equal_one_process(optimizer, tmp_path):
    """The global batch of 63 (1600 samples: the last batch 25) shared 32/31 and 13/12: the histories equal
    one process's (gradients, HBP's blocks, K-FAC's and K-BFGS's factors with K-FAC's sampled labels,
    curvature products, losses and Martens' squared gradients all averaged over the ranks; eq. (8)'s
    solves and decompositions and K-FAC's inverses shared out), and rank 0 alone writes.

    Martens' HF, which measures on the training set (800 samples a rank), runs 14 steps of 256: over
    more steps its CG amplifies the two ranks' other rounding of the training set's gradient (10⁻¹⁶ →
    10⁻⁸ over the 25 steps of an epoch of 63) until CG-backtracking's choice between two iterates of
    nearly equal loss goes the other way, a history as valid as one process's but not equal to it."""
    batch = [] if "--batch-size" in optimizer else ["--batch-size", "63"]
    options = ["--optimizer", *optimizer.split(), "--epochs", "2", *batch]
    one = _train(1, *options, "--json", "one.json", cwd=tmp_path)
    two = _train(2, *options, "--json", "two.json", cwd=tmp_path)
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    assert two.stdout.count("wrote two.json") == 1 and two.stdout.count("epoch   2") == 1 and "2 ranks" in two.stdout
    _assert_same(_history(tmp_path / "one.json"), _history(tmp_path / "two.json"))


@needs_mpi
def test_a_two_rank_checkpoint_resumes_on_one_rank_and_the_reverse(tmp_path):
    options = ["--optimizer", "adam", "--batch-size", "64"]
    reference = _train(1, *options, "--epochs", "3", "--json", "ref.json", cwd=tmp_path)
    first = _train(2, *options, "--epochs", "2", "--checkpoint", "two.ckpt", cwd=tmp_path)
    resumed = _train(1, *options, "--epochs", "3", "--resume", "two.ckpt", "--json", "resumed.json", cwd=tmp_path)
    assert reference.returncode == first.returncode == resumed.returncode == 0, first.stderr + resumed.stderr
    _assert_same(_history(tmp_path / "ref.json"), _history(tmp_path / "resumed.json"))
    first = _train(1, *options, "--epochs", "2", "--checkpoint", "one.ckpt", cwd=tmp_path)
    resumed = _train(2, *options, "--epochs", "3", "--resume", "one.ckpt", "--json", "resumed2.json", cwd=tmp_path)
    assert first.returncode == resumed.returncode == 0, resumed.stderr
    _assert_same(_history(tmp_path / "ref.json"), _history(tmp_path / "resumed2.json"))


@needs_mpi
def test_hbp_blocks_on_two_ranks_equal_one_process():
    """Every curvature and approximation, an MLP and a CNN, uneven shards and a batch smaller than the
    ranks: the blocks the generated code sums over the ranks as it forms each batch mean (through a PSD
    cast, (7)'s product of means and 6-kfac's factors alike) equal one process's to 1e-10."""
    script = Path(__file__).parent / "mpi_hbp_blocks.py"
    run = subprocess.run([str(MPIEXEC if MPIEXEC.exists() else shutil.which("mpiexec")), "-n", "2", sys.executable,
                          str(script)], capture_output=True, text=True, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},
                         timeout=600)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr


def test_graphs_on_several_ranks_are_refused_before_any_step():
    from mcalc.train import data as D
    from mcalc.train.network import Network
    from mcalc.train.optimizers import make_optimizer
    from mcalc.train.trainer import train

    net = Network("20-5")
    net.backend = "cupy"  # what graphs need; refused for the ranks before any array is touched
    with pytest.raises(mc.McalcError, match="CUDA graphs run in one process"):
        train(net, D.load_dataset("synthetic"), make_optimizer("sgd"), epochs=1, batch_size=64, graphs=True,
              parallel=DataParallel(_Ranks(2)))


@needs_mpi
def test_a_failing_rank_ends_the_run_with_a_clear_message(tmp_path):
    run = _train(2, "--optimizer", "sgd", "--epochs", "1", "--graphs", cwd=tmp_path)
    assert run.returncode == 2 and "CUDA graphs need the cupy backend" in run.stderr
    assert "Traceback" not in run.stderr
