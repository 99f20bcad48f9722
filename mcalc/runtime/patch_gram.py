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

import functools
import itertools
import math
from dataclasses import dataclass
from typing import Any

from .array_ops import Dims, namespace, pads
from .backends import DISPATCH_FLOPS

MIN_SAVING = 0.7  # shifted products only where they cost at most this much of syrk's (a margin for the model)


def _as_rows(kernel: Dims, padding: tuple, dilation: Dims, size: Dims) -> tuple:
    """A one-dimensional window as two-dimensional with one row."""
    if len(size) == 2:
        return tuple(kernel), pads(padding), tuple(dilation), tuple(size)
    return (1, kernel[0]), ((0, 0), pads(padding)[0]), (1, dilation[0]), (1, size[0])


@dataclass(frozen=True)
class Shift:
    """The products of one shift δ: the input rows and columns where a position and the one δ away both
    exist (``rows``, ``columns``: ranges), the tap pairs (j, j′) it serves with the rows of each one's
    window clipped to them (padding holds only zeros), and the column strips to subtract:
    (the window's rows, a column) → the pairs whose window leaves that column out."""

    delta: tuple[int, int]
    rows: tuple[int, int]
    columns: tuple[int, int]
    windows: dict[tuple[int, int], tuple[int, int]]
    strips: dict[tuple[int, int, int], list[tuple[int, int]]]


@dataclass(frozen=True)
class ShiftPlan:
    """A stride-1 window's taps over inputs of ``size`` (rows, columns), its output extents ``out`` and
    every shift between two of its taps in one half-plane (the other half are the transposes)."""

    size: tuple[int, int]
    out: tuple[int, int]
    starts: list[tuple[int, int]]  # where each tap's window starts in the input (before it, if padded)
    shifts: list[Shift]

    def window(self, tap: int, rows: tuple[int, int], columns: tuple[int, int]) -> tuple[int, int, int, int]:
        """Tap ``tap``'s window (top, bottom, left, right) clipped to ``rows`` and ``columns``."""
        (y, x), (height, width) = self.starts[tap], self.out
        return max(y, rows[0]), min(y + height, rows[1]), max(x, columns[0]), min(x + width, columns[1])

    def products(self) -> int:
        """Position products per C² entries and sample: the rows' and the strips'."""
        return sum((s.rows[1] - s.rows[0]) * (s.columns[1] - s.columns[0])
                   + sum(bottom - top for top, bottom, _ in s.strips) for s in self.shifts)

    def operations(self) -> int:
        """Array operations, about: six per shift and per strip, two per pair."""
        return sum(6 + 6 * len(s.strips) + 2 * len(s.windows) for s in self.shifts)


@functools.lru_cache(maxsize=256)
def plan_shifts(kernel: Dims, padding: tuple, dilation: Dims, size: Dims) -> ShiftPlan:
    """The shifts of a stride-1 window (one or two dimensions), in the input's own coordinates; made once
    per window (every K-FAC step asks for it twice per convolution: :func:`prefer_shifted`, :func:`patch_gram`)."""
    kernel, padding, dilation, size = _as_rows(kernel, padding, dilation, size)
    out = tuple(n + sum(p) - d * (k - 1) for n, p, k, d in zip(size, padding, kernel, dilation))
    taps = list(itertools.product(*map(range, kernel)))
    starts = [tuple(o * d - p[0] for o, d, p in zip(tap, dilation, padding)) for tap in taps]
    plan = ShiftPlan(size, out, starts, [])
    by_delta: dict[tuple[int, int], list[tuple[int, int]]] = {}  # j ≤ j′ row-major: one half-plane of δ
    for j, k in itertools.combinations_with_replacement(range(len(taps)), 2):
        by_delta.setdefault(tuple(b - a for a, b in zip(starts[j], starts[k])), []).append((j, k))
    for (dy, dx), pairs in by_delta.items():
        rows = (max(0, -dy), min(size[0], size[0] - dy))
        columns = (max(0, -dx), min(size[1], size[1] - dx))
        windows, strips = {}, {}
        for j, k in pairs:
            top, bottom, left, right = plan.window(j, rows, columns)
            if top >= bottom or left >= right:  # the window reads only padding here: its block is zero
                windows[(j, k)] = (top, top)
                continue
            windows[(j, k)] = (top, bottom)
            for column in [*range(columns[0], left), *range(right, columns[1])]:
                strips.setdefault((top, bottom, column), []).append((j, k))
        plan.shifts.append(Shift((dy, dx), rows, columns, windows, strips))
    return plan


def prefer_shifted(channels: int, batch: int, kernel: Dims, stride: Dims, padding: tuple, dilation: Dims,
                   size: Dims, backend: str = "numpy") -> bool:
    """Whether :func:`patch_gram` is cheaper than syrk of the unfolded patches for this window: stride 1,
    one or two dimensions, and at most :data:`MIN_SAVING` of syrk's flops, its array operations
    charged at the backend's dispatch cost (:data:`~.backends.DISPATCH_FLOPS`): with few channels or
    positions the edges' small products outweigh what the shifts save."""
    if any(s != 1 for s in stride) or len(size) > 2:
        return False
    plan = plan_shifts(kernel, padding, dilation, size)
    shifted = 2 * channels**2 * batch * plan.products() + DISPATCH_FLOPS[backend] * plan.operations()
    syrk = (channels * len(plan.starts)) ** 2 * math.prod(plan.out) * batch  # half of the product's 2·n²·T·B
    return shifted <= MIN_SAVING * syrk


def patch_gram(x: Any, kernel: Dims, padding: tuple, dilation: Dims, size: Dims) -> Any:
    """Σ ã ãᵀ over the patches ã = [u; 1] of a stride-1 convolution's inputs ``x`` (C, B, Π size), every
    sample's: a (C·taps + 1)² matrix, rows ch·taps + j and the bias row last, as ``a @ a.T`` of
    :func:`~.array_ops.unfold`'s patches with the row of ones would give it. The padding is never made:
    its products are zeros, so each window is clipped to the input."""
    xp = namespace(x)
    channels, batch = x.shape[:2]
    plan = plan_shifts(kernel, padding, dilation, size)
    image = x.reshape(channels, batch, *plan.size)
    by_rows = xp.ascontiguousarray(image.transpose(2, 3, 1, 0))  # (H, W, B, C): a row's columns contiguous
    by_columns = xp.ascontiguousarray(image.transpose(3, 2, 1, 0))  # (W, H, B, C): a column's rows contiguous
    taps = len(plan.starts)
    blocks = xp.zeros((taps, taps, channels, channels), dtype=x.dtype)
    for shift in plan.shifts:
        (dy, dx), (y0, y1), (x0, x1) = shift.delta, shift.rows, shift.columns
        if y0 >= y1 or x0 >= x1:
            continue  # a shift past the input: no position has a partner, the blocks stay zero
        left = by_rows[y0:y1, x0:x1].reshape(y1 - y0, -1, channels)
        right = by_rows[y0 + dy:y1 + dy, x0 + dx:x1 + dx].reshape(y1 - y0, -1, channels)
        rows = xp.matmul(left.transpose(0, 2, 1), right)  # (rows, C, C): each row's products over its columns
        sums: dict[tuple[int, int], Any] = {}  # a window's rows → Σ rows over them
        for (j, k), (top, bottom) in shift.windows.items():
            if top < bottom:
                if (top, bottom) not in sums:
                    sums[(top, bottom)] = rows[top - y0:bottom - y0].sum(axis=0)
                blocks[j, k] = sums[(top, bottom)]
        for (top, bottom, column), excluding in shift.strips.items():
            strip = by_columns[column, top:bottom].reshape(-1, channels).T \
                @ by_columns[column + dx, top + dy:bottom + dy].reshape(-1, channels)
            for j, k in excluding:
                blocks[j, k] -= strip
        for j, k in shift.windows:
            if j != k:
                blocks[k, j] = blocks[j, k].T
    n = channels * taps
    gram = xp.empty((n + 1, n + 1), dtype=x.dtype)
    gram[:n, :n] = blocks.transpose(2, 0, 3, 1).reshape(n, n)
    # the bias row: Σ u over each tap's window in the input, from the summed-area table of the samples' sum
    table = xp.zeros((channels, plan.size[0] + 1, plan.size[1] + 1), dtype=x.dtype)
    table[:, 1:, 1:] = image.sum(axis=1).cumsum(axis=1).cumsum(axis=2)
    inside = [plan.window(j, (0, plan.size[0]), (0, plan.size[1])) for j in range(taps)]
    bias = [table[:, b, r] - table[:, t, r] - table[:, b, left] + table[:, t, left] if t < b and left < r
            else xp.zeros(channels, dtype=x.dtype) for t, b, left, r in inside]
    gram[:n, n] = gram[n, :n] = xp.stack(bias, axis=1).reshape(-1)
    gram[n, n] = batch * math.prod(plan.out)
    return gram
