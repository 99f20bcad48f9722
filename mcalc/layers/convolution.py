"""Convolutions and pooling, declared with mcalc itself: one module per kernel size, stride, padding and
dilation (and, over an image, per image size).

An input is a per-sample matrix X (c channels × N positions): a signal's N = L positions, an image's
N = H·W pixels row by row (PyTorch's ``reshape(c, H*W)``). A convolution with m filters is
K unfold(X) + b 1ᵀ with K (m × c·taps), PyTorch's Conv1d or Conv2d weight (m, c, k…) reshaped, and unfold
the index map of :func:`mcalc.unfold`. A signal's length stays a dimension, read off the batch; an image's
height and width are fixed in the module (its code reads N alone). Unlike the library's modules these
are not generated in advance: a network that uses one has its code generated on first use and cached,
as a user's module is.
"""
from __future__ import annotations

import functools
import math

import sympy as sp

from ..expr import ONE, Ones
from ..module import Module
from ..printing.base import spec_text
from ..symbols import Matrix, Vector, identity, kron, max_pool, ones, unfold

Pair = tuple[int, ...]  # a hyper-parameter per spatial dimension: (k,) for a signal, (kh, kw) for an image


def _input(size: Pair | None) -> tuple[Matrix, str]:
    """X (c × L) of a signal (``size`` None), or (c × H·W) of an image of ``size``; the name's suffix."""
    if size is None:
        return Matrix("X", "c", "L"), ""
    return Matrix("X", "c", math.prod(size)), "_" + spec_text(size)


@functools.cache
def convolution(kernel: Pair, stride: Pair, padding: Pair, dilation: Pair, size: Pair | None = None) -> Module:
    """The module z = K unfold(X) + b 1ᵀ of a Conv1d (``size`` None) or of a Conv2d over images of ``size``
    (``Conv1d_k5s1p2d1``, ``Conv2d_k3x3s1x1p1x1d1x1_8x8``)."""
    X, suffix = _input(size)
    K, b = Matrix("K", "m", f"c*{math.prod(kernel)}"), Vector("b", "m")
    patches = unfold(X, kernel, stride, padding, dilation, size=size)
    name = f"Conv{len(kernel)}d_k{spec_text(kernel)}s{spec_text(stride)}p{spec_text(padding)}d{spec_text(dilation)}"
    return Module(name + suffix, output=K @ patches + b @ Ones(ONE, patches.cols), inputs=[X], params=[K, b])


def _pool_name(kind: str, kernel: Pair, stride: Pair, padding: Pair, suffix: str) -> str:
    """``MaxPool1d_k2``, ``AvgPool2d_k3x3s2x2p1x1_28x28``: stride and padding named where not the defaults."""
    options = ("" if stride == kernel else f"s{spec_text(stride)}") + (f"p{spec_text(padding)}" if any(padding) else "")
    return f"{kind}{len(kernel)}d_k{spec_text(kernel)}{options}{suffix}"


@functools.cache
def avg_pooling(kernel: Pair, stride: Pair | None = None, padding: Pair | None = None,
                size: Pair | None = None) -> Module:
    """Average pooling over windows of ``kernel`` positions, ``stride`` apart (``kernel`` by default), over the
    input padded with ``padding`` zeros (PyTorch's AvgPool1d, or AvgPool2d over images of ``size``, the
    padding counted, its default): z = (1/taps) (I_c ⊗ 1ᵀ) unfold(X), each channel's taps of a window
    summed."""
    stride, padding = stride or kernel, padding or (0,) * len(kernel)
    X, suffix = _input(size)
    taps = math.prod(kernel)
    window = kron(identity("c"), ones(taps).T) @ unfold(X, kernel, stride=stride, padding=padding, size=size)
    return Module(_pool_name("AvgPool", kernel, stride, padding, suffix), output=window * (1 / sp.Integer(taps)),
                  inputs=[X])


@functools.cache
def max_pooling(kernel: Pair, stride: Pair | None = None, padding: Pair | None = None,
                size: Pair | None = None) -> Module:
    """Max pooling over windows of ``kernel`` positions, ``stride`` apart (``kernel`` by default), the padding
    never a window's maximum (PyTorch's MaxPool1d, or MaxPool2d over images of ``size``): the
    piecewise-linear selection of :func:`mcalc.max_pool`."""
    stride, padding = stride or kernel, padding or (0,) * len(kernel)
    X, suffix = _input(size)
    return Module(_pool_name("MaxPool", kernel, stride, padding, suffix),
                  output=max_pool(X, kernel, stride=stride, padding=padding, size=size), inputs=[X])
