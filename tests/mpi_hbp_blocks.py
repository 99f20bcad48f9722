"""Run by test_distributed under `mpiexec -n 2`: every rank's HBP blocks, loss and gradients on its shard
of a batch, summed over the ranks by the generated code, against one process on the whole batch.

Each rank computes the one-process reference itself (a network with no ranks), so the comparison needs
no communication beyond what is tested. Rank 0 prints one line per case and "ok" at the end.
"""
import sys

import numpy as np
from mpi4py import MPI

from mcalc.modes import APPROXIMATIONS, CURVATURES
from mcalc.train.distributed import DataParallel, MPICommunicator
from mcalc.train.network import Network

NETWORKS = [  # an MLP (every activation's concave term), module by module and linked into one program; a CNN
    ("12-10-sigmoid-9-relu-8-tanh-5", False),  # (shared weights, per-sample fallbacks, pooling)
    ("12-10-sigmoid-9-relu-8-tanh-5", True),
    ("1x12-conv(3,3,pad=1)-tanh-maxpool(2)-conv(2,3)-softplus-flatten-5", False),
]


def main() -> None:
    comm = MPI.COMM_WORLD
    rng = np.random.default_rng(0)
    if comm.Get_rank() != 0:  # the first rank compiles the convolutions into the cache, then the others read it
        comm.Barrier()
    nets = [(Network(spec, seed=1, linked=linked), Network(spec, seed=1)) for spec, linked in NETWORKS]
    if comm.Get_rank() == 0:
        comm.Barrier()
    checked = 0
    for (sharded, whole), (spec, linked) in zip(nets, NETWORKS):
        sharded.parallel = DataParallel(MPICommunicator())
        for batch in (7, 1):  # shards of 4 and 3; a batch smaller than the ranks is every rank's whole
            X = rng.normal(size=(whole.widths[0], batch))
            Y = np.eye(5)[:, rng.integers(0, 5, size=batch)]
            mine = sharded.parallel.shard(np.arange(batch))
            for curvature in CURVATURES:
                for approximation in APPROXIMATIONS:
                    loss, grads, blocks = sharded.backward(X[:, mine], Y[:, mine], curvature, approximation)
                    loss1, grads1, blocks1 = whole.backward(X, Y, curvature, approximation)
                    worst = abs(loss - loss1) / abs(loss1)
                    for name in whole.params:
                        scale = np.abs(grads1[name]).max()
                        worst = max(worst, np.abs(grads[name] - grads1[name]).max() / scale)
                        dense, dense1 = blocks[name].to_dense(), blocks1[name].to_dense()
                        assert np.abs(dense1).max() > 0, (spec, curvature, approximation, name)  # not vacuous
                        worst = max(worst, np.abs(dense - dense1).max() / np.abs(dense1).max())
                    if worst > 1e-10:
                        print(f"rank {comm.Get_rank()}: {spec} B={batch} {curvature.value} ({approximation.value}) "
                              f"differs by {worst:.1e}", flush=True)
                        comm.Abort(1)
                    checked += 1
        if comm.Get_rank() == 0:
            print(f"{spec}{' linked' if linked else ''}: every block, loss and gradient equal ({checked} cases)",
                  flush=True)
    if comm.Get_rank() == 0:
        print("ok")
    sys.exit(0)


if __name__ == "__main__":
    main()
