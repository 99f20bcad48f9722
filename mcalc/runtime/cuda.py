"""Launching the fused kernels of generated CuPy code."""
from __future__ import annotations

from enum import StrEnum
from typing import Any

THREADS_PER_BLOCK = 256  # every launch's block; a row sum's shared-memory tree has this many entries


class Layout(StrEnum):
    """How a kernel divides its (rows, cols) work among threads."""

    ENTRIES = "entries"  # a thread per entry (an elementwise map)
    ROWS = "rows"  # a block per row (a row sum, a tree reduction)
    COLUMNS = "columns"  # a thread per column (a softmax, a loop down the column)

    def grid(self, rows: int, cols: int) -> tuple[int]:
        blocks = lambda n: (n + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK  # noqa: E731
        return {"entries": (blocks(rows * cols),), "rows": (rows,), "columns": (blocks(cols),)}[self.value]


class KernelSet:
    """One generated module's CUDA source, compiled (NVRTC, cached by CuPy) on first use."""

    def __init__(self, source: str) -> None:
        self.source = source
        self._module: Any = None
        self._functions: dict[tuple[str, Any], Any] = {}

    def _function(self, name: str, dtype: Any) -> Any:
        key = (name, dtype)
        if key not in self._functions:  # a launch is on the hot path: look each kernel up once
            import cupy

            if self._module is None:
                self._module = cupy.RawModule(code=self.source, options=("-std=c++17",))
            self._functions[key] = self._module.get_function(f"{name}_{'float' if dtype == cupy.float32 else 'double'}")
        return self._functions[key]

    def launch(self, name: str, dtype: Any, shape: tuple, out_shape: tuple | list[tuple], inputs: list[Any],
               coefficients: list[float], layout: Layout | str) -> Any:
        """Run kernel ``name`` in ``dtype`` over ``shape``: one output of ``out_shape``, or, for a list of
        shapes, a row sum and its siblings' outputs (a list is returned). ``layout`` (:class:`Layout`)
        is how the kernel divides the work.

        A launch is the fused path's unit of Python overhead, so it does the least it can: inputs already
        contiguous and of ``dtype`` (the usual case) pass as they are, without a CuPy call each.
        """
        import cupy

        if dtype != cupy.float32:  # kernels come in float and double: anything else runs in double
            dtype = cupy.dtype(cupy.float64)
        if not all(a.dtype == dtype and a.flags.c_contiguous for a in inputs):
            inputs = [cupy.ascontiguousarray(a, dtype=dtype) for a in inputs]
        several = isinstance(out_shape, list)
        outs = [cupy.empty(s, dtype=dtype) for s in (out_shape if several else [out_shape])]
        rows, cols = shape
        scalar = dtype.type
        args = (*inputs, *[scalar(c) for c in coefficients], *outs, cupy.int64(rows), cupy.int64(cols))
        self._function(name, dtype)(Layout(layout).grid(rows, cols), (THREADS_PER_BLOCK,), args)
        return outs if several else outs[0]
