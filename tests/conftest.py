import os
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings

from mcalc.runtime import emulator
from mcalc.runtime.backends import gpu_available, gpu_unavailable_reason

# CI explores the same examples on every run (a fresh clone has no example database, and a run that found a
# new bug by chance would fail a submission that did not cause it); developers' runs stay random and keep
# their database, where new finds are made and become @example regressions.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

sys.path.insert(0, str(Path(__file__).parent))  # torch_reference, strategies

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def seeds_for(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random δz and a random symmetric PSD 𝓗z for an output of ``size`` entries."""
    dz = rng.normal(size=size)
    a = rng.normal(size=(size, size))
    return dz, a @ a.T / size


@pytest.fixture(params=["gpu", "emulated"])
def cp(request):
    """The CuPy module a test runs on: the real one on a GPU (skipped, saying why, where there is none), or
    the emulator, which compiles the same CUDA kernels with the host's C++ compiler so that CI runs them."""
    if request.param == "gpu":
        if not gpu_available():
            pytest.skip(f"no GPU: {gpu_unavailable_reason()}")
        import cupy

        yield cupy
        return
    reason = emulator.unavailable_reason()
    if reason:
        pytest.skip(reason)
    with emulator.installed() as cupy:
        yield cupy
