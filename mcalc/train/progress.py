"""Live progress of a training run: tqdm's bar on a terminal, and where the output goes to a file, a line
now and then.

A bar redrawn with carriage returns is one ever-growing line in a log file, so off a terminal
:class:`ProgressLines` writes a whole line at most every ``interval`` seconds instead, each saying how far
the run is: an epoch of a large network (attention over an image's positions, a CIFAR-10 CNN) takes
minutes, and its own line comes only at its end.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO


class ProgressLines:
    """The bar's calls (:meth:`update`, :meth:`set_postfix`, :meth:`clear`, :meth:`refresh`, :meth:`close`)
    as a line to ``stream`` at most every ``interval`` seconds of ``clock``: steps done of ``total``, and the
    seconds."""

    def __init__(self, total: int, desc: str, interval: float = 30.0, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.total, self.desc, self.interval, self.clock = total, desc, interval, clock
        self.stream = stream if stream is not None else sys.stderr
        self.done, self.start = 0, clock()
        self.last = self.start

    def update(self, steps: int = 1) -> None:
        self.done += steps
        now = self.clock()
        if now - self.last >= self.interval and self.done < self.total:
            self.last = now
            print(f"{self.desc}: step {self.done} of {self.total} ({self.done / self.total:.0%}), "
                  f"{now - self.start:.0f} s", file=self.stream, flush=True)

    def set_postfix(self, **_: Any) -> None:  # the epoch's own line says it
        pass

    def clear(self) -> None:
        pass

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str) -> Any:
    """tqdm's bar where standard error is a terminal, else :class:`ProgressLines`."""
    if not sys.stderr.isatty():
        return ProgressLines(total, desc)
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False)
