"""The built-in library, declared with mcalc itself (layer 1 used by layers 2–6)."""
from __future__ import annotations

from ..module import Module, chain
from .activations import ACTIVATIONS, Exp, ReLU, Sigmoid, Softmax, Softplus, Tanh
from .affine import Bias, Linear, MatMul
from .losses import MSE, CrossEntropy

# σ followed by a linear layer, composed analytically: its rules are (S.11a–c),
# and a chain of them is the KFRA / BDA-PCH recursion (S.12).
SigmoidLinear: Module = chain("SigmoidLinear", [Sigmoid, Linear])

LIBRARY: tuple[Module, ...] = (
    Linear, MatMul, Bias, *ACTIVATIONS, Softmax, SigmoidLinear, MSE, CrossEntropy,
)

__all__ = [
    "LIBRARY",
    "MSE",
    "Bias",
    "CrossEntropy",
    "Exp",
    "Linear",
    "MatMul",
    "ReLU",
    "Sigmoid",
    "SigmoidLinear",
    "Softmax",
    "Softplus",
    "Tanh",
]
