"""Start-up of ``mcalc train``: the seconds from launching the command to its first training step, and
whether SymPy and Jinja2 were imported on the way.

    python benchmarks/startup.py [--repeat 5] [--root CHECKOUT] [--json OUT]

Each repeat runs ``mcalc train --epochs 1`` on the built-in digits in a fresh interpreter; start-up is
its wall time less the training time the command reports (``elapsed``). ``--root`` measures another
checkout of mcalc (say, a ``git worktree`` of an older commit) with the same interpreter, so two
builds are compared on one machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from machine import describe  # noqa: E402  (benchmarks/machine.py, beside this script)

PROBE = ("import sys; from mcalc.cli import main; code = main({argv!r}); "
         "print('imported:', *[m for m in ('sympy', 'jinja2') if m in sys.modules]); sys.exit(code)")


def measure(root: Path, argv: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(root), "OPENBLAS_NUM_THREADS": "1"}
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True, text=True,
                         env=env, cwd=root)
    wall = time.perf_counter() - start
    if run.returncode != 0:
        raise SystemExit(f"{root}: mcalc train failed:\n{run.stderr}")
    training = float(re.search(r"elapsed ([\d.]+) s", run.stdout).group(1))
    imported = run.stdout.strip().splitlines()[-1].removeprefix("imported:").split()
    return {"wall_s": wall, "training_s": training, "startup_s": wall - training, "imported": imported}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout of mcalc to measure")
    parser.add_argument("--json", help="write the measurements here")
    args = parser.parse_args()
    argv = ["train", "--epochs", "1", "--optimizer", "sgd"]
    runs = []
    for i in range(args.repeat):
        runs.append(measure(args.root.resolve(), argv))
        print(f"[{i + 1}/{args.repeat}] start-up {runs[-1]['startup_s']:.2f} s, "
              f"imported {', '.join(runs[-1]['imported']) or 'neither SymPy nor Jinja2'}", flush=True)
    median = statistics.median(r["startup_s"] for r in runs)
    print(f"median start-up of `mcalc {' '.join(argv)}`: {median:.2f} s ({args.root})")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "command": ["mcalc", *argv], "root": str(args.root), "median_startup_s": median, "runs": runs,
            "machine": describe(), "python": platform.python_version(),
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()
