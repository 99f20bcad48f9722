"""Single-head attention, declared with mcalc itself.

A sequence is a per-sample matrix X (d features × T tokens), one token per column. Self-attention with
queries Q X, keys K X (Q, K: h × d) and values V X (V: m × d) is

    Z = V X softmax((K X)ᵀ (Q X) / √h),

softmax taken column by column: column j of the scores holds query j's against every key, so column j of
Z is the attention-weighted mean of the values for token j (PyTorch's ``scaled_dot_product_attention``
with tokens as rows, transposed). Attention pooling scores the tokens with one learned query q and
gives one vector per sample, z = V X softmax(Xᵀ q). Every product of two per-sample matrices (Xᵀ Q X)
is lowered to batched products (:class:`~mcalc.expr.SampleMatMul`), never to a loop over the batch.
Like the convolutions, these modules are generated on first use and cached.
"""
from __future__ import annotations

import functools

import sympy as sp

from ..module import Module
from ..symbols import Matrix, Vector, softmax


@functools.cache
def self_attention() -> Module:
    """Z = V X softmax((K X)ᵀ (Q X) / √h): X (d × T), Q and K (h × d), V (m × d) (``SelfAttention``)."""
    X = Matrix("X", "d", "T")
    Q, K, V = Matrix("Q", "h", "d"), Matrix("K", "h", "d"), Matrix("V", "m", "d")
    scores = (K @ X).T @ (Q @ X) * (1 / sp.sqrt(sp.Symbol("h", integer=True, positive=True)))
    return Module("SelfAttention", output=V @ X @ softmax(scores), inputs=[X], params=[Q, K, V])


@functools.cache
def attention_pooling() -> Module:
    """z = V X softmax(Xᵀ q): one learned query q (d) scores the T tokens of X (d × T), V (m × d)
    (``AttentionPooling``)."""
    X, q, V = Matrix("X", "d", "T"), Vector("q", "d"), Matrix("V", "m", "d")
    return Module("AttentionPooling", output=V @ X @ softmax(X.T @ q), inputs=[X], params=[V, q])
