"""The CNN target of issue 14 on MNIST-1D: Greydanus' ConvBase (examples/mnist1d_cnn.py) trained by each
optimiser at its defaults over several seeds, every run counted.

    python benchmarks/mnist1d_cnn.py [--optimizers hbp-newton adam kfac kbfgs] [--seeds 3] [--epochs 40]
                                     [--batch-size 64] [--lr-drop EPOCH ...] [--alpha A]
                                     [--json OUT] [--plot OUT.png]

Reports each optimiser's final and best test accuracy (mean over seeds, and every seed's), its wall time,
and the epoch at which it first reaches Adam's mean final accuracy: the targets are 94% (the published
CNN's) for hbp-newton, and Adam's final accuracy in at most half of Adam's epochs. A line per epoch is
printed as it ends (also into a file). Every optimiser runs at ``--batch-size``; ``--lr-drop`` divides the
learning rate by ten at those epochs for each optimiser that has a fixed one (kfac chooses its own, and
runs without); ``--alpha`` sets hbp-newton's α of eq. (8).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))
from machine import describe  # noqa: E402  (benchmarks/machine.py, beside this script)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizers", nargs="+", default=["hbp-newton", "adam", "kfac", "kbfgs"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr-drop", type=int, nargs="+", default=[], metavar="EPOCH")
    parser.add_argument("--alpha", type=float, help="hbp-newton's α (default: the paper's 0.02)")
    parser.add_argument("--json")
    parser.add_argument("--plot")
    args = parser.parse_args()

    from mnist1d_cnn import SPEC

    from mcalc.train.data import load_dataset
    from mcalc.train.network import Network
    from mcalc.train.optimizers import make_optimizer
    from mcalc.train.trainer import has_learning_rate, train

    data = load_dataset("mnist1d")
    runs = []
    for optimizer in args.optimizers:
        for seed in range(args.seeds):
            def show(record, optimizer=optimizer, seed=seed):
                print(f"{optimizer} seed {seed} epoch {record['epoch']:3d}  test accuracy "
                      f"{record['test_accuracy']:.3f}", flush=True)

            options = {"alpha": args.alpha} if optimizer == "hbp-newton" and args.alpha else {}
            chosen = make_optimizer(optimizer, **options)
            drops = args.lr_drop if has_learning_rate(chosen) else []
            result = train(Network(SPEC, seed=seed), data, chosen, epochs=args.epochs, batch_size=args.batch_size,
                           seed=seed, on_epoch=show, lr_drops=drops)
            runs.append({"optimizer": optimizer, "seed": seed, "history": result["history"],
                         "final": result["final"]})
    adam_final = statistics.mean(r["final"]["test_accuracy"] for r in runs if r["optimizer"] == "adam") \
        if "adam" in args.optimizers else None
    summary = {}
    setting = f"batch {args.batch_size}" + (f", learning rate ÷10 at epochs {args.lr_drop}" if args.lr_drop else "") \
        + (f", hbp-newton α = {args.alpha}" if args.alpha else "")
    print(f"\n{SPEC} on MNIST-1D, {args.seeds} seeds, {args.epochs} epochs, {setting}:")
    print(f"{'optimiser':12s} {'final':>7s} {'best':>7s} {'seconds':>8s} {'epoch to Adam':>14s}  finals")
    for optimizer in args.optimizers:
        mine = [r for r in runs if r["optimizer"] == optimizer]
        reach = [next((h["epoch"] for h in r["history"] if h["test_accuracy"] >= adam_final), None)
                 for r in mine] if adam_final is not None else []
        summary[optimizer] = {
            "final": statistics.mean(r["final"]["test_accuracy"] for r in mine),
            "best": statistics.mean(max(h["test_accuracy"] for h in r["history"]) for r in mine),
            "seconds": statistics.mean(r["final"]["wall_s"] for r in mine),
            "epochs_to_adam_final": reach,
            "finals": [r["final"]["test_accuracy"] for r in mine],
        }
        s = summary[optimizer]
        print(f"{optimizer:12s} {s['final']:7.3f} {s['best']:7.3f} {s['seconds']:8.1f} "
              f"{reach!s:>14s}  {[round(a, 3) for a in s['finals']]}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "spec": SPEC, "epochs": args.epochs, "seeds": args.seeds, "batch_size": args.batch_size,
            "lr_drops": args.lr_drop, "hbp_newton_alpha": args.alpha, "adam_final": adam_final,
            "summary": summary, "runs": runs, "machine": describe(),
        }, indent=2) + "\n")
    if args.plot:
        plot(runs, args.optimizers, setting, args.plot)


def plot(runs: list[dict], optimizers: list[str], setting: str, path: str) -> None:
    """Test accuracy against epochs, a line per run, coloured by optimiser."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, optimizer in enumerate(optimizers):
        for r in (r for r in runs if r["optimizer"] == optimizer):
            ax.plot([h["epoch"] for h in r["history"]], [h["test_accuracy"] for h in r["history"]],
                    color=f"C{i}", alpha=0.7, label=optimizer if r["seed"] == 0 else None)
    ax.axhline(0.94, color="gray", linestyle="--", label="published CNN (94%)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"ConvBase on MNIST-1D\n{setting}", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
