"""The model spec of ``mcalc train --model``: ``64-128-relu-LayerNorm-Residual(h=32)-10`` as typed layers.

A token is a width (a Linear layer to that width; the first token is the input width), a built-in
activation (``sigmoid``, ``tanh``, ``relu``, ``softplus``), or the name of a user's module, with
``Name(dim=value, ...)`` binding the dimensions its input does not fix. The last token is the output
width. An activation follows a width or a module.

A network of convolutions starts with the input's shape: channels × length for signals (``1x40``:
MNIST-1D's), channels × height × width for images (``1x8x8``: digits). It uses ``conv(m, k)`` (m filters
of k taps, k × k over an image; ``stride=``, ``pad=``, ``dil=`` as PyTorch's Conv1d and Conv2d, the same
along both dimensions of an image), ``avgpool(k)`` and ``maxpool(k)`` (windows of k positions, k apart,
k × k over an image; ``stride=`` and ``pad=`` as PyTorch's) and ``flatten`` (the channels of every position
stacked, before a width); ``pad=same`` is TensorFlow's 'same' padding (⌈L/s⌉ outputs, the padding split
with its odd one after, as DeepOBS' networks pad):
``1x40-conv(32,5,pad=2)-relu-avgpool(2)-conv(32,5,pad=2)-relu-flatten-10``,
``1x8x8-conv(16,3,pad=1)-relu-maxpool(2)-conv(32,3,pad=1)-relu-flatten-10``. ``attention(h)`` is
single-head self-attention over the positions (queries and keys of h features, as many output channels
as input channels): ``1x40-conv(16,5,pad=2)-relu-attention(8)-relu-flatten-10``.
"""
from __future__ import annotations

import ast
import math
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


@dataclass(frozen=True)
class Signal:
    """The input as per-sample matrices: ``channels`` × the positions of ``extents`` (a signal's (L,), an
    image's (H, W), its pixels row by row)."""

    channels: int
    extents: tuple[int, ...]

    @property
    def positions(self) -> int:
        return math.prod(self.extents)

    @property
    def size(self) -> int:
        return self.channels * self.positions


@dataclass(frozen=True)
class Conv:
    """A convolution: ``filters`` output channels, PyTorch's Conv1d or Conv2d hyper-parameters (an image's
    the same along both dimensions)."""

    filters: int
    kernel: int
    stride: int = 1
    padding: int | str = 0  # or "same"
    dilation: int = 1


@dataclass(frozen=True)
class Pool:
    """Pooling over windows of ``kernel`` positions (k × k over an image), ``stride`` apart (by default
    ``kernel``), over the input padded with ``padding`` positions: their average or their maximum."""

    kind: str  # "avg" or "max"
    kernel: int
    stride: int | None = None
    padding: int | str = 0  # or "same"

    @property
    def step(self) -> int:
        return self.kernel if self.stride is None else self.stride


@dataclass(frozen=True)
class Attention:
    """Single-head self-attention over the positions, queries and keys of ``features`` each."""

    features: int


@dataclass(frozen=True)
class Flatten:
    """A signal's positions stacked into one vector (column-major vec: position by position)."""


Token = Width | Activation | UserModule | Signal | Conv | Pool | Attention | Flatten
_SIGNAL = re.compile(r"^\d+(?:x\d+){1,2}$")
_CONV = re.compile(r"^conv\((.*)\)$", re.IGNORECASE)
_POOL = re.compile(r"^(avg|max)pool\((.*)\)$", re.IGNORECASE)
_ATTENTION = re.compile(r"^attention\((\d+)\)$", re.IGNORECASE)
_CONV_OPTIONS = {"stride": "stride", "pad": "padding", "padding": "padding", "dil": "dilation", "dilation": "dilation"}


def parse_spec(spec: str, modules: Collection[str] = ()) -> list[Token]:
    """The layers of ``spec``; ``modules``: the names of the user's modules it may use."""
    tokens: list[Token] = []
    for text in _token_texts(spec):
        if not tokens and _SIGNAL.match(text):
            channels, *extents = (int(n) for n in text.split("x"))
            if min(channels, *extents) < 1:
                raise McalcError(f"model spec '{spec}': the input '{text}' needs positive channels and extents")
            tokens.append(Signal(channels, tuple(extents)))
        elif match := _CONV.match(text):
            tokens.append(_conv(spec, text, match.group(1)))
        elif match := _POOL.match(text):
            usage = "avgpool(kernel[, stride=…, pad=…]) or maxpool(…), e.g. maxpool(2) or maxpool(3,stride=2,pad=1)"
            (kernel,), options = _integers(spec, text, match.group(2), 1, {"stride", "padding"}, usage)
            padding = options.get("padding", 0)
            if kernel < 1 or options.get("stride", 1) < 1 or (padding != "same" and padding > kernel // 2):
                raise McalcError(f"model spec '{spec}': '{text}' needs a positive window and stride, and padding "
                                 f"at most half the window; {usage}")
            tokens.append(Pool(match.group(1).lower(), kernel, **options))
        elif match := _ATTENTION.match(text):
            if int(match.group(1)) < 1:
                raise McalcError(f"model spec '{spec}': '{text}' needs a positive number of features")
            tokens.append(Attention(int(match.group(1))))
        elif text.lower() == "flatten":
            tokens.append(Flatten())
        elif text.isdigit():
            if int(text) < 1:
                raise McalcError(f"model spec '{spec}': width {text} must be positive")
            tokens.append(Width(int(text)))
        elif text.lower() in SPEC_ACTIVATIONS:
            if len(tokens) < 2 or isinstance(tokens[-1], (Activation, Flatten)):
                raise McalcError(f"model spec '{spec}': activation '{text}' must follow a width, a convolution "
                                 "or a module")
            tokens.append(Activation(SPEC_ACTIVATIONS[text.lower()]))
        elif (match := _MODULE.match(text)) and match.group(1) in modules:
            tokens.append(UserModule(match.group(1), _bindings(spec, match.group(1), match.group(2))))
        else:
            known = (f"; modules: {', '.join(sorted(modules))}" if modules
                     else " (a module of yours needs --modules FILE.py)")
            raise McalcError(f"model spec '{spec}': unknown token '{text}'; widths are integers, "
                             f"activations are {', '.join(SPEC_ACTIVATIONS)}{known}")
    if not isinstance(tokens[0], (Width, Signal)) or sum(isinstance(t, (Width, Signal)) for t in tokens) < 2:
        raise McalcError(f"model spec '{spec}': needs an input (a width, channels x length or channels x height "
                         "x width) and an output width, e.g. 64-10, 1x40-conv(8,5)-flatten-10 or "
                         "1x8x8-conv(8,3)-flatten-10")
    if any(isinstance(t, (Conv, Pool, Attention)) for t in tokens) and not isinstance(tokens[0], Signal):
        raise McalcError(f"model spec '{spec}': a convolution needs a signal or an image: start with channels x "
                         "length or channels x height x width, e.g. 1x40 or 1x8x8")
    if isinstance(tokens[-1], Activation):
        raise McalcError(f"model spec '{spec}': ends with an activation; the last token is the output width")
    if not isinstance(tokens[-1], Width):
        raise McalcError(f"model spec '{spec}': ends with a module; the last token is the output width")
    return tokens


def _token_texts(spec: str) -> list[str]:
    """The tokens of ``spec``: its text between the dashes outside parentheses, so that a negative option
    (``pad=-1``) stays in its token and is refused there; an empty one (``64--10``) is refused."""
    texts, depth, current = [], 0, ""
    for character in spec + "-":
        if character == "-" and depth == 0:
            if not current.strip():
                raise McalcError(f"model spec '{spec}': an empty token (a '-' at an end, or two in a row)")
            texts.append(current.strip())
            current = ""
            continue
        depth += (character == "(") - (character == ")")
        if depth < 0:
            break
        current += character
    if depth != 0:
        raise McalcError(f"model spec '{spec}': unbalanced parentheses")
    return texts


def _integers(spec: str, text: str, arguments: str, count: int, allowed: set[str],
              usage: str) -> tuple[list[int], dict[str, int]]:
    """The ``count`` positional integers and the named options (``stride=``, ``pad=``, ``dil=``) of a token's
    arguments."""
    positional, options = [], {}
    if "(" in arguments or ")" in arguments:  # a tuple would be cut at its commas into meaningless parts
        raise McalcError(f"model spec '{spec}': '{text}' gives a size per dimension; one number serves every "
                         f"dimension (a square kernel, the same stride, padding and dilation along each); {usage}")
    for part in (p.strip() for p in arguments.split(",") if p.strip()):
        key, equals, value = part.partition("=")
        same = equals and _CONV_OPTIONS.get(key.strip()) == "padding" and value.strip() == "same"
        if not ((value if equals else key).strip().isdigit() or same):
            raise McalcError(f"model spec '{spec}': '{part}' in '{text}' is not a whole number ≥ 0; {usage}")
        if equals:
            if _CONV_OPTIONS.get(key.strip()) not in allowed:
                raise McalcError(f"model spec '{spec}': unknown option '{key.strip()}' in '{text}'; {usage}")
            options[_CONV_OPTIONS[key.strip()]] = "same" if same else int(value)
        else:
            positional.append(int(key))
    if len(positional) != count:
        raise McalcError(f"model spec '{spec}': '{text}' needs {count} number{'s' if count > 1 else ''}; {usage}")
    return positional, options


def _conv(spec: str, text: str, arguments: str) -> Conv:
    """conv(m, k, stride=1, pad=0, dil=1)."""
    usage = "conv(filters, kernel[, stride=…, pad=…, dil=…]), e.g. conv(32,5,pad=2)"
    (filters, kernel), options = _integers(spec, text, arguments, 2, {"stride", "padding", "dilation"}, usage)
    if min(filters, kernel) < 1 or options.get("stride", 1) < 1 or options.get("dilation", 1) < 1:
        raise McalcError(f"model spec '{spec}': '{text}' needs positive filters, kernel, stride and dilation; "
                         f"{usage}")
    return Conv(filters, kernel, **options)


def _bindings(spec: str, name: str, text: str | None) -> tuple[tuple[str, int], ...]:
    out: dict[str, int] = {}
    for part in (p.strip() for p in (text or "").split(",") if p.strip()):
        key, _, value = part.partition("=")
        if not key.strip().isidentifier() or not value.strip().isdigit() or int(value) < 1:
            raise McalcError(f"model spec '{spec}': '{part}' in {name}(…) must bind a dimension to a positive "
                             "integer, e.g. h=32")
        if key.strip() in out:
            raise McalcError(f"model spec '{spec}': {name}(…) binds '{key.strip()}' twice")
        out[key.strip()] = int(value)
    return tuple(out.items())


_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
              ast.Pow: operator.pow}


def dimension_names(code: str) -> set[str]:
    """The dimensions a dimension written in generated code names (``n*m``: n and m)."""
    return {node.id for node in ast.walk(ast.parse(code, mode="eval")) if isinstance(node, ast.Name)}


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
