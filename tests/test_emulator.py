"""The CPU emulator of the CuPy backend runs CUDA kernels as a GPU would, and refuses what a GPU would get wrong."""
import numpy as np
import pytest

from mcalc.errors import McalcError
from mcalc.runtime import emulator

pytestmark = pytest.mark.skipif(bool(emulator.unavailable_reason()), reason=emulator.unavailable_reason())

SOURCE = r"""
extern "C" __global__ void scaled_add(const double* __restrict__ a, const double* __restrict__ b, const double c0,
                                      double* __restrict__ out, const long long n)
{
    const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i >= n) return;
    out[i] = c0 * a[i] + b[i];
}

extern "C" __global__ void row_sums(const float* __restrict__ a, float* __restrict__ out, const long long cols)
{
    const long long r = blockIdx.x;
    __shared__ float partial[64];
    float acc = 0;
    for (long long c = threadIdx.x; c < cols; c += blockDim.x) acc += a[r * cols + c];
    partial[threadIdx.x] = acc;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) partial[threadIdx.x] += partial[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[r] = partial[0];
}
"""


@pytest.fixture(scope="module")
def cp():
    with emulator.installed() as cupy:
        yield cupy


@pytest.fixture(scope="module")
def kernels(cp):
    module = cp.RawModule(code=SOURCE)
    return module.get_function("scaled_add"), module.get_function("row_sums")


def test_elementwise_kernel_over_several_blocks(cp, kernels):
    scaled_add, _ = kernels
    rng = np.random.default_rng(0)
    a, b = (cp.asarray(rng.normal(size=1000)) for _ in range(2))
    out = cp.empty(1000)
    scaled_add(((1000 + 127) // 128,), (128,), (a, b, np.float64(2.5), out, np.int64(1000)))
    np.testing.assert_allclose(out.get(), 2.5 * a.get() + b.get(), rtol=1e-15)


def test_block_reduction_with_shared_memory_and_barriers(cp, kernels):
    """Each thread of a block is a thread here, so a missing or misplaced barrier shows as a wrong sum."""
    _, row_sums = kernels
    a = cp.asarray(np.random.default_rng(1).normal(size=(5, 301)), dtype=np.float32)
    out = cp.empty((5,), dtype=np.float32)
    row_sums((5,), (64,), (a, out, np.int64(301)))
    np.testing.assert_allclose(out.get(), a.get().sum(axis=1), rtol=1e-5)


def test_unwritten_outputs_are_nan(cp, kernels):
    scaled_add, _ = kernels
    a = cp.asarray(np.ones(10))
    out = cp.empty(10)
    scaled_add((1,), (32,), (a, a, np.float64(1.0), out, np.int64(6)))  # n too small: four entries unwritten
    assert np.isnan(out.get()[6:]).all() and (out.get()[:6] == 2).all()


@pytest.mark.parametrize("wrong, message", [
    ((lambda a, out: (a, a, 1.0, out, np.int64(4))), "needs a float64 scalar, given float"),
    ((lambda a, out: (a, a, np.float32(1.0), out, np.int64(4))), "needs a float64 scalar, given float32"),
    ((lambda a, out: (a[::2], a[::2], np.float64(1.0), out, np.int64(4))), "C-contiguous float64 array"),
    ((lambda a, out: (a.astype(np.float32), a, np.float64(1.0), out, np.int64(4))), "C-contiguous float64 array"),
    ((lambda a, out: (a, a, out, np.int64(4))), "takes 5 arguments, given 4"),
])
def test_arguments_a_gpu_would_misread_are_refused(cp, kernels, wrong, message):
    scaled_add, _ = kernels
    a, out = cp.asarray(np.ones(8)), cp.empty(4)
    with pytest.raises(McalcError, match=message):
        scaled_add((1,), (32,), wrong(a, out))


def test_compile_errors_are_reported(cp):
    with pytest.raises(McalcError, match="could not compile"):
        cp.RawModule(code='extern "C" __global__ void broken(double* out) { out[0] = undefined_name; }').compile()


def test_arrays_stand_for_device_arrays(cp):
    from mcalc.runtime.blocks import namespace

    x = cp.asarray(np.arange(6.0).reshape(2, 3))
    assert isinstance(x, cp.ndarray) and namespace(x) is cp and isinstance(x.get(), np.ndarray)
    assert isinstance(x @ x.T, cp.ndarray) and isinstance(cp.linalg.eigh(x @ x.T)[1], cp.ndarray)


def test_device_operations_are_counted(cp, kernels):
    scaled_add, _ = kernels
    a = cp.asarray(np.ones((3, 3)))
    emulator.COUNTS.clear()
    b = (a @ a) * 2.0 + a.sum(axis=0) + cp.ones((3, 1))
    scaled_add((1,), (32,), (a, b, np.float64(1.0), cp.empty((3, 3)), np.int64(9)))  # empty: no fill
    assert emulator.COUNTS == {"matmul": 1, "elementwise": 3, "reduce": 1, "kernel": 1, "fill": 1}


def test_a_captured_graph_redoes_its_operations_on_the_same_arrays(cp, kernels):
    """Capture runs each operation and keeps how to redo it: ufuncs, reductions (0-d, as CuPy's), fills,
    indexed reads and writes, copies and kernel launches; a replay writes the same arrays again from the
    inputs' new contents, and is not counted op by op (a graph is one launch)."""
    scaled_add, _ = kernels
    a = cp.asarray(np.arange(4.0))
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        doubled = a * 2.0
        c = cp.zeros(4)
        c[1:3] = doubled[1:3]
        ends = doubled[[0, 3]]
        copied = cp.array(doubled, copy=True)
        out = cp.empty(4)
        scaled_add((1,), (32,), (a, copied, np.float64(1.0), out, np.int64(4)))
        total = out.sum()
        graph = stream.end_capture()
    assert total.shape == () and float(total) == 18.0
    a[...] = np.array([1.0, -1.0, 2.0, 0.5])
    emulator.COUNTS.clear()
    graph.launch()
    assert not emulator.COUNTS
    np.testing.assert_array_equal(doubled.get(), [2.0, -2.0, 4.0, 1.0])
    np.testing.assert_array_equal(c.get(), [0.0, -2.0, 4.0, 0.0])
    np.testing.assert_array_equal(ends.get(), [2.0, 1.0])
    np.testing.assert_array_equal(out.get(), 3 * a.get())
    assert float(total) == 3 * 2.5
    with stream:
        stream.begin_capture()
        try:
            with pytest.raises(McalcError, match="read on the host while a CUDA graph was captured"):
                float((a * 2.0).sum())
        finally:
            stream.end_capture()
