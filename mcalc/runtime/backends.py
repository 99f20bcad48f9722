"""Array backends: NumPy everywhere, CuPy where a GPU answers."""
from __future__ import annotations

import functools


@functools.cache
def gpu_available() -> bool:
    """Whether CuPy is installed and sees a CUDA device."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no CuPy, no driver, no device: all mean "no GPU"
        return False


def gpu_unavailable_reason() -> str:
    try:
        import cupy
    except ImportError:
        return "CuPy is not installed (pip install -e '.[gpu]')"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return f"CuPy finds no usable CUDA device ({type(exc).__name__}: {exc})"
    return "no CUDA device" if count == 0 else ""
