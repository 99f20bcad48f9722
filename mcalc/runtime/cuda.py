"""Launching the fused kernels of generated CuPy code."""
from __future__ import annotations

from typing import Any


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

    def launch(self, name: str, shape: tuple, out_shape: tuple, inputs: list[Any], coefficients: list[float],
               reduce: bool) -> Any:
        """Run kernel ``name`` over an output of ``shape`` (a row sum into ``out_shape`` when ``reduce``)."""
        import cupy

        dtype = cupy.float32 if cupy.result_type(*inputs) == cupy.float32 else cupy.float64
        inputs = [cupy.ascontiguousarray(a, dtype=dtype) for a in inputs]
        out = cupy.empty(out_shape, dtype=dtype)
        rows, cols = (int(d) for d in shape)
        args = (*inputs, *[dtype(c) for c in coefficients], out, cupy.int64(rows), cupy.int64(cols))
        grid = (rows,) if reduce else ((rows * cols + 255) // 256,)
        self._function(name, dtype)(grid, (256,), args)
        return out
