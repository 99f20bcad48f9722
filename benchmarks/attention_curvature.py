"""The curvature of attention networks: one HBP pass and one K-FAC step, timed.

    python benchmarks/attention_curvature.py [--repeats 5] [--batch 64] [--json OUT]

Attention's parameter and input blocks have no closed batch form: each is a batch mean of per-sample
products E[Jᵢᵀ 𝓗z Jᵢ] through the softmax of its T × T scores, computed by a per-sample program over the
whole batch (:class:`mcalc.expr.BatchMean`). Five cases, each at batch 64, one BLAS thread unless the
environment says more, medians of ``--repeats`` after a warm-up (the first call generates and compiles):

- one backward pass with hbp-newton's curvature request (PCH-abs blocks, batch rule ``auto``) of
  ``1x20-conv(4,3,pad=1)-tanh-attention(4)-relu-flatten-5`` (attention over 20 positions), of the
  same network with ``avgpool(2)`` before the attention (10 positions), of
  ``1x8x8-conv(8,3,pad=1)-relu-attention(4)-flatten-10`` (digits' 8 × 8 images: 64 positions), and of the
  README's MNIST-1D example ``1x40-conv(16,5,pad=2)-relu-avgpool(2)-attention(8)-relu-flatten-10``
  (16 channels, h = 8, 20 positions);
- one kfac step (its defaults; the attention's parameters stepped by their 6-kfac HBP blocks) of
  ``1x40-conv(8,5,pad=2)-relu-maxpool(2)-attention(4)-flatten-10``, loss and gradients included.

glibc's malloc thresholds are fixed first, as ``mcalc`` does (``mcalc/runtime/allocator.py``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from machine import describe  # noqa: E402  (benchmarks/machine.py, beside this script)

PASSES = {"attention over 20 positions": "1x20-conv(4,3,pad=1)-tanh-attention(4)-relu-flatten-5",
          "attention over 10 positions": "1x20-conv(4,3,pad=1)-tanh-avgpool(2)-attention(4)-relu-flatten-5",
          "attention over 64 positions": "1x8x8-conv(8,3,pad=1)-relu-attention(4)-flatten-10",
          "attention of 16 channels, h = 8": "1x40-conv(16,5,pad=2)-relu-avgpool(2)-attention(8)-relu-flatten-10"}
KFAC = "1x40-conv(8,5,pad=2)-relu-maxpool(2)-attention(4)-flatten-10"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--json")
    args = parser.parse_args()

    from mcalc.runtime.allocator import keep_freed_memory
    from mcalc.train.network import Network
    from mcalc.train.optimizers import make_optimizer

    fixed = keep_freed_memory()
    rng = np.random.default_rng(0)
    request = make_optimizer("hbp-newton").curvature_request()

    def data(spec: str) -> tuple[np.ndarray, np.ndarray]:
        size = int(np.prod([int(n) for n in spec.split("-")[0].split("x")]))
        classes = int(spec.rsplit("-", 1)[1])
        return rng.normal(size=(size, args.batch)), np.eye(classes)[:, rng.integers(0, classes, args.batch)]

    cases = {}
    for name, spec in PASSES.items():
        net, (X, Y) = Network(spec, seed=0), data(spec)
        cases[f"HBP pass, {name}"] = (spec, lambda net=net, X=X, Y=Y: net.backward(X, Y, *request))

    net, (X, Y) = Network(KFAC, seed=0), data(KFAC)
    kfac = make_optimizer("kfac")
    kfac.prepare(net, X)

    def kfac_step() -> None:
        _, grads, blocks = net.backward(X, Y, *kfac.curvature_request())
        net.params = net.params_plus(kfac.step(net, grads, blocks, (X, Y)))

    cases["kfac step"] = (KFAC, kfac_step)
    medians = {}
    for name, (spec, run) in cases.items():
        run()  # generation, compilation, caches
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        medians[name] = statistics.median(times)
        print(f"{name:40s} {medians[name]:8.3f} s   ({spec})", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "cases": {name: {"spec": spec, "median_seconds": medians[name]} for name, (spec, _) in cases.items()},
            "batch": args.batch, "repeats": args.repeats, "threads": os.environ.get("OPENBLAS_NUM_THREADS", "default"),
            "malloc_thresholds_fixed": fixed,
            "machine": describe(), "python": platform.python_version(),
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()
