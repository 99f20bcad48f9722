"""The C allocator's thresholds for the temporaries of generated NumPy code.

A pass of generated code makes many arrays of a few hundred KiB (a 128 × 128 block in float64 is
128 KiB). glibc's malloc serves an allocation of at least its mmap threshold (128 KiB at start, raised
dynamically as mapped chunks are freed) by a fresh mmap, and returns the top of its heap to the system
past its trim threshold: then every such temporary costs a system call and page faults on first
touch, and whether it does depends on what the process allocated before (importing SciPy first moved
one HBP pass of `benchmarks/user_modules.py` from 1.5 to 1.1 ms). Fixed thresholds keep freed memory
for the next pass.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # allocations below it come from the heap
TRIM_THRESHOLD = 256 << 20  # free memory kept at the top of the heap


@functools.cache
def keep_freed_memory() -> bool:
    """Fixes glibc's mmap threshold at 32 MiB and its trim threshold at 256 MiB, for this process;
    whether it did (False off glibc, where nothing is changed)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
