"""Networks to and from PyTorch: an ``nn.Sequential`` of Linear layers and the activations mcalc has.

PyTorch is not a dependency of mcalc: it is imported when these are called (its CPU build is in the
test extra). Weights keep PyTorch's layouts (``weight`` (out, in), ``bias`` (out,)); samples are rows
there and columns here, so ``net.forward(X.T)`` is ``model(X).T``.
"""
from __future__ import annotations

from typing import Any

from ..errors import McalcError
from .network import Network

_TORCH_ACTIVATIONS = {"Sigmoid": "sigmoid", "Tanh": "tanh", "ReLU": "relu", "Softplus": "softplus"}


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise McalcError("PyTorch is not installed (pip install -e '.[test]' brings its CPU build)") from None
    return torch


def from_torch(model: Any, loss: str = "ce", backend: str = "numpy") -> Network:
    """The :class:`Network` of an ``nn.Sequential`` of ``nn.Linear`` layers (with biases), each optionally
    followed by one of ``nn.Sigmoid``, ``nn.Tanh``, ``nn.ReLU``, ``nn.Softplus`` (β = 1), with its weights
    (float64)."""
    torch = _torch()
    if not isinstance(model, torch.nn.Sequential):
        raise McalcError(f"from_torch takes an nn.Sequential, not {type(model).__name__}")
    tokens: list[str] = []
    weights: dict[str, Any] = {}
    for index, layer in enumerate(model):
        kind = type(layer).__name__
        if isinstance(layer, torch.nn.Linear):
            if not tokens:
                tokens.append(str(layer.in_features))
            elif tokens[-1].isdigit() and int(tokens[-1]) != layer.in_features:
                raise McalcError(f"layer {index}: Linear({layer.in_features}, …) follows width {tokens[-1]}")
            if layer.bias is None:  # a zero bias would be a parameter the torch model does not have, and train
                raise McalcError(f"layer {index}: Linear without a bias (bias=False): mcalc's Linear layers have "
                                 "a bias, which training would move; give the layer one, set to zero")
            number = sum(t.isdigit() for t in tokens)
            weights[f"W{number}"] = layer.weight
            weights[f"b{number}"] = layer.bias
            tokens.append(str(layer.out_features))
        elif kind in _TORCH_ACTIVATIONS and tokens and tokens[-1].isdigit() and len(tokens) > 1:
            if kind == "Softplus" and (layer.beta != 1 or layer.threshold != 20):
                raise McalcError(f"layer {index}: Softplus with beta={layer.beta}: mcalc's softplus has β = 1")
            tokens.append(_TORCH_ACTIVATIONS[kind])
        else:
            raise McalcError(f"layer {index}: {kind} is not supported here; an nn.Sequential of Linear layers, "
                             f"each followed by at most one of {', '.join(_TORCH_ACTIVATIONS)}")
    if not tokens or not tokens[-1].isdigit():
        raise McalcError("the nn.Sequential must start and end with a Linear layer")
    return Network("-".join(tokens), loss=loss, backend=backend, weights=weights)


def to_torch(net: Network) -> Any:
    """The ``nn.Sequential`` (float64) computing the same function as ``net``, with a copy of its weights."""
    torch = _torch()
    modules: list[Any] = []
    custom = sorted({layer.module for layer in net.layers if not hasattr(torch.nn, layer.module)})
    if custom:
        raise McalcError(f"to_torch translates Linear layers and activations only, not {', '.join(custom)} "
                         "(convolutions, poolings, attention and a user's modules stay in mcalc)")
    for layer in net.layers:
        if not layer.params:  # an activation: torch.nn's class has the library module's name
            modules.append(getattr(torch.nn, layer.module)())
            continue
        W = net.params[layer.params["W"]]
        b = net.params[layer.params["b"]]
        W, b = (W.get(), b.get()) if hasattr(W, "get") else (W, b)
        linear = torch.nn.Linear(W.shape[1], W.shape[0], dtype=torch.float64)
        with torch.no_grad():
            linear.weight.copy_(torch.as_tensor(W))
            linear.bias.copy_(torch.as_tensor(b).reshape(-1))
        modules.append(linear)
    return torch.nn.Sequential(*modules)
