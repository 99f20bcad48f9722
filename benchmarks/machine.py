"""The machine a benchmark measured on, named the same way in every results file: the processor's model,
its architecture and the CPUs the process sees (and the accelerator, when one was used). Ratios between
contenders measured on different hosts are not comparable without it."""
from __future__ import annotations

import os
import platform
from pathlib import Path


def processor() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what ``platform`` knows of it."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def describe(accelerator: str | None = None) -> str:
    """'AMD EPYC (x86_64), 2 CPUs', with the accelerator's name after it when one was used."""
    machine = f"{processor()} ({platform.machine()}), {os.cpu_count()} CPUs"
    return f"{machine}, {accelerator}" if accelerator else machine
