"""One HBP pass of a network of a user's modules against the nearest network of built-in layers, side by side.

    python benchmarks/user_modules.py [--repeats 7] [--passes 20] [--batch 64] [--json OUT]

The user's network is 64-LayerNorm-128-GELU-Residual(h=64)-10 (``examples/layernorm_gelu.py``); the
built-in one has the same widths where it can, 64-128-tanh-64-tanh-128-10 (no LayerNorm, tanh for GELU,
the residual block's two Linear layers without the skip). Each repeat times ``--passes`` backward passes with
Gauss–Newton blocks of every parameter, both networks in turn; medians are compared (PCH-abs would cast
the residual block's W₁ block, 8192 × 8192, by a dense eigen-decomposition: 100 s a pass). The user's
network runs
under 6-kfac: under (6) its residual block's W₁ block is the dense batch mean of per-sample Kronecker
products, 8192 × 8192 (512 MiB, one product over the samples each pass). For the built-in network the two
approximations are the same code. Also reports whether any generated function loops over the batch.
glibc's malloc thresholds are fixed first, as ``mcalc`` does (``mcalc/runtime/allocator.py``).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from machine import describe  # noqa: E402  (benchmarks/machine.py, beside this script)

USER = "64-LayerNorm-128-GELU-Residual(h=64)-10"
BUILT_IN = "64-128-tanh-64-tanh-128-10"
CURVATURE = "ggn"  # PCH-abs casts the residual block's W₁ block (8192 × 8192) by a dense eigh: 100 s a pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--passes", type=int, default=20, help="passes per repeat (a pass takes about a ms)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--json")
    args = parser.parse_args()

    from mcalc.codegen.store import code_path, load_code
    from mcalc.runtime.allocator import keep_freed_memory
    from mcalc.train.network import Network
    from mcalc.user_modules import load_modules

    fixed = keep_freed_memory()  # as `mcalc train` runs: else the timings depend on the process's history

    modules = load_modules(ROOT / "examples" / "layernorm_gelu.py")
    code = {m.name: load_code(m, "numpy") for m in modules}
    loops = [m.name for m in modules if "for i in range" in code_path(m, "numpy").read_text()]
    nets = {"user modules": Network(USER, code=code), "built-in": Network(BUILT_IN)}
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(64, args.batch)), np.eye(10)[:, rng.integers(0, 10, args.batch)]
    contenders = {"user modules (6-kfac)": (nets["user modules"], "6-kfac"), "built-in (6)": (nets["built-in"], "6")}
    for net, a in contenders.values():  # first calls: imports, caches
        net.backward(X, Y, CURVATURE, a)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for repeat in range(args.repeats):
        for name, (net, a) in contenders.items():
            start = time.perf_counter()
            for _ in range(args.passes):
                net.backward(X, Y, CURVATURE, a)
            times[name].append((time.perf_counter() - start) / args.passes)
        print(f"[{repeat + 1}/{args.repeats}] " + ", ".join(f"{n} {t[-1] * 1e3:.1f} ms" for n, t in times.items()),
              flush=True)
    medians = {name: statistics.median(t) for name, t in times.items()}
    ratio = medians["user modules (6-kfac)"] / medians["built-in (6)"]
    print(f"{USER} against {BUILT_IN}, batch {args.batch}, {CURVATURE} blocks of every parameter:")
    for name, value in medians.items():
        print(f"  {name:28s} {value * 1e3:8.1f} ms")
    print(f"  user / built-in: {ratio:.2f}×")
    print(f"  generated functions that loop over the batch in Python: {loops or 'none'}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "user": USER, "built_in": BUILT_IN, "batch": args.batch, "repeats": args.repeats, "passes": args.passes,
            "median_seconds": medians, "ratio": ratio, "python_batch_loops": loops,
            "malloc_thresholds_fixed": fixed,
            "machine": describe(), "python": platform.python_version(),
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()
