"""Compiling generated CUDA offline: nvcc where it is installed, else NVRTC through CuPy."""
from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import McalcError


@dataclass(frozen=True)
class CompileResult:
    module: str
    kernels: int
    compiler: str
    seconds: float
    ok: bool
    log: str


def compiler() -> str:
    """'nvcc' or 'nvrtc'; an error that says what to install when neither is there."""
    if shutil.which("nvcc"):
        return "nvcc"
    try:
        import cupy  # noqa: F401

        return "nvrtc"
    except ImportError:
        raise McalcError("no CUDA compiler: install the CUDA toolkit (nvcc) or CuPy (NVRTC)") from None


def compile_source(module: str, source: str) -> CompileResult:
    """Compile one translation unit of kernels to PTX and report."""
    kernels = source.count("__global__")
    tool = compiler()
    start = time.perf_counter()
    if tool == "nvcc":
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "kernels.cu"
            path.write_text(source)
            done = subprocess.run(["nvcc", "--ptx", "-std=c++17", "-o", str(path.with_suffix(".ptx")), str(path)],
                                  capture_output=True, text=True)
            ok, log = done.returncode == 0, (done.stdout + done.stderr).strip()
    else:
        import cupy

        try:
            cupy.RawModule(code=source, options=("-std=c++17",)).compile()
            ok, log = True, ""
        except Exception as exc:  # NVRTC reports compile errors as exceptions
            ok, log = False, str(exc)
    return CompileResult(module, kernels, tool, time.perf_counter() - start, ok, log)
