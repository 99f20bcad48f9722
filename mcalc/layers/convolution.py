"""Convolutions and pooling, declared with mcalc itself: one module per kernel size, stride, padding and
dilation.

A signal is a per-sample matrix X (c channels × L positions); a 1-D convolution with m filters is
K unfold(X) + b 1ᵀ with K (m × c·k), PyTorch's Conv1d weight (m, c, k) reshaped, and unfold the index
map of :func:`mcalc.unfold`. Unlike the library's modules these are not generated in advance: a
network that uses one has its code generated on first use and cached, as a user's module is.
"""
from __future__ import annotations

import functools

import sympy as sp

from ..expr import ONE, Ones, Unfold, UnfoldSpec
from ..module import Module
from ..symbols import Matrix, Vector, identity, kron, max_pool, ones


@functools.cache
def conv1d(kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> Module:
    """The module z = K unfold(X) + b 1ᵀ of a Conv1d with these hyper-parameters (``Conv1d_k5s1p2d1``)."""
    spec = UnfoldSpec(kernel, stride, padding, dilation)
    X, K, b = Matrix("X", "c", "L"), Matrix("K", "m", f"c*{kernel}"), Vector("b", "m")
    patches = Unfold(X, spec)
    return Module(f"Conv1d_k{kernel}s{stride}p{padding}d{dilation}",
                  output=K @ patches + b @ Ones(ONE, patches.cols), inputs=[X], params=[K, b])


@functools.cache
def avg_pool1d(kernel: int) -> Module:
    """Average pooling over windows of ``kernel`` positions, ``kernel`` apart (PyTorch's AvgPool1d(k)):
    z = (1/k) (I_c ⊗ 1_kᵀ) unfold(X), each channel's taps of a window summed (``AvgPool1d_k2``)."""
    X = Matrix("X", "c", "L")
    window = kron(identity("c"), ones(kernel).T) @ Unfold(X, UnfoldSpec(kernel, kernel))
    return Module(f"AvgPool1d_k{kernel}", output=window * (1 / sp.Integer(kernel)), inputs=[X])


@functools.cache
def max_pool1d(kernel: int) -> Module:
    """Max pooling over windows of ``kernel`` positions, ``kernel`` apart (PyTorch's MaxPool1d(k)): the
    piecewise-linear selection of :func:`mcalc.max_pool` (``MaxPool1d_k2``)."""
    X = Matrix("X", "c", "L")
    return Module(f"MaxPool1d_k{kernel}", output=max_pool(X, kernel), inputs=[X])
