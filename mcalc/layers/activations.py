"""Elementwise activations (Table 1, (S.9)) and softmax."""
from __future__ import annotations

from .. import functions as fn
from ..module import Module
from ..symbols import Vector, softmax

_x = Vector("x", "n")

Sigmoid = Module("Sigmoid", output=fn.sigmoid(_x), inputs=[_x])
Tanh = Module("Tanh", output=fn.tanh(_x), inputs=[_x])
ReLU = Module("ReLU", output=fn.relu(_x), inputs=[_x])
Softplus = Module("Softplus", output=fn.softplus(_x), inputs=[_x])
Exp = Module("Exp", output=fn.exp(_x), inputs=[_x])
Softmax = Module("Softmax", output=softmax(_x), inputs=[_x])

ACTIVATIONS = (Sigmoid, Tanh, ReLU, Softplus, Exp)
