"""The model spec of ``mcalc train --model``: ``64-128-relu-LayerNorm-Residual(h=32)-10`` as typed layers.

A token is a width (a Linear layer to that width; the first token is the input width), a built-in
activation (``sigmoid``, ``tanh``, ``relu``, ``softplus``), or the name of a user's module, with
``Name(dim=value, ...)`` binding the dimensions its input does not fix. The last token is the output
width. An activation follows a width or a module.
"""
from __future__ import annotations

import ast
import operator
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from ..errors import McalcError

SPEC_ACTIVATIONS = {"sigmoid": "Sigmoid", "tanh": "Tanh", "relu": "ReLU", "softplus": "Softplus"}
_MODULE = re.compile(r"^([A-Za-z_]\w*)(?:\((.*)\))?$")


@dataclass(frozen=True)
class Width:
    """A width: the input's, or a Linear layer's output."""

    size: int


@dataclass(frozen=True)
class Activation:
    """A built-in activation, by its library module's name."""

    module: str


@dataclass(frozen=True)
class UserModule:
    """A user's module by name, with the dimensions the spec binds."""

    name: str
    dims: tuple[tuple[str, int], ...] = ()


Token = Width | Activation | UserModule


def parse_spec(spec: str, modules: Collection[str] = ()) -> list[Token]:
    """The layers of ``spec``; ``modules``: the names of the user's modules it may use."""
    tokens: list[Token] = []
    for text in (t.strip() for t in spec.split("-") if t.strip()):
        if text.isdigit():
            if int(text) < 1:
                raise McalcError(f"model spec '{spec}': width {text} must be positive")
            tokens.append(Width(int(text)))
        elif text.lower() in SPEC_ACTIVATIONS:
            if len(tokens) < 2 or isinstance(tokens[-1], Activation):
                raise McalcError(f"model spec '{spec}': activation '{text}' must follow a width or a module")
            tokens.append(Activation(SPEC_ACTIVATIONS[text.lower()]))
        elif (match := _MODULE.match(text)) and match.group(1) in modules:
            tokens.append(UserModule(match.group(1), _bindings(spec, match.group(1), match.group(2))))
        else:
            known = (f"; modules: {', '.join(sorted(modules))}" if modules
                     else " (a module of yours needs --modules FILE.py)")
            raise McalcError(f"model spec '{spec}': unknown token '{text}'; widths are integers, "
                             f"activations are {', '.join(SPEC_ACTIVATIONS)}{known}")
    if sum(isinstance(t, Width) for t in tokens) < 2 or not isinstance(tokens[0], Width):
        raise McalcError(f"model spec '{spec}': needs an input and an output width, e.g. 64-10")
    if isinstance(tokens[-1], Activation):
        raise McalcError(f"model spec '{spec}': ends with an activation; the last token is the output width")
    if not isinstance(tokens[-1], Width):
        raise McalcError(f"model spec '{spec}': ends with a module; the last token is the output width")
    return tokens


def _bindings(spec: str, name: str, text: str | None) -> tuple[tuple[str, int], ...]:
    out: dict[str, int] = {}
    for part in (p.strip() for p in (text or "").split(",") if p.strip()):
        key, _, value = part.partition("=")
        if not key.strip().isidentifier() or not value.strip().isdigit() or int(value) < 1:
            raise McalcError(f"model spec '{spec}': '{part}' in {name}(…) must bind a dimension to a positive "
                             "integer, e.g. h=32")
        out[key.strip()] = int(value)
    return tuple(out.items())


_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
              ast.Pow: operator.pow}


def dimension_value(code: str, dims: Mapping[str, int], module: str) -> int:
    """A dimension written in generated code (``n``, ``n*m``, ``2``) over the bound dimensions."""
    def value(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in dims:
                raise McalcError(f"module '{module}': dimension '{node.id}' is not fixed by its input; bind it in "
                                 f"the model spec, e.g. {module}({node.id}=32)")
            return dims[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.left), value(node.right))
        raise McalcError(f"module '{module}': dimension '{code}' is not an integer expression")

    return value(ast.parse(code, mode="eval").body)
