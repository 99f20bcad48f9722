"""A CuPy stand-in that runs the generated CUDA kernels on the CPU: the CuPy backend, tested where no GPU is.

``emulated_cupy()`` returns a module that the generated CuPy code and the
runtime take for ``cupy`` (install it as ``sys.modules['cupy']``, as
:func:`installed` does). Arrays are NumPy arrays of a subclass with CuPy's
``.get()``; array functions are NumPy's. ``RawModule`` compiles the kernels'
CUDA C++ with the host's C++ compiler, after a prelude that defines CUDA's
qualifiers, built-in indices, ``__shared__`` memory and ``__syncthreads()``:

- a kernel without barriers runs its threads one after another;
- a kernel with barriers runs one OS thread per CUDA thread of a block,
  the blocks one after another, a ``std::barrier`` standing for
  ``__syncthreads()`` (``__shared__`` becomes ``static``, shared by the block).

A stream's capture records a CUDA graph: every device operation while it
captures (ufuncs, products and reductions, array functions, kernel launches,
indexed writes and copies) is run and also kept as how to redo it on the same
arrays, and ``graph.launch()`` redoes them in order, so that the graph's results
are its arrays, written again (a view is not redone: it reads its base). Reading a
device value on the host while capturing is refused, as on a GPU.

What a GPU would not forgive is refused here too: a scalar argument whose
type is not the kernel parameter's (CuPy passes its bytes unchecked), an
array that is not contiguous or not of the parameter's element type, an
output left unwritten (``empty`` fills new arrays with NaN).

Every device operation is counted in :data:`COUNTS` (kernel launches of
generated code, each NumPy ufunc call, product or reduction, and each array
made filled (zeros, ones, full, eye), one CuPy launch each), for launch counts
without a GPU.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import types
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import McalcError
from ..locations import cache_directory

COUNTS: Counter = Counter()
"""Device operations since the last reset: 'kernel' (generated kernels), 'matmul', 'reduce', 'elementwise', 'fill'."""
_FILLS = {"zeros", "ones", "full", "zeros_like", "ones_like", "full_like", "eye", "identity"}  # a fill kernel each

_PRELUDE = r"""
#include <math.h>
#include <barrier>
#include <thread>
#include <vector>
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
struct mcalc_dim3 { unsigned x, y, z; };
static thread_local mcalc_dim3 threadIdx, blockIdx;
static mcalc_dim3 blockDim, gridDim;
static std::barrier<>* mcalc_barrier = nullptr;
static inline void __syncthreads() { mcalc_barrier->arrive_and_wait(); }

template <class Thread> static void mcalc_emulate(unsigned grid, unsigned block, bool barriers, Thread&& thread) {
    blockDim = {block, 1, 1};
    gridDim = {grid, 1, 1};
    if (!barriers) {
        for (unsigned b = 0; b < grid; ++b)
            for (unsigned t = 0; t < block; ++t) {
                blockIdx = {b, 0, 0};
                threadIdx = {t, 0, 0};
                thread();
            }
        return;
    }
    std::barrier<> sync(block);
    mcalc_barrier = &sync;
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < block; ++t)
        threads.emplace_back([&, t] {
            threadIdx = {t, 0, 0};
            for (unsigned b = 0; b < grid; ++b) {
                blockIdx = {b, 0, 0};
                thread();
                sync.arrive_and_wait();  // the block's shared memory is the next block's
            }
        });
    for (auto& th : threads) th.join();
}
"""

_KERNEL = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(([^)]*)\)\s*\{', re.S)
_SCALARS = {"float": (ctypes.c_float, np.float32), "double": (ctypes.c_double, np.float64),
            "long long": (ctypes.c_longlong, np.int64), "int": (ctypes.c_int, np.int32)}


class DeviceArray(np.ndarray):
    """A NumPy array standing for a CuPy one: ``.get()`` copies it to the host; every ufunc call is counted."""

    __module__ = "cupy.emulated"  # runtime.blocks.namespace reads the array's module

    def get(self) -> np.ndarray:
        _refuse_host_read()
        return np.array(self, copy=True).view(np.ndarray)

    def __float__(self) -> float:
        _refuse_host_read()
        return float(np.asarray(self))

    def __int__(self) -> int:
        _refuse_host_read()
        return int(np.asarray(self))

    def __bool__(self) -> bool:
        _refuse_host_read()
        return bool(np.asarray(self))

    def item(self, *args: Any) -> Any:
        _refuse_host_read()
        return np.asarray(self).item(*args)

    def __array_ufunc__(self, ufunc: np.ufunc, method: str, *inputs: Any, **kwargs: Any) -> Any:
        COUNTS["matmul" if ufunc is np.matmul else "reduce" if method == "reduce" else "elementwise"] += 1
        plain = [np.asarray(a) if isinstance(a, DeviceArray) else a for a in inputs]
        if "out" in kwargs:
            kwargs["out"] = tuple(np.asarray(a) if isinstance(a, DeviceArray) else a for a in kwargs["out"])
        result = _to_device(getattr(ufunc, method)(*plain, **kwargs))
        if _recording is not None:
            # redone into the same outputs: the ones given, or the arrays this call made
            made = result if isinstance(result, tuple) else (result,)
            outs = kwargs.get("out") or tuple(np.asarray(r) for r in made)
            redo_kwargs = {**kwargs, "out": outs}
            _recording.append(lambda: getattr(ufunc, method)(*plain, **redo_kwargs))
        return result

    def mean(self, *args: Any, **kwargs: Any) -> Any:
        """One reduction, as CuPy's mean is (NumPy's would also count its division)."""
        COUNTS["reduce"] += 1
        plain = self.view(np.ndarray)
        return _to_device(_recorded(None, lambda: np.asarray(plain.mean(*args, **kwargs))))

    # methods that may make a new array rather than a view: recorded while a graph is captured
    def __getitem__(self, index: Any) -> Any:
        return _recorded(self, np.ndarray.__getitem__, index)

    def copy(self, *args: Any, **kwargs: Any) -> Any:
        return _recorded(self, np.ndarray.copy, *args, **kwargs)

    def astype(self, *args: Any, **kwargs: Any) -> Any:
        return _recorded(self, np.ndarray.astype, *args, **kwargs)

    def reshape(self, *args: Any, **kwargs: Any) -> Any:
        return _recorded(self, np.ndarray.reshape, *args, **kwargs)

    def ravel(self, *args: Any, **kwargs: Any) -> Any:
        return _recorded(self, np.ndarray.ravel, *args, **kwargs)

    def __setitem__(self, index: Any, value: Any) -> None:
        np.ndarray.__setitem__(self, index, value)
        if _recording is not None:
            _recording.append(lambda: np.ndarray.__setitem__(self, index, value))


def _to_device(value: Any) -> Any:
    if isinstance(value, np.generic):  # CuPy's reductions give 0-d arrays, which a graph can write again
        value = np.asarray(value)
    if isinstance(value, np.ndarray) and not isinstance(value, DeviceArray):
        return value.view(DeviceArray)
    if isinstance(value, tuple):
        return tuple(_to_device(v) for v in value)
    return value


def _on_device(function: Any, counted: str | None = None) -> Any:
    @functools.wraps(function)
    def run(*args: Any, **kwargs: Any) -> Any:
        if counted:
            COUNTS[counted] += 1
        return _to_device(_recorded(None, function, *args, **kwargs))
    return run


# --- CUDA graphs ----------------------------------------------------------------------
_recording: list[Any] | None = None  # while a stream captures: how to redo each device operation


def _recorded(array: Any, function: Any, *args: Any, **kwargs: Any) -> Any:
    """``function(array, *args)`` (or ``function(*args)``), kept while a graph is captured as how to compute
    it again into the arrays it returned, unless they are views (of an argument): those read their base."""
    call = (lambda: function(array, *args, **kwargs)) if array is not None else (lambda: function(*args, **kwargs))
    result = call()
    if _recording is None:
        return result
    sources = [a for a in (array, *args, *kwargs.values()) if isinstance(a, np.ndarray)]
    made = [r for r in (result if isinstance(result, tuple) else (result,))
            if isinstance(r, np.ndarray) and not any(np.may_share_memory(r, a) for a in sources)]
    if made:
        def redo() -> None:
            fresh = call()
            for old, new in zip(made, fresh if isinstance(fresh, tuple) else (fresh,)):
                np.asarray(old)[...] = new
        _recording.append(redo)
    return result


def _refuse_host_read() -> None:
    """Reading a value on the host waits for the device, which a stream being captured cannot do."""
    if _recording is not None:
        raise McalcError("a device value was read on the host while a CUDA graph was captured "
                         "(a GPU refuses that: keep the value on the device)")


class _Graph:
    """A captured graph: ``launch()`` redoes its operations in the order they were captured."""

    def __init__(self, operations: list[Any]) -> None:
        self.operations = operations

    def launch(self) -> None:
        for redo in self.operations:
            redo()


class _Stream:
    """CuPy's ``cuda.Stream``: work runs at once; ``begin_capture`` … ``end_capture`` records a graph."""

    def __init__(self, non_blocking: bool = False) -> None:
        self.ptr = 0

    def __enter__(self) -> _Stream:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def begin_capture(self) -> None:
        global _recording
        if _recording is not None:
            raise McalcError("a graph is already being captured")
        _recording = []

    def end_capture(self) -> _Graph:
        global _recording
        operations, _recording = _recording or [], None
        return _Graph(operations)


def _empty(shape: Any, dtype: Any = float, order: str = "C") -> DeviceArray:
    """Poisoned: a kernel that leaves an entry unwritten leaves NaN there."""
    out = np.empty(shape, dtype=dtype, order=order)
    if out.dtype.kind in "fc":
        out.fill(np.nan)
    return out.view(DeviceArray)


class _Namespace(types.ModuleType):
    """A module whose missing attributes are ``source``'s, functions returning device arrays."""

    def __init__(self, name: str, source: types.ModuleType) -> None:
        super().__init__(name)
        self._source = source

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._source, name)
        if isinstance(value, types.ModuleType):
            return _Namespace(f"{self.__name__}.{name}", value)
        if not callable(value) or isinstance(value, type):
            return value
        return _on_device(value, "fill" if self.__name__ == "cupy" and name in _FILLS else None)


# --- kernels ---------------------------------------------------------------------------
def _parameters(signature: str) -> list[tuple[bool, str]]:
    """Each parameter as (is a pointer, its element or scalar type), e.g. (True, 'float'), (False, 'long long')."""
    kinds = []
    for parameter in (p.strip() for p in signature.split(",") if p.strip()):
        words = parameter.replace("*", " * ").replace("__restrict__", "").split()[:-1]  # the name dropped
        kinds.append(("*" in words, " ".join(w for w in words if w not in ("const", "*"))))
    return kinds


def _launcher(name: str, kinds: list[tuple[bool, str]], barriers: bool) -> str:
    """A host function that unpacks CUDA's argument array (one pointer per argument) and emulates the launch."""
    arguments = ", ".join(f"*({kind}{'*' if pointer else ''}*)args[{i}]" for i, (pointer, kind) in enumerate(kinds))
    return (f'extern "C" void mcalc_launch_{name}(unsigned grid, unsigned block, void** args) {{\n'
            f"    mcalc_emulate(grid, block, {'true' if barriers else 'false'}, [&] {{ {name}({arguments}); }});\n}}\n")


def _compiler() -> str:
    for tool in (os.environ.get("CXX"), "g++", "clang++"):
        if tool and shutil.which(tool):
            return tool
    raise McalcError("the CUDA emulator needs a C++20 compiler (g++ or clang++) on the PATH")


def unavailable_reason() -> str:
    """Why the emulator cannot run here ('' when it can)."""
    try:
        _compiler()
    except McalcError as exc:
        return str(exc)
    return ""


class RawModule:
    """CuPy's ``RawModule``: the source's kernels compiled for the CPU (once per source, cached on disk)."""

    def __init__(self, code: str, options: tuple = (), **_: Any) -> None:
        self.code = code
        matches = list(_KERNEL.finditer(code))
        self.kernels = {m.group(1): _parameters(m.group(2)) for m in matches}
        # a kernel's body runs from its signature to the next one's
        ends = [m.start() for m in matches[1:]] + [len(code)]
        self._barriers = {m.group(1) for m, end in zip(matches, ends) if "__syncthreads" in code[m.end():end]}
        self._library: ctypes.CDLL | None = None

    def compile(self) -> ctypes.CDLL:
        if self._library is None:
            source = _PRELUDE + self.code + "\n" + "".join(
                _launcher(name, kinds, name in self._barriers) for name, kinds in self.kernels.items())
            digest = hashlib.sha256(source.encode()).hexdigest()[:24]
            directory = cache_directory() / "emulator"
            library = directory / f"kernels_{digest}.so"
            if not library.exists():
                directory.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=directory) as tmp:
                    path = Path(tmp) / "kernels.cpp"
                    path.write_text(source)
                    built = Path(tmp) / library.name
                    done = subprocess.run([_compiler(), "-std=c++20", "-O0", "-shared", "-fPIC", "-pthread",
                                           "-o", str(built), str(path)], capture_output=True, text=True)
                    if done.returncode:
                        raise McalcError(f"the CUDA emulator could not compile the kernels:\n{done.stderr.strip()}")
                    os.replace(built, library)  # atomic: a half-written library is never loaded
            self._library = ctypes.CDLL(str(library))
        return self._library

    def get_function(self, name: str) -> EmulatedKernel:
        if name not in self.kernels:
            raise McalcError(f"no kernel '{name}' in the module's source")
        return EmulatedKernel(name, self.kernels[name], getattr(self.compile(), f"mcalc_launch_{name}"))


class EmulatedKernel:
    """One kernel: called as CuPy calls a raw kernel, ``kernel(grid, block, args)``."""

    def __init__(self, name: str, kinds: list[tuple[bool, str]], launch: Any) -> None:
        self.name, self.kinds, self._launch = name, kinds, launch

    def __call__(self, grid: tuple, block: tuple, args: tuple) -> None:
        if len(args) != len(self.kinds):
            raise McalcError(f"kernel {self.name} takes {len(self.kinds)} arguments, given {len(args)}")
        if any(int(d) != 1 for d in (*grid[1:], *block[1:])):
            raise McalcError(f"kernel {self.name}: the emulator runs one-dimensional grids and blocks only")
        held, pointers = [], []  # `held` keeps each argument's storage alive through the call
        for i, ((pointer, kind), value) in enumerate(zip(self.kinds, args)):
            if pointer:
                element = _SCALARS[kind][1]
                if not isinstance(value, np.ndarray) or value.dtype != element or not value.flags.c_contiguous:
                    raise McalcError(f"kernel {self.name}, argument {i}: needs a C-contiguous {np.dtype(element)} "
                                     f"array, given {type(value).__name__} "
                                     f"{getattr(value, 'dtype', '')} {getattr(value, 'strides', '')}")
                storage = ctypes.c_void_p(value.ctypes.data)
            else:
                c_type, numpy_type = _SCALARS[kind]
                if type(value) is not numpy_type:  # CuPy would pass the bytes of another type unchecked
                    raise McalcError(f"kernel {self.name}, argument {i}: needs a {np.dtype(numpy_type)} scalar, "
                                     f"given {type(value).__name__}")
                storage = c_type(value)
            held.append(storage)
            pointers.append(ctypes.cast(ctypes.pointer(storage), ctypes.c_void_p))
        COUNTS["kernel"] += 1
        argument_array = (ctypes.c_void_p * len(pointers))(*pointers)
        launch = functools.partial(self._launch, ctypes.c_uint(int(grid[0])), ctypes.c_uint(int(block[0])),
                                   argument_array)
        launch()
        if _recording is not None:  # the same pointers again: ``args`` keeps the arrays, ``held`` the scalars
            _recording.append(lambda: (args, held, launch()))


# --- the module ------------------------------------------------------------------------
def emulated_cupy() -> types.ModuleType:
    """A module that stands for ``cupy``: NumPy's functions on :class:`DeviceArray`, kernels run on the CPU."""
    cupy = _Namespace("cupy", np)
    cupy.ndarray = DeviceArray
    cupy.RawModule = RawModule
    cupy.empty = _empty
    cupy.asnumpy = lambda a: np.asarray(a).view(np.ndarray)
    device = types.SimpleNamespace(synchronize=lambda: None)
    cupy.cuda = types.SimpleNamespace(Device=lambda *_: device, Stream=_Stream,
                                      MemoryPool=lambda: types.SimpleNamespace(malloc=None),
                                      using_allocator=lambda *_: contextlib.nullcontext(),
                                      runtime=types.SimpleNamespace(getDeviceCount=lambda: 1))
    # cuBLAS's gemm with alpha, which runtime.cuda_graph.matmul calls on a GPU: one product
    cupy.scaled_matmul = _on_device(lambda a, b, alpha: np.multiply(np.matmul(np.asarray(a), np.asarray(b)), alpha),
                                    counted="matmul")
    cupy.EMULATED = True  # what must differ from CuPy (cuBLAS is not there to call) asks for this
    return cupy


@contextlib.contextmanager
def installed() -> Iterator[types.ModuleType]:
    """``import cupy`` gives the emulator inside the block, and generated CuPy code is imported afresh
    (a module imported under the real CuPy keeps that one, and the reverse)."""
    saved = {name: module for name, module in sys.modules.items()
             if name == "cupy" or name.startswith(("cupy.", "_mcalc_generated_cupy_"))}
    for name in saved:
        del sys.modules[name]
    sys.modules["cupy"] = emulated_cupy()
    try:
        yield sys.modules["cupy"]
    finally:
        for name in [n for n in sys.modules if n == "cupy" or n.startswith("_mcalc_generated_cupy_")]:
            del sys.modules[name]
        sys.modules.update(saved)
