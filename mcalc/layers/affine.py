"""Affine modules of Table 1: Linear (Wx + b), MatMul (Wx), Bias (x + b)."""
from __future__ import annotations

from ..module import Module
from ..symbols import Matrix, Vector

_x, _W, _b = Vector("x", "n"), Matrix("W", "m", "n"), Vector("b", "m")
_xb = Vector("x", "m")

Linear = Module("Linear", output=_W @ _x + _b, inputs=[_x], params=[_W, _b])  # (S.8a–c)
MatMul = Module("MatMul", output=_W @ _x, inputs=[_x], params=[_W])  # Table 1, z = Wx
Bias = Module("Bias", output=_xb + _b, inputs=[_xb], params=[_b])  # Table 1, z = x + b
