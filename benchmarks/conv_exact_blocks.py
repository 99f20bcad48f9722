"""One Gauss–Newton HBP pass under (6), the exact batch means, of two convolutional networks: its time and the
process's peak memory, or the refusal of a block too large to compute; and, beside it, one pass under 6-kfac.

    python benchmarks/conv_exact_blocks.py CASE [--repeats 3] [--batch 64] [--json OUT]

CASE is ``mnist1d`` (Greydanus' ConvBase, ``examples/mnist1d_cnn.py``'s network) or ``digits`` (the README's
``1x8x8-conv(16,3,pad=1)-relu-maxpool(2)-conv(32,3,pad=1)-relu-flatten-10``); one case a process, since the
peak memory is the process's. A convolution's weight block under (6) is E[(Uᵢ ⊗ I) 𝓗z (Uᵢᵀ ⊗ I)] over
the per-sample patches Uᵢ, a batch mean with no closed form (a per-sample program). The median of
``--repeats`` passes after a warm-up (the first generates and compiles), one BLAS thread unless the
environment says more; glibc's malloc thresholds are fixed first, as ``mcalc`` does.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from machine import describe  # noqa: E402  (benchmarks/machine.py, beside this script)

CASES = {"mnist1d": ("1x40-conv(25,5,stride=2,pad=1)-relu-conv(25,3,stride=2,pad=1)-relu-conv(25,3,stride=2,pad=1)"
                     "-relu-flatten-10", 40),
         "digits": ("1x8x8-conv(16,3,pad=1)-relu-maxpool(2)-conv(32,3,pad=1)-relu-flatten-10", 64)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case", choices=sorted(CASES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--json")
    args = parser.parse_args()

    from mcalc.errors import McalcError
    from mcalc.runtime.allocator import keep_freed_memory
    from mcalc.train.network import Network

    fixed = keep_freed_memory()
    spec, features = CASES[args.case]
    net, rng = Network(spec, seed=0), np.random.default_rng(0)
    X, Y = rng.normal(size=(features, args.batch)), np.eye(10)[:, rng.integers(0, 10, args.batch)]
    result: dict = {"case": args.case, "spec": spec, "batch": args.batch}

    def median_seconds(approximation: str) -> float:
        net.backward(X, Y, "ggn", approximation)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            net.backward(X, Y, "ggn", approximation)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    result["median_seconds_6_kfac"] = median_seconds("6-kfac")
    print(f"{args.case}: one GGN pass under 6-kfac in {result['median_seconds_6_kfac']:.3f} s ({spec})", flush=True)
    try:
        result["median_seconds"] = median_seconds("6")
        print(f"{args.case}: one GGN pass under (6) in {result['median_seconds']:.3f} s", flush=True)
    except McalcError as error:
        result["refused"] = str(error)
        print(f"{args.case}: refused: {error}", flush=True)
    result["peak_memory_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(f"{args.case}: peak memory of the process {result['peak_memory_mib']:.0f} MiB", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({
            **result, "repeats": args.repeats, "threads": os.environ.get("OPENBLAS_NUM_THREADS", "default"),
            "malloc_thresholds_fixed": fixed, "machine": describe()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
