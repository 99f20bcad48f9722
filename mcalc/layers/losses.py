"""Losses: square loss (S.10) and softmax cross-entropy with a one-hot label."""
from __future__ import annotations

from ..module import Module
from ..symbols import Vector, log_softmax
from ..symbols import sum as total

_x = Vector("x", "n")
_y = Vector("y", "n")
_label = Vector("y", "n", simplex=True)

MSE = Module("MSE", output=total((_x - _y) * (_x - _y)), inputs=[_x], constants=[_y])  # (y − ŷ)ᵀ(y − ŷ)
CrossEntropy = Module(
    "CrossEntropy", output=-total(_label * log_softmax(_x)), inputs=[_x], constants=[_label]
)
