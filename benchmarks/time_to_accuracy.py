"""Epochs and wall-clock seconds for each optimiser to reach a test accuracy on digits, median over seeds.

    python benchmarks/time_to_accuracy.py [--target 0.97] [--seeds 11] [--json OUT] [--plot OUT.png]

Every optimiser trains the same network (64-128-sigmoid-10, cross-entropy; the
batch sizes of ``mcalc demo``) on scikit-learn's bundled digits, each seed with its
own initialisation and train/test split; hbp-newton runs twice, with its default
solver (chosen by the cost model) and with the paper's CG on every step. A run that
never reaches the target counts as infinitely long, so the median is over all seeds
(the median of a censored time). Within each seed every optimiser runs in turn;
printed as ratios to SGD, measured side by side.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mcalc.cli import DEMO_RUNS  # noqa: E402
from mcalc.train.data import digits  # noqa: E402
from mcalc.train.network import Network  # noqa: E402
from mcalc.train.optimizers import make_optimizer  # noqa: E402
from mcalc.train.trainer import plot, train  # noqa: E402

RUNS = [(name, name, options, batch) for name, options, batch in DEMO_RUNS]
RUNS.insert(3, ("hbp-newton (CG)", "hbp-newton", {"solver": "cg"}, 64))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.97)
    parser.add_argument("--seeds", type=int, default=11)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--json")
    parser.add_argument("--plot")
    args = parser.parse_args()
    first_runs = []
    epochs: dict[str, list[float]] = {label: [] for label, *_ in RUNS}
    seconds: dict[str, list[float]] = {label: [] for label, *_ in RUNS}
    for seed in range(args.seeds):  # every optimiser in turn within a seed: drift of the machine hits all alike
        for label, name, options, batch in RUNS:
            net = Network("64-128-sigmoid-10", seed=seed)
            extra = {"seed": seed} if name == "kfac" else {}
            result = train(net, digits(seed), make_optimizer(name, **options, **extra), epochs=args.epochs,
                           batch_size=batch, seed=seed, name=label)
            if seed == 0:
                first_runs.append(result)
            reached = next((r for r in result["history"] if r["test_accuracy"] >= args.target), None)
            epochs[label].append(reached["epoch"] if reached else math.inf)
            seconds[label].append(reached["wall_s"] if reached else math.inf)
    finite = lambda x: x if math.isfinite(x) else None  # noqa: E731  (JSON has no infinity)
    summary = {label: {
        "reached": sum(math.isfinite(e) for e in epochs[label]),
        "runs": args.seeds,
        "median_epochs": finite(statistics.median(epochs[label])),
        "median_seconds": finite(statistics.median(seconds[label])),
        "seconds_per_epoch": statistics.median(s / e for s, e in zip(seconds[label], epochs[label])
                                               if math.isfinite(e)) if any(map(math.isfinite, epochs[label]))
        else None,
    } for label, *_ in RUNS}
    sgd = summary["sgd"]
    print(f"digits, 64-128-sigmoid-10, target test accuracy {args.target:.0%}, {args.seeds} seeds, "
          f"at most {args.epochs} epochs (median over all seeds; a run that never reaches it counts as ∞)")
    print(f"{'optimizer':<16} {'reached':>8} {'epochs':>7} {'seconds':>8} {'s/epoch':>8} {'epochs/SGD':>11} "
          f"{'seconds/SGD':>12}")
    for label, row in summary.items():
        if row["median_epochs"] is None:
            print(f"{label:<16} {row['reached']:>4}/{row['runs']:<3} {'∞':>7} {'∞':>8}")
            continue
        ratio_e = row["median_epochs"] / sgd["median_epochs"] if sgd["median_epochs"] else float("nan")
        ratio_s = row["median_seconds"] / sgd["median_seconds"] if sgd["median_seconds"] else float("nan")
        print(f"{label:<16} {row['reached']:>4}/{row['runs']:<3} {row['median_epochs']:>7.1f} "
              f"{row['median_seconds']:>8.2f} {row['seconds_per_epoch']:>8.3f} {ratio_e:>11.2f} {ratio_s:>12.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "machine": f"{platform.node()}, {os.cpu_count()} CPU cores", "target": args.target,
            "summary": summary}, indent=2))
    if args.plot:
        plot(first_runs, args.plot)


if __name__ == "__main__":
    main()
