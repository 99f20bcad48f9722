"""Epochs and wall-clock seconds for each optimiser to reach a test accuracy, median over seeds.

    python benchmarks/time_to_accuracy.py [--target 0.97] [--seeds 11] [--json OUT] [--plot OUT.png]
        [--data digits] [--model 64-128-sigmoid-10] [--baseline sgd] [--only LABEL ...]

Every optimiser trains the same network (by default 64-128-sigmoid-10, cross-entropy;
the batch sizes of ``mcalc demo``) on a data set (by default scikit-learn's bundled
digits), each seed with its own initialisation (and, for digits, train/test split);
hbp-newton runs three times, with its default solver (the paper's CG on every step), with
``auto`` (eigenbases where they are cheaper and as safe as CG) and with ``eigen`` (eigenbases
throughout); ``adam (lr 1e-2, batch 100)``, Adam as MNIST-1D's published MLP was trained, runs
when ``--only`` or ``--baseline`` names it. A run that
never reaches the target counts as infinitely long, so the median is over all seeds
(the median of a censored time). Within each seed every optimiser runs in turn;
printed as ratios to ``--baseline``, measured side by side; a line per run as it ends.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from machine import describe  # noqa: E402  (benchmarks/machine.py, beside this script)

from mcalc.cli import DEMO_RUNS  # noqa: E402
from mcalc.runtime.allocator import keep_freed_memory  # noqa: E402
from mcalc.train.data import load_dataset  # noqa: E402
from mcalc.train.network import Network  # noqa: E402
from mcalc.train.optimizers import make_optimizer  # noqa: E402
from mcalc.train.trainer import plot, train  # noqa: E402

RUNS = [(name, name, options, batch) for name, options, batch in DEMO_RUNS]
RUNS.insert(3, ("hbp-newton (auto)", "hbp-newton", {"solver": "auto"}, 64))
RUNS.insert(4, ("hbp-newton (eigen)", "hbp-newton", {"solver": "eigen"}, 64))
# Adam as MNIST-1D's published MLP was trained (Greydanus 2020, ``get_model_args``: lr 10⁻², batch 100):
# run only when named by --only or --baseline
PUBLISHED_ADAM = ("adam (lr 1e-2, batch 100)", "adam", {"lr": 1e-2}, 100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.97)
    parser.add_argument("--seeds", type=int, default=11)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--data", default="digits")
    parser.add_argument("--model", default="64-128-sigmoid-10")
    parser.add_argument("--baseline", default="sgd", help="the run the ratios are to")
    parser.add_argument("--only", nargs="+", help="these runs only (labels)")
    parser.add_argument("--json")
    parser.add_argument("--plot")
    args = parser.parse_args()
    keep_freed_memory()  # as `mcalc train` runs
    named = set(args.only or ()) | {args.baseline}
    runs = [run for run in RUNS if not args.only or run[0] in named]
    runs += [PUBLISHED_ADAM] if PUBLISHED_ADAM[0] in named else []
    first_runs = []
    epochs: dict[str, list[float]] = {label: [] for label, *_ in runs}
    seconds: dict[str, list[float]] = {label: [] for label, *_ in runs}
    for seed in range(args.seeds):  # every optimiser in turn within a seed: drift of the machine hits all alike
        data = load_dataset(args.data, seed=seed)
        for label, name, options, batch in runs:
            net = Network(args.model, seed=seed)
            extra = {"seed": seed} if name == "kfac" else {}
            result = train(net, data, make_optimizer(name, **options, **extra), epochs=args.epochs,
                           batch_size=batch, seed=seed, name=label)
            if seed == 0:
                first_runs.append(result)
            reached = next((r for r in result["history"] if r["test_accuracy"] >= args.target), None)
            epochs[label].append(reached["epoch"] if reached else math.inf)
            seconds[label].append(reached["wall_s"] if reached else math.inf)
            print(f"seed {seed} {label:<18} " + (f"reached {args.target:.0%} at epoch {reached['epoch']} "
                  f"({reached['wall_s']:.1f} s)" if reached else f"never reached {args.target:.0%}"), flush=True)
    finite = lambda x: x if math.isfinite(x) else None  # noqa: E731  (JSON has no infinity)
    summary = {label: {
        "reached": sum(math.isfinite(e) for e in epochs[label]),
        "runs": args.seeds,
        "median_epochs": finite(statistics.median(epochs[label])),
        "median_seconds": finite(statistics.median(seconds[label])),
        "seconds_per_epoch": statistics.median(s / e for s, e in zip(seconds[label], epochs[label])
                                               if math.isfinite(e)) if any(map(math.isfinite, epochs[label]))
        else None,
    } for label, *_ in runs}
    sgd = summary[args.baseline]
    print(f"{args.data}, {args.model}, target test accuracy {args.target:.0%}, {args.seeds} seeds, "
          f"at most {args.epochs} epochs (median over all seeds; a run that never reaches it counts as ∞)")
    print(f"{'optimizer':<18} {'reached':>8} {'epochs':>7} {'seconds':>8} {'s/epoch':>8} "
          f"{'epochs/' + args.baseline:>12} {'seconds/' + args.baseline:>13}")
    for label, row in summary.items():
        if row["median_epochs"] is None:
            print(f"{label:<18} {row['reached']:>4}/{row['runs']:<3} {'∞':>7} {'∞':>8}")
            continue
        ratio_e = row["median_epochs"] / sgd["median_epochs"] if sgd["median_epochs"] else float("nan")
        ratio_s = row["median_seconds"] / sgd["median_seconds"] if sgd["median_seconds"] else float("nan")
        print(f"{label:<18} {row['reached']:>4}/{row['runs']:<3} {row['median_epochs']:>7.1f} "
              f"{row['median_seconds']:>8.2f} {row['seconds_per_epoch']:>8.3f} {ratio_e:>12.2f} {ratio_s:>13.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "machine": describe(), "data": args.data, "model": args.model,
            "target": args.target, "baseline": args.baseline, "summary": summary}, indent=2))
    if args.plot:
        plot(first_runs, args.plot, title=f"{args.model} on {args.data}, seed 0")


if __name__ == "__main__":
    main()
