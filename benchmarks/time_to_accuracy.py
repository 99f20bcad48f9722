"""Epochs and wall-clock seconds for each optimiser to reach a test accuracy on digits, median over seeds.

    python benchmarks/time_to_accuracy.py [--target 0.97] [--seeds 5] [--json OUT] [--plot OUT.png]

Every optimiser trains the same network (64-128-sigmoid-10, cross-entropy; the
batch sizes of ``mcalc demo``) on scikit-learn's bundled digits; a run that
never reaches the target counts as not reached. Within each seed every
optimiser runs in turn; printed as ratios to SGD, measured side by side.
"""
from __future__ import annotations

import argparse
import json
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.97)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--json")
    parser.add_argument("--plot")
    args = parser.parse_args()
    first_runs = []
    epochs: dict[str, list[int]] = {name: [] for name, _, _ in DEMO_RUNS}
    seconds: dict[str, list[float]] = {name: [] for name, _, _ in DEMO_RUNS}
    for seed in range(args.seeds):  # every optimiser in turn within a seed: drift of the machine hits all alike
        for name, options, batch in DEMO_RUNS:
            net = Network("64-128-sigmoid-10", seed=seed)
            extra = {"seed": seed} if name == "kfac" else {}
            result = train(net, digits(seed), make_optimizer(name, **options, **extra), epochs=args.epochs,
                           batch_size=batch, seed=seed, name=name)
            if seed == 0:
                first_runs.append(result)
            reached = next((r for r in result["history"] if r["test_accuracy"] >= args.target), None)
            if reached:
                epochs[name].append(reached["epoch"])
                seconds[name].append(reached["wall_s"])
    summary = {name: {
        "reached": len(epochs[name]),
        "runs": args.seeds,
        "median_epochs": statistics.median(epochs[name]) if epochs[name] else None,
        "median_seconds": statistics.median(seconds[name]) if seconds[name] else None,
    } for name, _, _ in DEMO_RUNS}
    sgd = summary["sgd"]
    print(f"digits, 64-128-sigmoid-10, target test accuracy {args.target:.0%}, {args.seeds} seeds, "
          f"at most {args.epochs} epochs")
    print(f"{'optimizer':<12} {'reached':>8} {'epochs':>7} {'seconds':>8} {'epochs/SGD':>11} {'seconds/SGD':>12}")
    for name, row in summary.items():
        if row["median_epochs"] is None:
            print(f"{name:<12} {row['reached']:>4}/{row['runs']:<3} {'-':>7} {'-':>8}")
            continue
        ratio_e = row["median_epochs"] / sgd["median_epochs"] if sgd["median_epochs"] else float("nan")
        ratio_s = row["median_seconds"] / sgd["median_seconds"] if sgd["median_seconds"] else float("nan")
        print(f"{name:<12} {row['reached']:>4}/{row['runs']:<3} {row['median_epochs']:>7.1f} "
              f"{row['median_seconds']:>8.2f} {ratio_e:>11.2f} {ratio_s:>12.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "machine": f"{platform.node()}, {os.cpu_count()} CPU cores", "target": args.target,
            "summary": summary}, indent=2))
    if args.plot:
        plot(first_runs, args.plot)


if __name__ == "__main__":
    main()
