"""Every optimiser at its defaults over data sets × activations × depths × seeds: final test accuracy,
epochs to a target, divergences and tracebacks, each run counted (none dropped).

    python benchmarks/robustness.py [--seeds 2] [--epochs 8] [--workers 2] [--json OUT] [--plot OUT.png]
                                    [--data digits mnist1d synthetic] [--optimizers ...]
                                    [--set OPTIMIZER.OPTION=VALUE ...]

A cell is (data set, activation, hidden layers); its networks have hidden widths 64 (digits,
synthetic) or 100 (MNIST-1D, as Greydanus 2020's MLP). Every optimiser trains the same network of
the cell from the same initialisation with the CLI's defaults (batch 64, its own default options;
``--set hbp-newton.approximation=7`` changes one, for every run of that optimiser, and the JSON says so).
A run *diverges* when its final test loss is not finite or above twice the loss of guessing,
2 ln(classes); a run that raises is a *traceback*. The gap of a second-order optimiser in a cell is
its mean final accuracy minus that of the better first-order baseline (sgd, adam) there.
Progress is printed a line per run as it ends (also into a file); with --json the runs are written
after every one, so an interrupted matrix keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from machine import processor  # noqa: E402  (benchmarks/machine.py, beside this script)

OPTIMIZERS = ["sgd", "adam", "hbp-newton", "kfac", "kbfgs", "hf-gn", "hf-newton"]
FIRST_ORDER = ("sgd", "adam")
WIDTH = {"digits": 64, "mnist1d": 100, "synthetic": 64}
TARGET = {"digits": 0.95, "mnist1d": 0.60, "synthetic": 0.60}


def spec(data: str, activation: str, depth: int, features: int, classes: int) -> str:
    return "-".join([str(features)] + [f"{WIDTH[data]}-{activation}"] * depth + [str(classes)])


def run(data_name: str, activation: str, depth: int, optimizer: str, seed: int, epochs: int,
        settings: dict | None = None) -> dict:
    """One training run with the optimiser's defaults but ``settings``; never raises (a traceback is a
    result)."""
    import warnings

    from mcalc.runtime.allocator import keep_freed_memory
    from mcalc.train.data import load_dataset
    from mcalc.train.network import Network
    from mcalc.train.optimizers import make_optimizer
    from mcalc.train.trainer import train

    keep_freed_memory()  # as `mcalc train` runs
    row = {"data": data_name, "activation": activation, "depth": depth, "optimizer": optimizer, "seed": seed}
    start = time.perf_counter()
    try:
        data = load_dataset(data_name, seed=seed)
        model = spec(data_name, activation, depth, data.features, data.classes)
        options = {"seed": seed} if optimizer == "kfac" else {}
        options.update(settings or {})
        row["settings"] = settings or {}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = train(Network(model, seed=seed), data, make_optimizer(optimizer, **options), epochs=epochs,
                           batch_size=64, seed=seed, name=optimizer)
        history = result["history"]
        final = history[-1]
        reached = next((h["epoch"] for h in history if h["test_accuracy"] >= TARGET[data_name]), None)
        bound = 2 * math.log(data.classes)
        row.update(model=model, final_accuracy=final["test_accuracy"], final_loss=final["test_loss"],
                   best_accuracy=max(h["test_accuracy"] for h in history), epochs_to_target=reached,
                   accuracy_per_epoch=[h["test_accuracy"] for h in history],
                   rejected_steps=result["final"]["rejected_steps"], warnings=len(caught),
                   diverged=not (math.isfinite(final["test_loss"]) and final["test_loss"] <= bound),
                   traceback=None)
    except Exception:  # counted, never dropped
        row.update(final_accuracy=None, diverged=True, traceback=traceback.format_exc())
    row["seconds"] = time.perf_counter() - start
    return row


def summarise(rows: list[dict]) -> dict:
    """Per (data, optimizer): mean final accuracy, worst and mean gap to the better first-order baseline
    over the cells, divergences and tracebacks; per data set: median epochs to the target."""
    cells: dict[tuple, dict[str, list[float]]] = {}
    for r in rows:
        key = (r["data"], r["activation"], r["depth"])
        cells.setdefault(key, {}).setdefault(r["optimizer"], []).append(
            r["final_accuracy"] if r["final_accuracy"] is not None else 0.0)
    gaps: dict[tuple[str, str], list[float]] = {}
    for (data, _, _), by_optimizer in cells.items():
        baseline = max((statistics.mean(by_optimizer[o]) for o in FIRST_ORDER if o in by_optimizer), default=None)
        for optimizer, accuracies in by_optimizer.items():
            if baseline is not None:
                gaps.setdefault((data, optimizer), []).append(statistics.mean(accuracies) - baseline)
    out: dict = {}
    for r in rows:
        entry = out.setdefault(r["data"], {}).setdefault(r["optimizer"], {
            "runs": 0, "diverged": 0, "tracebacks": 0, "accuracies": [], "epochs_to_target": []})
        entry["runs"] += 1
        entry["diverged"] += bool(r["diverged"])
        entry["tracebacks"] += r.get("traceback") is not None
        entry["accuracies"].append(r["final_accuracy"] or 0.0)
        entry["epochs_to_target"].append(r.get("epochs_to_target") or math.inf)
    for data, by_optimizer in out.items():
        for optimizer, entry in by_optimizer.items():
            g = gaps.get((data, optimizer), [0.0])
            entry.update(mean_accuracy=statistics.mean(entry.pop("accuracies")), worst_gap=min(g),
                         mean_gap=statistics.mean(g), cells_within_003=sum(x >= -0.03 for x in g), cells=len(g))
            median = statistics.median(entry.pop("epochs_to_target"))
            entry["median_epochs_to_target"] = median if math.isfinite(median) else None
    return out


def plot(rows: list[dict], path: str) -> None:
    """A heat map per data set: cells (activation, depth) × optimisers, the colour the mean final accuracy
    minus the better first-order baseline's; divergences marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    datasets = sorted({r["data"] for r in rows})
    optimizers = [o for o in OPTIMIZERS if any(r["optimizer"] == o for r in rows)]
    figure, axes = plt.subplots(1, len(datasets), figsize=(3.4 * len(datasets) + 1.5, 4.6), squeeze=False,
                                sharey=True)
    image = None
    for ax, data in zip(axes[0], datasets):
        keys = sorted({(r["activation"], r["depth"]) for r in rows if r["data"] == data})
        grid = np.full((len(keys), len(optimizers)), np.nan)
        marks = []
        for i, (activation, depth) in enumerate(keys):
            cell = [r for r in rows if r["data"] == data and r["activation"] == activation and r["depth"] == depth]
            mean = {o: statistics.mean([r["final_accuracy"] or 0.0 for r in cell if r["optimizer"] == o])
                    for o in optimizers if any(r["optimizer"] == o for r in cell)}
            baseline = max(mean.get(o, 0.0) for o in FIRST_ORDER)
            for j, o in enumerate(optimizers):
                if o in mean:
                    grid[i, j] = mean[o] - baseline
                    if any(r["diverged"] for r in cell if r["optimizer"] == o):
                        marks.append((j, i))
        image = ax.imshow(grid, cmap="RdBu", vmin=-0.3, vmax=0.3, aspect="auto")
        for j, i in marks:
            ax.text(j, i, "×", ha="center", va="center", color="black", fontsize=12)
        ax.set_xticks(range(len(optimizers)), optimizers, rotation=60, ha="right")
        ax.set_yticks(range(len(keys)), [f"{a} ×{d}" for a, d in keys])
        ax.set_title(data)
    epochs = max(len(r.get("accuracy_per_epoch") or []) for r in rows)
    figure.suptitle(f"final test accuracy (after {epochs} epochs) minus the better of sgd and adam, mean over seeds")
    figure.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="accuracy difference (× = a run diverged)")
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=["digits", "mnist1d", "synthetic"])
    parser.add_argument("--activations", nargs="+", default=["sigmoid", "tanh", "relu"])
    parser.add_argument("--depths", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--optimizers", nargs="+", default=OPTIMIZERS)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--blas-threads", default="1",
                        help="BLAS threads per worker (the runs' matrices are small: more workers than cores "
                             "with threaded BLAS each ran the digits part 7x slower here)")
    parser.add_argument("--set", action="append", default=[], metavar="OPTIMIZER.OPTION=VALUE",
                        help="an option other than the default, e.g. hbp-newton.approximation=7 (repeatable)")
    parser.add_argument("--json")
    parser.add_argument("--plot")
    parser.add_argument("--from-json", help="no runs: summarise and plot the runs of this earlier --json")
    args = parser.parse_args()
    if args.from_json:
        rows = json.loads(Path(args.from_json).read_text())["runs"]
        report(rows, args.plot)
        return
    os.environ["OPENBLAS_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = args.blas_threads  # read by the workers
    settings = parse_settings(args.set)
    jobs = [(d, a, k, o, s, args.epochs, settings.get(o)) for d in args.data for a in args.activations
            for k in args.depths for s in range(args.seeds) for o in args.optimizers]
    machine = {"processor": processor(), "cpus": os.cpu_count(),
               "python": platform.python_version(), "workers": args.workers}
    if settings:
        print("not the defaults: " + ", ".join(f"{o} {k}={v!r}" for o, opts in settings.items()
                                                for k, v in opts.items()), flush=True)
    print(f"{len(jobs)} runs on {args.workers} workers ({machine['processor']}, {machine['cpus']} CPUs)", flush=True)
    header = {"machine": machine, "epochs": args.epochs, "settings": settings, "targets": TARGET}
    rows: list[dict] = []
    start = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        futures = [pool.submit(run, *job) for job in jobs]
        for done, future in enumerate(as_completed(futures), 1):
            row = future.result()
            rows.append(row)
            status = "TRACEBACK" if row.get("traceback") else "DIVERGED" if row["diverged"] else \
                f"{row['final_accuracy']:.3f}"
            print(f"[{done:4d}/{len(jobs)} {time.perf_counter() - start:6.0f} s] {row['data']:9s} "
                  f"{row['activation']:7s} ×{row['depth']} seed {row['seed']} {row['optimizer']:10s} {status} "
                  f"({row['seconds']:.1f} s)", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps({**header, "runs": rows}, indent=1) + "\n")
    summary = report(rows, args.plot)
    if args.json:
        Path(args.json).write_text(json.dumps({**header, "summary": summary, "runs": rows}, indent=1) + "\n")


def parse_settings(items: list[str]) -> dict[str, dict]:
    """``['hbp-newton.approximation=7', 'kfac.decay=0.9']`` as ``{optimizer: {option: value}}``, each value
    read as the type of the option's default (a number, a flag, else the text, which enums parse)."""
    from mcalc.train.optimizers import make_optimizer

    settings: dict[str, dict] = {}
    for item in items:
        name, sep, text = item.partition("=")
        optimizer, dot, option = name.rpartition(".")
        if not (sep and dot and optimizer in OPTIMIZERS and option):
            raise SystemExit(f"--set {item}: write OPTIMIZER.OPTION=VALUE, OPTIMIZER one of {', '.join(OPTIMIZERS)}")
        default = getattr(make_optimizer(optimizer), option, None)
        if default is None:
            raise SystemExit(f"--set {item}: {optimizer} has no option {option!r}")
        kind = type(default)
        value = text.lower() in ("1", "true", "yes") if kind is bool else kind(text) if kind in (int, float) else text
        settings.setdefault(optimizer, {})[option] = value
    return settings


def report(rows: list[dict], plot_path: str | None) -> dict:
    """Print the summary table (and plot it); returns the summary."""
    summary = summarise(rows)
    print(f"\n{'data':10s} {'optimizer':11s} {'runs':>5s} {'div':>4s} {'tb':>3s} {'mean acc':>8s} "
          f"{'worst gap':>9s} {'cells ≥ −0.03':>13s} {'epochs to target':>16s}")
    for data, by_optimizer in summary.items():
        for optimizer in OPTIMIZERS:
            if optimizer in by_optimizer:
                e = by_optimizer[optimizer]
                print(f"{data:10s} {optimizer:11s} {e['runs']:5d} {e['diverged']:4d} {e['tracebacks']:3d} "
                      f"{e['mean_accuracy']:8.3f} {e['worst_gap']:+9.3f} {e['cells_within_003']:>6d}/{e['cells']:<6d} "
                      f"{e['median_epochs_to_target'] or '-':>16}")
    if plot_path:
        plot(rows, plot_path)
        print(f"\nplot: {plot_path}")
    return summary


if __name__ == "__main__":
    main()
