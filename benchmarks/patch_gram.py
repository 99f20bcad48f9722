"""A convolution's K-FAC input factor Σ ã ãᵀ two ways: syrk of its unfolded patches (``a @ a.T``, the patches
made beforehand, as the forward pass keeps them) against shifted products of its input
(``mcalc/runtime/patch_gram.py``), with what the cost model chooses.

    python benchmarks/patch_gram.py [--batch 64] [--repeats 9] [--dtype float32] [--json OUT]

The windows are 3C3D's three convolutions (the input sizes its poolings leave), a 5 × 5 convolution over
28 × 28, and smaller ones where the model keeps syrk (few channels, few positions, one dimension, stride 2).
Each row: the median of ``--repeats`` after a warm-up, both ways in turn within each repeat, their ratio,
the flops of each, the largest difference relative to the largest entry, and whether ``prefer_shifted``
takes the shifted products. One BLAS thread unless the environment says more.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from machine import describe  # noqa: E402  (benchmarks/machine.py, beside this script)
from side_by_side import timed_in_turn  # noqa: E402

from mcalc.runtime.array_ops import grid, unfold  # noqa: E402
from mcalc.runtime.patch_gram import patch_gram, plan_shifts, prefer_shifted  # noqa: E402

# name, channels, kernel, stride, padding, size
WINDOWS = [
    ("3C3D conv1", 3, (5, 5), (1, 1), (0, 0), (32, 32)),
    ("3C3D conv2", 64, (3, 3), (1, 1), (0, 0), (14, 14)),
    ("3C3D conv3", 96, (3, 3), (1, 1), (1, 1), (6, 6)),
    ("5x5 over 28x28", 64, (5, 5), (1, 1), (2, 2), (28, 28)),
    ("8 channels, 14x14", 8, (3, 3), (1, 1), (0, 0), (14, 14)),
    ("1-D, 32 channels, 20 positions", 32, (5,), (1,), (0,), (20,)),
    ("1-D, 32 channels, 200 positions", 32, (5,), (1,), (2,), (200,)),
    ("stride 2", 64, (3, 3), (2, 2), (1, 1), (14, 14)),
]


def measure(name: str, channels: int, kernel: tuple, stride: tuple, padding: tuple, size: tuple, batch: int,
            repeats: int, dtype: str, rng: np.random.Generator) -> dict:
    """One window's row: both ways timed in turn within each repeat (syrk alone where the stride is not 1)."""
    dims = len(size)
    x = np.maximum(rng.normal(size=(channels, batch, math.prod(size))), 0).astype(dtype)
    patches = unfold(x.reshape(channels, -1), kernel, stride, padding, (1,) * dims, size)
    a = np.concatenate([patches, np.ones((1, patches.shape[1]), dtype=x.dtype)])
    ways = {"syrk": lambda: a @ a.T}
    if all(s == 1 for s in stride):
        ways["shifted"] = lambda: patch_gram(x, kernel, padding, (1,) * dims, size)
    median = timed_in_turn(ways, repeats)
    positions = math.prod(grid(size, kernel, stride, padding, (1,) * dims))
    row = {"window": name, "channels": channels, "kernel": kernel, "stride": stride, "padding": padding,
           "size": size, "batch": batch, "syrk_seconds": median["syrk"],
           "syrk_gflop": a.shape[0] ** 2 * positions * batch / 1e9,
           "chosen": "shifted" if prefer_shifted(channels, batch, kernel, stride, padding, (1,) * dims, size)
           else "syrk"}
    if "shifted" in median:
        plan = plan_shifts(kernel, padding, (1,) * dims, size)
        reference = ways["syrk"]()
        row.update(shifted_seconds=median["shifted"], ratio=median["syrk"] / median["shifted"],
                   shifted_gflop=2 * channels**2 * batch * plan.products() / 1e9,
                   relative_difference=float(np.abs(ways["shifted"]() - reference).max() / np.abs(reference).max()))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    print(f"{'window':34s} {'syrk ms':>8s} {'shifted ms':>10s} {'syrk/shifted':>12s} {'GFLOP syrk':>10s} "
          f"{'GFLOP shifted':>13s} {'rel. diff':>9s}  chosen", flush=True)
    for window in WINDOWS:
        row = measure(*window, args.batch, args.repeats, args.dtype, rng)
        rows.append(row)
        shifted = (f"{row['shifted_seconds'] * 1e3:10.1f} {row['ratio']:12.2f} {row['syrk_gflop']:10.2f} "
                   f"{row['shifted_gflop']:13.2f} {row['relative_difference']:9.1e}") if "ratio" in row else \
            f"{'-':>10s} {'-':>12s} {row['syrk_gflop']:10.2f} {'-':>13s} {'-':>9s}"
        print(f"{row['window']:34s} {row['syrk_seconds'] * 1e3:8.1f} {shifted}  {row['chosen']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": describe(), "dtype": args.dtype, "repeats": args.repeats,
                                               "windows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
