"""Seconds per training step of HBP-Newton on the HBP paper's network, each backward pass called from Python
("eager") or replayed as a CUDA graph, side by side.

    python benchmarks/train_step.py --device cuda [--steps N] [--json OUT]
    python benchmarks/train_step.py --device cpu [--steps N] [--json OUT]

Network 3072-1024-512-256-128-64-32-16-10 with sigmoids, cross-entropy, batch 500,
float32, on random data (a step costs the same whatever the values). Each run is
``mcalc.train.trainer.train`` for two epochs of ``--steps`` steps each, and a step's
time is the second epoch's seconds over its steps: the first epoch pays for compiling
kernels, capturing graphs and the solver's first decompositions. The solvers: the
paper's CG on every step, and averaged eigenbases renewed every 5 steps (the steps
in between need no curvature, so they replay a graph without HBP). On the CPU the
NumPy backend runs eagerly only; on CUDA the CuPy backend runs both ways, in turn.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from machine import describe  # noqa: E402  (benchmarks/machine.py, beside this script)

from mcalc.train.data import Dataset  # noqa: E402
from mcalc.train.network import Network  # noqa: E402
from mcalc.train.optimizers import HBPNewton  # noqa: E402
from mcalc.train.trainer import train  # noqa: E402

SIZES = [3072, 1024, 512, 256, 128, 64, 32, 16, 10]
BATCH = 500
SOLVERS = {"cg": {"solver": "cg"}, "eigen": {"solver": "eigen", "refresh": 5}}


def spec(sizes: list[int]) -> str:
    return "-".join([str(sizes[0]), *[f"{w}-sigmoid" for w in sizes[1:-1]], str(sizes[-1])])


def seconds_per_step(sizes: list[int], batch: int, steps: int, backend: str, solver: str, graphs: bool) -> float:
    rng = np.random.default_rng(0)
    data = Dataset("random", rng.normal(size=(steps * batch, sizes[0])).astype(np.float32),
                   rng.integers(0, sizes[-1], steps * batch), rng.normal(size=(2, sizes[0])).astype(np.float32),
                   np.arange(2) % sizes[-1])
    data.y_train[:sizes[-1]] = np.arange(sizes[-1])  # every class present: the data say how many there are
    net = Network(spec(sizes), backend=backend, dtype=np.float32)
    history = train(net, data, HBPNewton(**SOLVERS[solver]), epochs=2, batch_size=batch, graphs=graphs)["history"]
    return (history[1]["wall_s"] - history[0]["wall_s"]) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, default=20, help="steps per epoch (a multiple of the refresh, 5)")
    parser.add_argument("--sizes", default="-".join(map(str, SIZES)), help="widths, e.g. 64-32-10 (a check)")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    sizes = [int(w) for w in args.sizes.split("-")]
    backend = "cupy" if args.device == "cuda" else "numpy"
    variants = [False, True] if backend == "cupy" else [False]
    seconds = {f"{solver} {'graph' if graphs else 'eager'}": seconds_per_step(sizes, args.batch, args.steps,
                                                                              backend, solver, graphs)
               for solver in SOLVERS for graphs in variants}
    print(f"HBP-Newton steps, network {args.sizes}, batch {args.batch}, float32, {backend} backend:")
    for name, s in seconds.items():
        print(f"  {name:<12} {s * 1e3:8.2f} ms per step")
    ratios = {f"{solver}: eager / graph": seconds[f"{solver} eager"] / seconds[f"{solver} graph"]
              for solver in SOLVERS if len(variants) == 2}
    for name, r in ratios.items():
        print(f"  {name:<24} {r:5.2f}×")
    if args.json:
        gpu = None
        if backend == "cupy":
            import cupy

            gpu = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
        machine = describe(gpu)
        Path(args.json).write_text(json.dumps({"machine": machine, "network": args.sizes, "batch": args.batch,
                                               "seconds_per_step": seconds, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
