"""Array helpers the generated code calls, for NumPy and CuPy arrays alike.

Each takes a matrix or a stack of them (leading axes: the samples of a batch, as the batched form of a
per-sample rule computes them) and works on the last two axes."""
from __future__ import annotations

import itertools
import math
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import McalcError
from ..modes import Projection
from .blocks import GramFactor, namespace
from .cuda_graph import matmul


def plus_diagonal(m: Any, v: Any, copy: bool) -> Any:
    """m + diag(v); ``m`` is written in place unless it is an argument (``copy``) or a view. A stack of
    diagonals added to one matrix gives a stack."""
    xp = namespace(m)
    v = xp.asarray(v, dtype=m.dtype)
    stack = v.shape[:-2]
    if stack and m.shape[:-2] != stack:
        out = xp.array(xp.broadcast_to(m, stack + m.shape[-2:]))
    else:
        out = xp.array(m, copy=True) if copy or m.base is not None else m
    index = xp.arange(out.shape[-1])
    out[..., index, index] += v.reshape(stack + (-1,)) if v.ndim >= 2 else xp.reshape(v, (-1,))
    return out


def add_into(out: Any, *terms: Any) -> Any:
    """``out`` + every term, written into ``out`` (a fresh array of the sum's shape that nothing else reads):
    a sum of several matrices makes no temporary per term. Where ``out`` is column-major beside a
    row-major term, the sum is a new row-major array, as NumPy's ``out + term`` would make it: the
    result's memory order, which later sums add in, is the expression's."""
    for term in terms:
        if _keeps_order(out, term):
            out += term
        else:
            out = out + term
    return out


def multiply_into(out: Any, *factors: Any) -> Any:
    """``out`` ⊙ every factor (or times a number), written into ``out``, as :func:`add_into`."""
    for factor in factors:
        if _keeps_order(out, factor):
            out *= factor
        else:
            out = out * factor
    return out


def _keeps_order(out: Any, operand: Any) -> bool:
    """Whether NumPy's ``out ∘ operand`` has ``out``'s memory order: ``out`` row-major, or the operand
    column-major (a vector or a number is both)."""
    return out.flags.c_contiguous or getattr(operand, "flags", out.flags).f_contiguous


def softmax(x: Any) -> Any:
    """Column-wise softmax."""
    xp = namespace(x)
    e = xp.exp(x - x.max(axis=-2, keepdims=True))
    return e / e.sum(axis=-2, keepdims=True)


def log_softmax(x: Any) -> Any:
    """Column-wise log-softmax, in the stable form."""
    xp = namespace(x)
    shifted = x - x.max(axis=-2, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=-2, keepdims=True))


def transpose(a: Any) -> Any:
    """Aᵀ of a matrix or of each matrix of a stack."""
    return namespace(a).swapaxes(a, -1, -2)


def diagonal_matrix(v: Any) -> Any:
    """diag(v) of a column (n, 1), or of each column of a stack (…, n, 1)."""
    xp = namespace(v)
    return xp.eye(v.shape[-2], dtype=v.dtype) * v


def vec(a: Any) -> Any:
    """vec A (columns stacked) of a matrix, or of each matrix of a stack."""
    return transpose(a).reshape(a.shape[:-2] + (-1, 1))


STACK_LIMIT_BYTES = 2**31  # a stack of per-sample Kronecker products larger than this is refused
FACTORED_HINT = "use the Kronecker-factored approximation (--approximation 6-kfac, or approximation='6-kfac')"


def check_stack(samples: int, rows: int, cols: int, itemsize: int) -> None:
    """Refuses a stack of per-sample curvature blocks (the exact (6) block of a large parameter, formed per
    sample) larger than :data:`STACK_LIMIT_BYTES`, with a clear error, before it is allocated."""
    size = samples * rows * cols * itemsize
    if size > STACK_LIMIT_BYTES:
        raise McalcError(f"an exact (6) curvature block would be formed sample by sample: {samples} samples of "
                         f"{rows} × {cols}, {size / 2**30:.1f} GiB; {FACTORED_HINT}")


def check_intermediate(entries: int, itemsize: int) -> None:
    """Refuses a per-sample curvature block whose contraction (:mod:`.tensor_network`) would make an array
    larger than :data:`STACK_LIMIT_BYTES`, with a clear error, before anything is computed."""
    size = entries * itemsize
    if size > STACK_LIMIT_BYTES:
        raise McalcError(f"an exact (6) curvature block would be computed through an array of {entries:,} values "
                         f"({size:,} bytes) over the limit of {STACK_LIMIT_BYTES:,}; {FACTORED_HINT}")


def kron_product(a: Any, b: Any) -> Any:
    """A ⊗ B of matrices, or of the matrices of stacks, sample by sample (M&N 2.2). A stack larger than
    :data:`STACK_LIMIT_BYTES` (the exact (6) block of a large inner parameter, formed per sample) is refused
    with a clear error instead of exhausting the memory."""
    xp = namespace(a if hasattr(a, "shape") else b)
    stack = max(a.shape[:-2], b.shape[:-2], key=len)
    if stack:
        check_stack(int(np.prod(stack, dtype=np.int64)), a.shape[-2] * b.shape[-2], a.shape[-1] * b.shape[-1],
                    a.dtype.itemsize)
    product = xp.einsum("...ij,...kl->...ikjl", a, b)
    return product.reshape(product.shape[:-4] + (a.shape[-2] * b.shape[-2], a.shape[-1] * b.shape[-1]))


# --- per-sample matrices: (rows, B, cols) arguments, (rows, cols·B) side by side in a program -----
def side_by_side(a: Any) -> Any:
    """A batch of per-sample matrices, (rows, B, cols), as the samples side by side, (rows, B·cols), sample
    i in columns i·cols … (i+1)·cols − 1: a view."""
    return a.reshape(a.shape[0], -1)


def samples_first(a: Any) -> Any:
    """A batch argument as a stack of its samples, (B, rows, cols): a per-sample rule's operand."""
    return namespace(a).moveaxis(a, 1, 0) if a.ndim == 3 else a.T[:, :, None]


def sample_product(m: Any, v: Any) -> Any:
    """Each sample's block of the side-by-side ``m`` (rows, B·c) times ``v`` (c, c′): (rows, B·c′)."""
    return matmul(m.reshape(-1, v.shape[0]), v).reshape(m.shape[0], -1)


def sample_matmul(left: Any, right: Any) -> Any:
    """Lᵢ Rᵢ for every sample of the side-by-side ``left`` (rows, B·k) and ``right`` (k, B·c): (rows, B·c), one
    batched product."""
    xp, k = namespace(left), right.shape[0]
    lefts = xp.moveaxis(left.reshape(left.shape[0], -1, k), 1, 0)  # (B, rows, k)
    rights = xp.moveaxis(right.reshape(k, lefts.shape[0], -1), 1, 0)  # (B, k, c)
    return xp.moveaxis(matmul(lefts, rights), 0, 1).reshape(left.shape[0], -1)


def sample_transpose(m: Any, cols: int) -> Any:
    """Each sample's (rows, cols) block of the side-by-side ``m`` transposed: (cols, B·rows)."""
    blocks = m.reshape(m.shape[0], -1, cols)  # (rows, B, cols)
    return namespace(m).ascontiguousarray(blocks.transpose(2, 1, 0)).reshape(cols, -1)


def _permuted(a: Any, first: tuple[int, int], second: tuple[int, int]) -> Any:
    """``a`` with two pairs of axes swapped in turn, each copied: NumPy's copy of a permutation of three axes
    at once is not cache-blocked and, for a layer's activations, two simple copies take half its time
    (13 → 7 ms for 784 × 64 × 64 float32 here); CuPy's one kernel reads each entry once."""
    xp = namespace(a)
    if xp is not np:
        return xp.ascontiguousarray(a.swapaxes(*first).swapaxes(*second))
    return np.ascontiguousarray(np.ascontiguousarray(a.swapaxes(*first)).swapaxes(*second))


def vec_of_samples(m: Any, cols: int) -> Any:
    """vec of each sample's (rows, cols) block of the side-by-side ``m``, one column per sample (of each
    matrix of a stack)."""
    lead, rows = m.shape[:-2], m.shape[-2]
    blocks = m.reshape(lead + (rows, -1, cols))  # (…, rows, B, cols) → (…, rows, cols, B) → (…, cols, rows, B)
    return _permuted(blocks, (-1, -2), (-3, -2)).reshape(lead + (rows * cols, -1))


def unvec_of_samples(m: Any, rows: int) -> Any:
    """The inverse of :func:`vec_of_samples`: columns vec(Xᵢ) to the blocks Xᵢ (rows, c) side by side."""
    lead = m.shape[:-2]
    cols = m.shape[-2] // rows
    blocks = m.reshape(lead + (cols, rows, -1))  # (…, cols, rows, B) → (…, rows, cols, B) → (…, rows, B, cols)
    return _permuted(blocks, (-3, -2), (-2, -1)).reshape(lead + (rows, -1))


# --- a convolution's patches: unfold (im2col) and its adjoint fold (col2im) ---------------------
# Over n spatial dimensions: a signal's (L,), an image's (H, W). Every hyper-parameter is a tuple with
# one entry per dimension; an input's N = ΠLᵢ positions are its columns, row-major (PyTorch's order).
Dims = tuple[int, ...]


def pads(padding: tuple) -> tuple[tuple[int, int], ...]:
    """A padding per dimension, each a number or a pair (before, after), as pairs."""
    return tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)


def grid(size: Dims, kernel: Dims, stride: Dims, padding: tuple, dilation: Dims) -> Dims:
    """The patches along each dimension of an input of ``size``."""
    return tuple((n + sum(p) - d * (k - 1) - 1) // s + 1
                 for n, k, s, p, d in zip(size, kernel, stride, pads(padding), dilation))


def _windows(tap: Dims, stride: Dims, dilation: Dims, patches: Dims) -> tuple:
    """The strided slices of a padded input that tap ``tap`` reads, one per dimension."""
    return tuple(slice(i * d, i * d + s * (g - 1) + 1, s) for i, s, d, g in zip(tap, stride, dilation, patches))


def unfold(x: Any, kernel: Dims, stride: Dims, padding: tuple, dilation: Dims, size: Dims) -> Any:
    """The patches of inputs (…, c, N·n), n of ``size`` side by side, as (…, c·taps, T·n): row ch·taps + j,
    column i·T + t holds sample i's input at tap j of patch t (0 in the padding), j and t row-major over
    the dimensions. One strided copy per tap: the loop runs over the kernel's taps, never over the samples."""
    xp = namespace(x)
    lead, channels, n = x.shape[:-2], x.shape[-2], len(size)
    patches = grid(size, kernel, stride, padding, dilation)
    inputs = x.reshape(lead + (channels, -1) + tuple(size))
    if any(padding):
        inputs = xp.pad(inputs, [(0, 0)] * (inputs.ndim - n) + list(pads(padding)))
    out = xp.empty(lead + (channels,) + tuple(kernel) + (inputs.shape[-n - 1],) + patches, dtype=x.dtype)
    for tap in itertools.product(*map(range, kernel)):
        window = (Ellipsis, *_windows(tap, stride, dilation, patches))
        out[(Ellipsis, *tap) + (slice(None),) * (n + 1)] = inputs[window]
    return out.reshape(lead + (channels * math.prod(kernel), -1))


def fold(u: Any, kernel: Dims, stride: Dims, padding: tuple, dilation: Dims, size: Dims) -> Any:
    """The adjoint of :func:`unfold`: patches (…, c·taps, T·n) added back into inputs (…, c, N·n)."""
    channels, patches = u.shape[-2] // math.prod(kernel), grid(size, kernel, stride, padding, dilation)
    columns = u.reshape(u.shape[:-2] + (channels,) + tuple(kernel) + (-1,) + patches)
    return _fold_taps(lambda tap: columns[(Ellipsis, *tap) + (slice(None),) * (len(size) + 1)],
                      kernel, stride, padding, dilation, size)


def fold_repeated(v: Any, mask: Any, kernel: Dims, stride: Dims, padding: tuple, dilation: Dims, size: Dims) -> Any:
    """:func:`fold` of (v ⊗ 1_taps) ⊙ mask, v (…, c, T·n) one value per channel and patch, read at every tap
    (max pooling's δZ and its window maxima ``mask``; average pooling's, with ``mask`` None).

    A mask that :func:`window_argmax` made for NumPy carries one 1 per window: each value is added at the
    input its window selected, one scatter (``np.add.at``) over the windows. Any other mask: v times a
    tap's mask is added in place, tap by tap, so the taps·size array of the repeat is never made."""
    patches = grid(size, kernel, stride, padding, dilation)
    selected = _selected_inputs(mask)
    if selected is not None:  # v.size / T rows of inputs, each of n = Π size entries
        out = np.zeros(v.size // math.prod(patches) * math.prod(size), dtype=v.dtype)
        np.add.at(out, selected, v.reshape(-1))
        return out.reshape(v.shape[:-1] + (-1,))
    values = v.reshape(v.shape[:-1] + (-1,) + patches)
    if mask is None:
        return _fold_taps(lambda tap: values, kernel, stride, padding, dilation, size)
    masks = mask.reshape(v.shape[:-1] + tuple(kernel) + (-1,) + patches)
    return _fold_taps(lambda tap: values * masks[(Ellipsis, *tap) + (slice(None),) * (len(size) + 1)],
                      kernel, stride, padding, dilation, size)


def _fold_taps(tap_values: Callable[[tuple[int, ...]], Any], kernel: Dims, stride: Dims, padding: tuple,
               dilation: Dims, size: Dims) -> Any:
    """Σ over the taps of ``tap_values(tap)`` (…, c, N, *patches), each added at the input positions the tap
    reads; the inputs (…, c, N·n). One strided addition per tap: never a loop over the samples."""
    first = tap_values((0,) * len(kernel))
    xp, n = namespace(first), len(size)
    padded = tuple(length + sum(p) for length, p in zip(size, pads(padding)))
    patches = grid(size, kernel, stride, padding, dilation)
    out = xp.zeros(first.shape[:-n] + padded, dtype=first.dtype)
    for tap in itertools.product(*map(range, kernel)):
        out[(Ellipsis, *_windows(tap, stride, dilation, patches))] += first if not any(tap) else tap_values(tap)
    inside = tuple(slice(p, p + length) for (p, _), length in zip(pads(padding), size))
    return out[(Ellipsis, *inside)].reshape(first.shape[:-n - 1] + (-1,))


def window_argmax(x: Any, kernel: Dims, stride: Dims, padding: tuple, dilation: Dims, size: Dims) -> Any:
    """The 0/1 mask (…, c·taps, T·n) of each window's first maximum in the patches of :func:`unfold` of inputs
    x (…, c, N·n), read from x's windows without making the patches: per channel, position and sample, a 1
    at the first of its largest taps that read the input (a padded tap never does, as PyTorch pads max
    pooling with −∞).

    Tap by tap, each a strided slice (an argmax over the taps' axis, in the middle, is many times slower):
    the maxima, then the first tap that holds one, counted as the taps before it (the number of leading taps
    that do not; a comparison and a count per tap, where writing the index where each tap holds one was 7×
    slower). A NumPy mask is read-only and remembers the input position each window selected, which
    :func:`select_taps` gathers from and :func:`fold_repeated` scatters to."""
    xp, n, taps = namespace(x), len(size), math.prod(kernel)
    lead, channels = x.shape[:-2], x.shape[-2]
    patches = grid(size, kernel, stride, padding, dilation)
    inputs = x.reshape(lead + (channels, -1) + tuple(size))
    if any(padding):
        inputs = xp.pad(inputs, [(0, 0)] * (inputs.ndim - n) + list(pads(padding)), constant_values=-xp.inf)
    offsets = list(itertools.product(*map(range, kernel)))
    positions = _tap_positions(kernel, stride, padding, dilation, size)  # (taps, T), −1 in the padding
    padded = positions < 0

    def tap(j: int) -> Any:  # (…, c, N, *patches)
        return inputs[(Ellipsis, *_windows(offsets[j], stride, dilation, patches))]

    best = xp.maximum(tap(0), tap(1)) if taps > 1 else tap(0)
    for j in range(2, taps):
        xp.maximum(best, tap(j), out=best)
    first = xp.zeros(best.shape, dtype=np.min_scalar_type(taps))
    missed = None  # where taps 0…j all miss the window's maximum
    for j in range(taps - 1):
        misses = tap(j) != best
        if padded[j].any():  # a padded tap (−∞) misses even a window of −∞
            misses |= xp.asarray(padded[j]).reshape(patches)
        missed = misses if missed is None else xp.logical_and(missed, misses, out=missed)
        first += missed
    first = first.reshape(lead + (channels, -1))
    mask = xp.empty(lead + (channels, taps, first.shape[-1]), dtype=x.dtype)
    xp.equal(first[..., None, :], xp.arange(taps, dtype=first.dtype)[:, None], out=mask)
    mask = mask.reshape(lead + (channels * taps, -1))
    if xp is np:
        _remember_selection(mask, first, positions, math.prod(size))
    return mask


def select_taps(x: Any, mask: Any, kernel: Dims, stride: Dims, padding: tuple, dilation: Dims, size: Dims) -> Any:
    """(I_c ⊗ 1_tapsᵀ)(mask ⊙ unfold(x)) for inputs x (…, c, N·n): each window's input where ``mask`` is 1, as
    (…, c, T·n), max pooling's output (x its input) or tangent (x the input's). A mask that
    :func:`window_argmax` made for NumPy is read as the inputs its windows selected, one gather; any other
    is applied to the patches, whose taps are then summed."""
    selected = _selected_inputs(mask)
    if selected is not None:
        return x.reshape(-1)[selected].reshape(x.shape[:-1] + (-1,))
    patches = mask * unfold(x, kernel, stride, padding, dilation, size)
    return patches.reshape(patches.shape[:-2] + (-1, math.prod(kernel), patches.shape[-1])).sum(axis=-2)


def _tap_positions(kernel: Dims, stride: Dims, padding: tuple, dilation: Dims, size: Dims) -> np.ndarray:
    """(taps, T): the flat position in an input of ``size`` that each tap of each patch reads, −1 where it
    falls in the padding: :func:`unfold` of the positions counted from 1, its padding 0."""
    return unfold(np.arange(1, math.prod(size) + 1).reshape(1, -1), kernel, stride, padding, dilation, size) - 1


# window_argmax's NumPy masks, by id, with a weak reference to the mask: the flat input position that each
# window selected; an entry goes when its mask does
_SELECTIONS: dict[int, tuple[weakref.ref, np.ndarray]] = {}


def _remember_selection(mask: np.ndarray, first: np.ndarray, positions: np.ndarray, size: int) -> None:
    """Keeps, for ``mask`` (…, c·taps, T·n), the flat position in the inputs (…, c, N·n), n = ``size``, of
    each window's selected tap ``first`` (…, c, T·n); the mask is made read-only, so that the positions
    stay its own."""
    taps, patches = positions.shape
    rows_and_samples = first.size // patches  # (…, c) rows times the N samples
    within = np.take(positions.T.reshape(-1), first.reshape(-1, patches) + np.arange(patches) * taps)
    selected = (np.arange(rows_and_samples, dtype=np.intp)[:, None] * size + within).reshape(-1)
    mask.flags.writeable = False
    key = id(mask)
    _SELECTIONS[key] = (weakref.ref(mask, lambda ref: _SELECTIONS.pop(key, None)
                                    if _SELECTIONS.get(key, (None,))[0] is ref else None), selected)


def _selected_inputs(mask: Any) -> np.ndarray | None:
    """The inputs ``mask``'s windows selected (:func:`_remember_selection`), if window_argmax made it."""
    entry = _SELECTIONS.get(id(mask)) if mask is not None else None
    return entry[1] if entry is not None and entry[0]() is mask else None


def unfold_rows(m: Any, kernel: Dims, stride: Dims, padding: tuple, dilation: Dims, size: Dims, channels: int) -> Any:
    """P M for P the matrix of unfold (vec unfold X = P vec X): each column of M a vec X, without P.

    M's rows, the column-stacking vec of a channels × positions matrix, are read in place as (positions…,
    channels) and each tap's strided window is copied into P M's rows, read as (patches…, channels,
    taps…): M's columns stay innermost, so no layout copy is made (an input block of a convolution,
    Pᵀ (I ⊗ Kᵀ) 𝓗z (I ⊗ K) P, is folded and unfolded along its rows and columns)."""
    xp, lead, cols = namespace(m), m.shape[:-2], m.shape[-1]
    patches, stack = grid(size, kernel, stride, padding, dilation), (slice(None),) * (m.ndim - 2)
    inputs = m.reshape(lead + tuple(size) + (channels, cols))
    if any(padding):
        inputs = xp.pad(inputs, [(0, 0)] * len(lead) + list(pads(padding)) + [(0, 0), (0, 0)])
    out = xp.empty(lead + patches + (channels,) + tuple(kernel) + (cols,), dtype=m.dtype)
    for tap in itertools.product(*map(range, kernel)):
        out[stack + (slice(None),) * (len(size) + 1) + tap] = inputs[stack + _windows(tap, stride, dilation, patches)]
    return out.reshape(lead + (-1, cols))


def fold_rows(m: Any, kernel: Dims, stride: Dims, padding: tuple, dilation: Dims, size: Dims, channels: int) -> Any:
    """Pᵀ M: each column of M a vec of patches, folded back into a vec of the input; the adjoint of
    :func:`unfold_rows`, its rows read in place as (patches…, channels, taps…), one strided addition
    per tap, in the taps' order as :func:`fold` adds them."""
    xp, lead, cols = namespace(m), m.shape[:-2], m.shape[-1]
    patches, stack = grid(size, kernel, stride, padding, dilation), (slice(None),) * (m.ndim - 2)
    values = m.reshape(lead + patches + (channels,) + tuple(kernel) + (cols,))
    padded = tuple(length + sum(p) for length, p in zip(size, pads(padding)))
    out = xp.zeros(lead + padded + (channels, cols), dtype=m.dtype)
    for tap in itertools.product(*map(range, kernel)):
        out[stack + _windows(tap, stride, dilation, patches)] += values[stack + (slice(None),) * (len(size) + 1) + tap]
    inside = tuple(slice(p, p + length) for (p, _), length in zip(pads(padding), size))
    return out[stack + inside].reshape(lead + (-1, cols))


def block_trace(m: Any, blocks: int) -> Any:
    """Σₜ Mₜₜ: the sum of the ``blocks`` diagonal blocks of M (or of each matrix of a stack)."""
    rows, cols = m.shape[-2] // blocks, m.shape[-1] // blocks
    return namespace(m).einsum("...tatb->...ab", m.reshape(m.shape[:-2] + (blocks, rows, blocks, cols)))


def matrices_of_columns(columns: Any, rows: int) -> Any:
    """Columns vec(Xᵢ) (rows·cols, B) as the batch argument of per-sample matrices, (rows, B, cols)."""
    return unvec_of_samples(columns, rows).reshape(rows, columns.shape[1], -1)


def columns_of_matrices(batch: Any) -> Any:
    """The inverse of :func:`matrices_of_columns`; a batch of vectors (rows, B) as it is."""
    return batch if batch.ndim == 2 else vec_of_samples(side_by_side(batch), batch.shape[2])


def kron_matmul(a: Any, b: Any, m: Any) -> Any:
    """(A ⊗ B) M without forming A ⊗ B (M&N: (A ⊗ B) vec X = vec(B X Aᵀ), column by column of M); None
    stands for an identity factor: A ⊗ I is one product of M's reshape, I ⊗ B one per block of M. Any
    of the three may be a stack (the samples on leading axes)."""
    k = m.shape[-1]
    if b is None:  # (A ⊗ I_s) M: A times M's rows grouped by A's columns
        out = matmul(a, m.reshape(m.shape[:-2] + (a.shape[-1], -1)))
        return out.reshape(out.shape[:-2] + (-1, k))
    xp = namespace(m)
    s = b.shape[-1]
    blocks = m.reshape(m.shape[:-2] + (-1, s, k))  # (…, q, s, k): M's q blocks of s rows
    if a is None and m.ndim == 2 and b.ndim == 2:  # (I_q ⊗ B) M as one product over the blocks
        q = blocks.shape[0]
        return matmul(b, xp.moveaxis(blocks, 1, 0).reshape(s, -1)).reshape(-1, q, k).swapaxes(0, 1).reshape(-1, k)
    # (I_q ⊗ B) M: B times each block, as products over the stack; then (A ⊗ I_r) of that: A times its rows
    # grouped by A's columns. NumPy's einsum of the three ran one loop over all five indices, no BLAS:
    # attention's Gauss–Newton blocks over 20 positions took 14 s a pass, 3.4 s as these products
    out = matmul(b[..., None, :, :], blocks)  # (…, q, r, k)
    if a is not None:
        out = matmul(a, out.reshape(out.shape[:-3] + (out.shape[-3], -1)))  # (…, p, r·k)
    return out.reshape(out.shape[:-3 if a is None else -2] + (-1, k))


def matmul_kron(m: Any, a: Any, b: Any) -> Any:
    """M (A ⊗ B) without forming A ⊗ B: ((Aᵀ ⊗ Bᵀ) Mᵀ)ᵀ."""
    flip = lambda x: None if x is None else transpose(x)  # noqa: E731
    return transpose(kron_matmul(flip(a), flip(b), transpose(m)))


def kron_mean(a: Any, b: Any) -> Any:
    """E[Aᵢ ⊗ Bᵢ] over the samples of the stacks ``a`` (S, I, J) and ``b`` (S, K, L), one product over the
    samples, [vec A₁ … vec A_S] [vec B₁ … vec B_S]ᵀ / S, its (I·J) × (K·L) entries then ordered as A ⊗ B's
    (M&N 2.2): the stack of S Kronecker products is never formed. A factor the samples share is taken out
    of the mean. A block larger than :data:`STACK_LIMIT_BYTES` is refused, as :func:`kron_product` refuses."""
    if a.ndim == 2 or b.ndim == 2:
        return kron_product(batch_mean(a), batch_mean(b))
    (samples, i, j), (_, k, l) = a.shape, b.shape
    size = i * j * k * l * a.dtype.itemsize
    if size > STACK_LIMIT_BYTES:
        raise McalcError(f"an exact (6) curvature block of {i * k} × {j * l} would be {size / 2**30:.1f} GiB; "
                         f"{FACTORED_HINT}")
    pairs = matmul(transpose(a.reshape(samples, i * j)), b.reshape(samples, k * l), 1.0 / samples)
    return namespace(a).ascontiguousarray(pairs.reshape(i, j, k, l).swapaxes(1, 2)).reshape(i * k, j * l)


def batch_mean(a: Any) -> Any:
    """The mean over the samples of a stack (its first axis); a matrix the samples share, as it is."""
    return a.mean(axis=0) if a.ndim > 2 else a


def commutation(m: int, n: int, xp: Any, dtype: Any = float) -> Any:
    """K_{m,n}: K vec(A) = vec(Aᵀ) for A of shape (m, n)."""
    k = xp.zeros((m * n, m * n), dtype=dtype)
    i, j = xp.meshgrid(xp.arange(m), xp.arange(n), indexing="ij")
    k[(j + n * i).ravel(), (i + m * j).ravel()] = 1.0
    return k


def psd_project(a: Any, mode: Projection | str) -> Any:
    """V f(Λ) Vᵀ of the symmetric part of ``a``, f = |·| ('abs') or max(·, 0) ('clip')."""
    xp = namespace(a)
    w, v = xp.linalg.eigh(0.5 * (a + transpose(a)))
    return matmul(v * (xp.abs(w) if mode == Projection.ABS else xp.maximum(w, 0.0))[..., None, :], transpose(v))


def kron(scale: Any, a: Any, b: Any) -> tuple[Any, Any]:
    """Kronecker factors with a scalar folded into the smaller one (the cheaper pass); an implicit
    :class:`GramFactor` cannot take it, so with two of them the smaller is formed first."""
    if isinstance(scale, (int, float)) and scale == 1:
        return a, b
    if isinstance(a, GramFactor) and isinstance(b, GramFactor):
        a, b = (a.dense(), b) if a.size <= b.size else (a, b.dense())
    scale_a = not isinstance(a, GramFactor) and (a.size <= b.size or isinstance(b, GramFactor))
    return (a * scale, b) if scale_a else (a, b * scale)


def gram(p: Any, scale: float = 1.0) -> Any:
    """scale·P Pᵀ formed (the scale on the product) when that is cheaper than applying it through P
    (rows ≤ columns), else kept implicit."""
    return matmul(p, p.T, scale) if p.shape[0] <= p.shape[1] else GramFactor(p, scale)


def elementwise_part(cache: dict | None, key: str, t: Any, compute: Callable[[], Any]) -> Any:
    """A part of an elementwise function that its derivatives compute too (GELU's erf(t/√2), named by
    ``key``), computed once for the argument ``t`` per ``cache`` (a module's cache of one batch).

    The cache keeps the last argument each part was computed for, and its value: a hit is that very
    array (a forward pass's input, which the backward pass reads again), so that an argument made
    afresh by each call of a loop misses and replaces the entry instead of piling up."""
    if cache is None:
        return compute()
    entry = cache.get(("part", key))
    if entry is None or entry[0] is not t:
        entry = cache[("part", key)] = (t, compute())
    return entry[1]


def special(a: Any) -> Any:
    """The special functions (erf, erfc, gamma, …) for the array ``a``: ``scipy.special`` for NumPy,
    ``cupyx.scipy.special`` for CuPy; imported when a generated function first uses one."""
    if type(a).__module__.split(".")[0] == "cupy":
        import cupyx.scipy.special as module
    else:
        import scipy.special as module
    return module
