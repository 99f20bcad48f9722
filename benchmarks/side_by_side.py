"""Contenders timed side by side: each run in turn within every repeat, after one warm-up run each
(compilation, caches, allocator pools), so that drift of the machine (a shared CPU, GPU clocks) affects
them alike. A contender that runs on a device synchronises it inside its own function."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def timed_in_turn(contenders: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """The median seconds of each contender over ``repeats`` runs, all of them run in turn within each."""
    for run in contenders.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, run in contenders.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
