"""Σ ã ãᵀ over the patches of a stride-1 convolution, from shifted products of its input: the patches are
never unfolded and most of syrk's products are not made.

K-FAC's input factor of a convolution (KFC, Grosse & Martens 2016, eq. (32); K-FAC-expand) sums ã ãᵀ
over every sample's patches ã = [u; 1]. Its block for taps o and o′ (rows ch·taps + j, as
:func:`~.array_ops.unfold` orders them) is

    Σᵢ Σₜ xᵢ(t + o) xᵢ(t + o′)ᵀ    (C × C, t over the output positions),

which, with stride 1, depends on o and o′ through the shift δ = o′ − o except at the windows' edges.
So, per shift in one half-plane (the other half are the transposes):

1. the products of every input row with the row δ away, summed along the row over every column where
   both exist, one batched GEMM over the rows (``rows[y]``);
2. a window's block is the sum of ``rows`` over its rows, minus the columns outside its window, each a
   GEMM down one column strip of the window's rows (the same strip serves every pair that excludes it).

For 3C3D's second convolution (64 channels, 3 × 3 over 14 × 14) that is 2,146 position products and
42 strips of 12 positions per C² entries and sample, 2,650 against syrk's 40.5 × 144 = 5,832 (1.4
against 3.1 GFLOP at batch 64; 19 ms against 33 ms on the README's CPU).
A one-dimensional convolution is the case of one row.
"""
from __future__ import annotations

import itertools
import math
from typing import Any

from .array_ops import Dims, namespace, pads
from .backends import DISPATCH_FLOPS

MIN_SAVING = 0.7  # shifted products only where they cost at most this much of syrk's (a margin for the model)


def _as_rows(kernel: Dims, padding: tuple, dilation: Dims, size: Dims) -> tuple:
    """A one-dimensional window as two-dimensional with one row."""
    if len(size) == 2:
        return tuple(kernel), pads(padding), tuple(dilation), tuple(size)
    return (1, kernel[0]), ((0, 0), pads(padding)[0]), (1, dilation[0]), (1, size[0])


def _shifts(kernel: Dims, dilation: Dims) -> dict[tuple[int, int], list[tuple[int, int]]]:
    """The tap pairs (j, j′), j ≤ j′ (row-major), grouped by their shift δ = o′ − o in input positions."""
    taps = list(itertools.product(*map(range, kernel)))
    shifts: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for j, o in enumerate(taps):
        for k in range(j, len(taps)):
            delta = tuple((b - a) * d for a, b, d in zip(o, taps[k], dilation))
            shifts.setdefault(delta, []).append((j, k))
    return shifts


def _plan(kernel: Dims, padding: tuple, dilation: Dims, size: Dims) -> tuple:
    """Padded extents, output extents, taps and, per shift, its rows, columns and strips."""
    kernel, padding, dilation, size = _as_rows(kernel, padding, dilation, size)
    H, W = (n + sum(p) for n, p in zip(size, padding))
    out = tuple(n - d * (k - 1) for n, k, d in zip((H, W), kernel, dilation))
    taps = list(itertools.product(*map(range, kernel)))
    plan = []
    for (dy, dx), pairs in _shifts(kernel, dilation).items():
        rows, cols = (max(0, -dy), min(H, H - dy)), (max(0, -dx), min(W, W - dx))
        strips = {}  # (first row of the window, column) → the pairs that exclude it
        for j, k in pairs:
            top, left = taps[j][0] * dilation[0], taps[j][1] * dilation[1]
            for column in [*range(cols[0], left), *range(left + out[1], cols[1])]:
                strips.setdefault((top, column), []).append((j, k))
        plan.append(((dy, dx), pairs, rows, cols, strips))
    return (H, W), out, taps, kernel, dilation, padding, plan


def prefer_shifted(channels: int, batch: int, kernel: Dims, stride: Dims, padding: tuple, dilation: Dims,
                   size: Dims, backend: str = "numpy") -> bool:
    """Whether :func:`patch_gram` is cheaper than syrk of the unfolded patches for this window: stride 1,
    one or two dimensions, and at most :data:`MIN_SAVING` of syrk's flops, its array operations
    charged at the backend's dispatch cost (:data:`~.backends.DISPATCH_FLOPS`): with few channels or
    positions the edges' small products outweigh what the shifts save."""
    if any(s != 1 for s in stride) or len(size) > 2:
        return False
    _, out, taps, _, _, _, plan = _plan(kernel, padding, dilation, size)
    products = sum((rows[1] - rows[0]) * (cols[1] - cols[0]) + len(strips) * out[0]
                   for _, _, rows, cols, strips in plan)
    operations = sum(6 + 6 * len(strips) + 2 * len(pairs) for _, pairs, _, _, strips in plan)
    shifted = 2 * channels**2 * batch * products + DISPATCH_FLOPS[backend] * operations
    syrk = (channels * len(taps)) ** 2 * math.prod(out) * batch  # half of the product's 2·n²·T·B
    return shifted <= MIN_SAVING * syrk


def patch_gram(x: Any, kernel: Dims, padding: tuple, dilation: Dims, size: Dims) -> Any:
    """Σ ã ãᵀ over the patches ã = [u; 1] of a stride-1 convolution's inputs ``x`` (C, B, Π size), every
    sample's: a (C·taps + 1)² matrix, rows ch·taps + j and the bias row last, as ``a @ a.T`` of
    :func:`~.array_ops.unfold`'s patches with the row of ones would give it."""
    xp = namespace(x)
    channels, batch = x.shape[:2]
    (H, W), (rows_out, cols_out), taps, kernel, dilation, padding, plan = _plan(kernel, padding, dilation, size)
    image = x.reshape(channels, batch, *(n - sum(p) for n, p in zip((H, W), padding)))
    if any(map(any, padding)):
        image = xp.pad(image, ((0, 0), (0, 0), *padding))
    by_rows = xp.ascontiguousarray(image.transpose(2, 3, 1, 0))  # (H, W, B, C): a row's columns contiguous
    by_columns = xp.ascontiguousarray(image.transpose(3, 2, 1, 0))  # (W, H, B, C): a column's rows contiguous
    blocks = xp.empty((len(taps), len(taps), channels, channels), dtype=x.dtype)
    for (dy, dx), pairs, (y0, y1), (x0, x1), strips in plan:
        left = by_rows[y0:y1, x0:x1].reshape(y1 - y0, -1, channels)
        right = by_rows[y0 + dy:y1 + dy, x0 + dx:x1 + dx].reshape(y1 - y0, -1, channels)
        rows = xp.matmul(left.transpose(0, 2, 1), right)  # (rows, C, C): each row's products over its columns
        windows: dict[int, Any] = {}  # a window's first row → Σ rows over the window
        for j, k in pairs:
            top = taps[j][0] * dilation[0]
            if top not in windows:
                windows[top] = rows[top - y0:top - y0 + rows_out].sum(axis=0)
            blocks[j, k] = windows[top]
        for (top, column), excluding in strips.items():
            strip = by_columns[column, top:top + rows_out].reshape(-1, channels).T \
                @ by_columns[column + dx, top + dy:top + dy + rows_out].reshape(-1, channels)
            for j, k in excluding:
                blocks[j, k] -= strip
        for j, k in pairs:
            if j != k:
                blocks[k, j] = blocks[j, k].T
    n = channels * len(taps)
    gram = xp.empty((n + 1, n + 1), dtype=x.dtype)
    gram[:n, :n] = blocks.transpose(2, 0, 3, 1).reshape(n, n)
    # the bias row: Σ u over each tap's window, from the summed-table of the samples' sum
    table = xp.zeros((channels, H + 1, W + 1), dtype=x.dtype)
    table[:, 1:, 1:] = image.sum(axis=1).cumsum(axis=1).cumsum(axis=2)
    sums = xp.stack([table[:, a * dilation[0] + rows_out, b * dilation[1] + cols_out]
                     - table[:, a * dilation[0], b * dilation[1] + cols_out]
                     - table[:, a * dilation[0] + rows_out, b * dilation[1]]
                     + table[:, a * dilation[0], b * dilation[1]] for a, b in taps], axis=1)
    gram[:n, n] = gram[n, :n] = sums.reshape(-1)
    gram[n, n] = batch * rows_out * cols_out
    return gram
