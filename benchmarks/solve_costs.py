"""Measure the constants of the block solvers' cost model (``mcalc.train.block_solvers.COSTS``).

    python benchmarks/solve_costs.py [--device cpu|cuda] [--json OUT]

The cost model charges everything in flops of the backend's matrix product:

- ``eigh``: ``xp.linalg.eigh`` of an n × n symmetric matrix, divided by n³ flops at the
  GEMM rate (n = 64 … 1024, the factor sizes of the networks trained);
- ``dispatch``: the time of one small array operation (an axpy on 100 numbers), times
  the GEMM rate.

The GEMM rate is that of a 1024 × 1024 float32 product on the same device.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from machine import describe  # benchmarks/machine.py, beside this script

SIZES = [64, 128, 256, 512, 1024]


def median_seconds(run: Callable[[], Any], sync: Callable[[], None], repeats: int) -> float:
    """Median wall time of ``run`` (after one warm-up), the device synchronised around each call."""
    run()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(xp: Any, sync: Callable[[], None]) -> dict:
    """GEMM rate, eigh in n³ GEMM flops per size, and one dispatch in GEMM flops."""
    rng = np.random.default_rng(0)
    a = xp.asarray(rng.standard_normal((1024, 1024)), dtype=xp.float32)
    gemm_rate = 2 * 1024**3 / median_seconds(lambda: a @ a, sync, 50)
    eigh = {}
    for n in SIZES:
        g = rng.standard_normal((n, 2 * n))
        spd = xp.asarray(g @ g.T / n, dtype=xp.float32)
        eigh[n] = median_seconds(lambda s=spd: xp.linalg.eigh(s), sync, 5 if n >= 512 else 15) * gemm_rate / n**3
    small = xp.ones(100, dtype=xp.float32)
    count = 1000
    per_op = median_seconds(lambda: [small + 0.5 * small for _ in range(count // 2)], sync, 9) / count
    return {"gemm_flops_per_second": gemm_rate, "eigh_in_n3_gemm_flops": eigh,
            "dispatch_seconds": per_op, "dispatch_in_gemm_flops": per_op * gemm_rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    if args.device == "cuda":
        import cupy as xp

        sync = xp.cuda.Device().synchronize
        machine = xp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    else:
        xp, sync, machine = np, (lambda: None), describe()
    result = {"machine": machine, "device": args.device, **measure(xp, sync)}
    print(f"{machine} ({args.device}): GEMM {result['gemm_flops_per_second'] / 1e12:.2f} TFLOP/s")
    for n, c in result["eigh_in_n3_gemm_flops"].items():
        print(f"  eigh n = {n:<5} {c:8.1f} n³ GEMM flops")
    print(f"  one small operation {result['dispatch_seconds'] * 1e6:.1f} µs = "
          f"{result['dispatch_in_gemm_flops']:.2e} GEMM flops")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
