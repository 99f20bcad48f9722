"""A pass of generated CuPy code recorded once as a CUDA graph and replayed on new batches.

At the sizes of the HBP paper's networks a pass is bound by the host, not the GPU: Python and
the launch of each of its kernels and cuBLAS products (~15 µs each on the H100 machine measured,
against a few µs of GPU work). A CUDA graph launches all of them with one call.

A graph replays fixed device addresses, so everything it reads or writes is fixed at capture:

- the arguments are copied into buffers the graph owns before each replay;
- the arrays it reads through ``state()`` (a network's parameters, looked up by name at run time)
  are the ones bound at capture; a name later bound to another array (an optimiser that does not
  update in place) has the new values copied into the captured array, which is bound again;
- its results are arrays it owns, overwritten by the next replay;
- its memory comes from a private pool, so no allocation outside the graph reuses an address
  that the graph writes.
"""
from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Callable
from typing import Any

from ..errors import McalcError

_capturing = False  # set while a CapturedCall records: products then call cuBLAS themselves


def matmul(a: Any, b: Any, alpha: float = 1.0) -> Any:
    """``alpha * (a @ b)`` as one product, for the generated code. On a GPU, while a graph is captured
    or with a scale (cuBLAS's alpha, which CuPy's ``@`` does not take), the product is enqueued by
    calling cuBLAS directly: CuPy refuses any cuBLAS call on a capturing stream, though cuBLAS itself
    supports capture. The emulator counts and records it as one product; NumPy scales after."""
    cupy = sys.modules.get("cupy")
    emulated = getattr(cupy, "EMULATED", False)
    if a.ndim == 2 and b.ndim == 2:  # a stack of products (a batched rule) runs as `@`, scaled after
        if emulated and isinstance(a, cupy.ndarray) and alpha != 1.0:
            return cupy.scaled_matmul(a, b, alpha)
        if not emulated and type(a).__module__.split(".")[0] == "cupy" and (_capturing or alpha != 1.0):
            return _captured_gemm(a, b, alpha)
    product = a @ b
    if alpha != 1.0:
        product *= alpha
    return product


@functools.cache
def _cublas() -> ctypes.CDLL:
    """The cuBLAS that CuPy loaded (dlopen by soname finds the library already in the process)."""
    import cupy

    return ctypes.CDLL(f"libcublas.so.{cupy.cuda.runtime.runtimeGetVersion() // 1000}")


def _column_major(x: Any) -> tuple[Any, int, int]:
    """(array, op, leading dimension) of a row-major 2-D array read as column-major by cuBLAS:
    a C-contiguous X is Xᵀ untransposed, an F-contiguous one (a transposed view) is X transposed."""
    import cupy

    if not x.flags.c_contiguous and x.flags.f_contiguous:
        return x, 1, max(1, x.shape[0])  # CUBLAS_OP_T
    x = cupy.ascontiguousarray(x)  # a broadcast view: one copy kernel, captured like any other
    return x, 0, max(1, x.shape[1])  # CUBLAS_OP_N


def _captured_gemm(a: Any, b: Any, alpha: float = 1.0) -> Any:
    """C = alpha A B as the column-major Cᵀ = alpha Bᵀ Aᵀ, by cublas{S,D}gemm on the current stream."""
    import cupy

    if a.ndim != 2 or b.ndim != 2 or a.dtype != b.dtype or a.dtype not in (cupy.float32, cupy.float64):
        return (a @ b) * alpha  # not a product the generated code makes; CuPy says why it cannot be captured
    (m, k), n = a.shape, b.shape[1]
    if m == 0 or n == 0 or k == 0:
        return cupy.zeros((m, n), dtype=a.dtype)
    out = cupy.empty((m, n), dtype=a.dtype)
    (b, op_b, ld_b), (a, op_a, ld_a) = _column_major(b), _column_major(a)
    library, handle = _cublas(), cupy.cuda.Device().cublas_handle
    scalar, gemm = ((ctypes.c_float, library.cublasSgemm_v2) if a.dtype == cupy.float32
                    else (ctypes.c_double, library.cublasDgemm_v2))
    scale, zero = scalar(alpha), scalar(0)
    _check(library.cublasSetStream_v2(ctypes.c_void_p(handle),
                                      ctypes.c_void_p(cupy.cuda.get_current_stream().ptr)))
    _check(gemm(ctypes.c_void_p(handle), op_b, op_a, n, m, k, ctypes.byref(scale),
                ctypes.c_void_p(b.data.ptr), ld_b, ctypes.c_void_p(a.data.ptr), ld_a,
                ctypes.byref(zero), ctypes.c_void_p(out.data.ptr), max(1, n)))
    return out


def _check(status: int) -> None:
    if status != 0:
        raise McalcError(f"cuBLAS failed with status {status} while a CUDA graph was captured")


class CapturedCall:
    """``function(*args)``, which reads the arrays of the dict ``state()`` by key, recorded as a CUDA
    graph on a first call with ``example_args``; calling the object replays it on new arguments of the
    same shapes."""

    def __init__(self, function: Callable[..., Any], example_args: list[Any],
                 state: Callable[[], dict[str, Any]]) -> None:
        global _capturing
        import cupy

        self.pool = cupy.cuda.MemoryPool()
        self.state = state
        stream = cupy.cuda.Stream(non_blocking=True)  # capture must not touch the legacy stream
        cupy.cuda.Device().synchronize()  # that stream does not wait for work queued on others
        with cupy.cuda.using_allocator(self.pool.malloc), stream:
            self.args = [cupy.array(a, copy=True) for a in example_args]
            self.buffers = dict(state())
            function(*self.args)  # compiles the kernels and sets cuBLAS up, outside the graph
            stream.synchronize()
            stream.begin_capture()
            _capturing = True
            try:
                self.results = function(*self.args)
            finally:
                _capturing = False
                self.graph = stream.end_capture()

    def __call__(self, *args: Any) -> Any:
        """Replay on ``args`` on the current stream; returns the same result arrays every time."""
        for i, (buffer, a) in enumerate(zip(self.args, args, strict=True)):
            if a.shape != buffer.shape:
                raise McalcError(f"argument {i} has shape {a.shape}; this CUDA graph was captured for "
                                 f"{buffer.shape}: capture another for that shape")
            if a is not buffer:
                buffer[...] = a
        current = self.state()
        for name, buffer in self.buffers.items():
            if current[name] is not buffer:  # rebound since: copy the new value in, keep the buffer
                buffer[...] = current[name]
                current[name] = buffer
        self.graph.launch()
        return self.results
