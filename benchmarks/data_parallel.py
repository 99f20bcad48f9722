"""What data parallelism over MPI communicates and costs, per optimiser: bytes all-reduced per step
against gradient-only data parallelism, and seconds per step on 1 and 2 ranks.

    python benchmarks/data_parallel.py [--optimizers sgd adam kfac kbfgs hf-gn hf-newton hbp-newton] [--steps 15]
                                       [--batch 256] [--json OUT] [--plot OUT.png]

Each optimiser trains 40-100-relu-100-relu-10 on MNIST-1D for ``--steps`` steps of the global batch, once
in one process and once under ``mpiexec -n 2`` (this script, as its own worker), at its defaults, one
BLAS thread per rank. The buffers every rank all-reduces are counted by :class:`DataParallel`; gradient-only
data parallelism all-reduces the parameters' size once a step. From the measured volumes, the
bandwidth term of a ring all-reduce, 2(p − 1)/p · bytes / busbw, is modelled for 8 GPUs in one node
(NVLink, nccl-tests' bus bandwidth of 460 GB/s on 8 × H100 SXM, docs.alayanew.com's reference table) and
64 over InfiniBand NDR (50 GB/s, one 400 Gb/s NIC per GPU); messages this small are latency-bound, so the
count of all-reduces per step is reported beside it, and one all-reduce's latency measured here (MPI
over shared memory, 2 ranks) for scale.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from machine import describe  # noqa: E402  (benchmarks/machine.py, beside this script)

SPEC = "40-100-relu-100-relu-10"
BUSBW = {"8 GPUs, NVLink (460 GB/s)": (8, 460e9), "64 GPUs, IB NDR (50 GB/s)": (64, 50e9)}


def worker(optimizer: str, steps: int, batch: int) -> dict:
    """One run on this process's rank: seconds and all-reduces per step, as rank 0 reports them."""
    import numpy as np

    from mcalc.train.data import load_dataset
    from mcalc.train.distributed import DataParallel, communicator
    from mcalc.train.network import Network
    from mcalc.train.optimizers import make_optimizer
    from mcalc.train.trainer import train

    data = load_dataset("mnist1d")
    keep = steps * batch  # exactly ``steps`` steps in one epoch
    data = dataclasses.replace(data, x_train=data.x_train[:keep], y_train=data.y_train[:keep])
    parallel = DataParallel(communicator())
    net = Network(SPEC, seed=0)
    start = time.perf_counter()
    train(net, data, make_optimizer(optimizer), epochs=1, batch_size=batch, seed=0, parallel=parallel)
    seconds = time.perf_counter() - start
    latency = None
    if parallel.comm.size > 1:  # one small all-reduce's round trip, for scale
        probe = np.zeros(16)
        for _ in range(10):
            parallel.comm.allreduce(probe)
        begin = time.perf_counter()
        for _ in range(200):
            parallel.comm.allreduce(probe)
        latency = (time.perf_counter() - begin) / 200
    params = sum(v.size for v in net.params.values())
    return {"optimizer": optimizer, "ranks": parallel.comm.size, "seconds_per_step": seconds / steps,
            "reductions_per_step": parallel.reductions / steps, "bytes_per_step": parallel.communicated / steps,
            "gradient_only_bytes_per_step": 8 * (params + 2), "allreduce_latency_s": latency}


def run(ranks: int, optimizer: str, steps: int, batch: int) -> dict:
    command = [sys.executable, __file__, "--worker", optimizer, "--steps", str(steps), "--batch", str(batch)]
    if ranks > 1:
        command = [str(Path(sys.executable).parent / "mpiexec"), "-n", str(ranks), *command]
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizers", nargs="+",
                        default=["sgd", "adam", "kfac", "kbfgs", "hf-gn", "hf-newton", "hbp-newton"])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--worker")
    parser.add_argument("--json")
    parser.add_argument("--plot")
    args = parser.parse_args()
    if args.worker:
        result = worker(args.worker, args.steps, args.batch)
        from mcalc.train.distributed import communicator

        if communicator().rank == 0:
            print(json.dumps(result), flush=True)
        return
    rows = []
    print(f"{SPEC} on MNIST-1D, global batch {args.batch}, {args.steps} steps, one BLAS thread per rank")
    print(f"{'optimiser':<10} {'s/step 1 rank':>13} {'s/step 2 ranks':>14} {'all-reduces':>11} {'KiB/step':>9} "
          f"{'× gradient-only':>15}  " + "  ".join(f"{name:>26}" for name in BUSBW))
    for optimizer in args.optimizers:
        one, two = run(1, optimizer, args.steps, args.batch), run(2, optimizer, args.steps, args.batch)
        model = {name: 2 * (p - 1) / p * two["bytes_per_step"] / bandwidth for name, (p, bandwidth) in BUSBW.items()}
        rows.append({"one_rank": one, "two_ranks": two, "modelled_bandwidth_seconds_per_step": model})
        print(f"{optimizer:<10} {one['seconds_per_step']:>13.4f} {two['seconds_per_step']:>14.4f} "
              f"{two['reductions_per_step']:>11.1f} {two['bytes_per_step'] / 1024:>9.1f} "
              f"{two['bytes_per_step'] / two['gradient_only_bytes_per_step']:>15.2f}  "
              + "  ".join(f"{seconds * 1e6:>23.2f} µs" for seconds in model.values()), flush=True)
    latency = rows[0]["two_ranks"]["allreduce_latency_s"]
    print(f"one small all-reduce here (MPICH, 2 ranks, shared memory): {latency * 1e6:.1f} µs")
    if args.plot:
        plot(rows, args.plot)
    if args.json:
        Path(args.json).write_text(json.dumps({"spec": SPEC, "batch": args.batch, "steps": args.steps,
                                               "busbw": BUSBW, "rows": rows,
                                               "machine": describe()},
                                              indent=2))


def plot(rows: list[dict], path: str) -> None:
    """Bytes all-reduced per step against gradient-only, and seconds per step on 1 and 2 ranks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [r["two_ranks"]["optimizer"] for r in rows]
    x = np.arange(len(names))
    fig, (volume, speed) = plt.subplots(1, 2, figsize=(11, 3.8))
    volume.bar(x, [r["two_ranks"]["bytes_per_step"] / 1024 for r in rows], color="tab:blue")
    volume.axhline(rows[0]["two_ranks"]["gradient_only_bytes_per_step"] / 1024, color="gray", linestyle="--",
                   label="gradient-only")
    volume.set(xticks=x, xticklabels=names, ylabel="KiB all-reduced per step", title="communication")
    volume.legend()
    for offset, key, label in ((-0.2, "one_rank", "1 rank"), (0.2, "two_ranks", "2 ranks")):
        speed.bar(x + offset, [r[key]["seconds_per_step"] * 1e3 for r in rows], width=0.4, label=label)
    speed.set(xticks=x, xticklabels=names, ylabel="ms per step", title="time (2-core machine)")
    speed.legend()
    fig.suptitle(f"{SPEC} on MNIST-1D, data parallel over MPI")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
