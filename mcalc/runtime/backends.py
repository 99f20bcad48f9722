"""Array backends: NumPy everywhere, CuPy where a GPU answers."""
from __future__ import annotations

import functools

# One small array operation's fixed cost (Python, dispatch, a kernel launch) in flops of a matrix product
# on the backend, which decides between many small operations and a few large ones: ~3 µs on the
# README's 2-core CPU (NumPy, OpenBLAS), the time of ~1e5 GEMM flops there; 16 µs on an H100 (CuPy,
# benchmarks/results/solve_costs_h100.json), 3.8e8 flops of its float32 GEMM.
DISPATCH_FLOPS = {"numpy": 1e5, "cupy": 3.8e8}


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
