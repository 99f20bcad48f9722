"""An independent dense reference: the module's forward pass in PyTorch, differentiated by autograd.

Nothing here uses mcalc's derivatives: only the meaning of each declared
operation (its forward semantics) is restated with torch operations.
"""
from __future__ import annotations

import math

import numpy as np
import sympy as sp
import torch

import mcalc as mc
from mcalc import expr as E
from mcalc.numeric.evaluate import as_matrix, psd_project

_TORCH = {
    "sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu, "exp": torch.exp, "log": torch.log,
    "softplus": torch.nn.functional.softplus, "sqrt": torch.sqrt, "reciprocal": torch.reciprocal,
}
_SYMPY_TO_TORCH = {"exp": torch.exp, "log": torch.log, "sin": torch.sin, "cos": torch.cos, "tanh": torch.tanh,
                   "sqrt": torch.sqrt, "cosh": torch.cosh, "sinh": torch.sinh}


def _function(f: mc.ElementwiseFunction):
    if f.order == 0 and f.name in _TORCH:
        return _TORCH[f.name]
    (t,) = f.expr.free_symbols
    return sp.lambdify(t, f.expr, modules=[_SYMPY_TO_TORCH])


def forward(node: E.Expr, env: dict[str, torch.Tensor], sizes: dict) -> torch.Tensor:
    """The value of ``node`` as a 2-D torch tensor."""
    go = lambda c: forward(c, env, sizes)  # noqa: E731
    a = [go(c) for c in node.children]
    t = type(node)
    if t is E.Symbol:
        return env[node.name]
    if t is E.Ones:
        return torch.ones(int(node.rows.xreplace(sizes)), int(node.cols.xreplace(sizes)), dtype=torch.float64)
    if t is E.MatMul:
        out = a[0]
        for f in a[1:]:
            out = out @ f
        return out
    if t is E.Add:
        return sum(a[1:], a[0])
    if t is E.ScalarMul:
        return float(node.coefficient.xreplace(sizes)) * a[0]
    if t is E.ScaleBy:
        return a[0][0, 0] * a[1]
    if t is E.Hadamard:
        return a[0] * a[1]
    if t is E.Transpose:
        return a[0].T
    if t is E.Apply:
        return _function(node.function)(a[0])
    if t is E.Sum:
        return a[0].sum().reshape(1, 1)
    if t is E.Trace:
        return torch.trace(a[0]).reshape(1, 1)
    if t is E.Softmax:
        return torch.softmax(a[0], dim=0)
    if t is E.LogSoftmax:
        return torch.log_softmax(a[0], dim=0)
    if t is E.Inverse:
        return torch.linalg.inv(a[0])
    if t is E.Vec:
        return a[0].T.reshape(-1, 1)  # columns stacked
    if t is E.Diag:
        return torch.diag(a[0].reshape(-1))
    if t is E.Identity:
        return torch.eye(int(node.rows.xreplace(sizes)), dtype=torch.float64)
    if t is E.Kron:
        return torch.kron(a[0], a[1])
    if t is E.WindowArgmax:  # the first maximum of each window's taps that read the input, a constant mask
        spec, size = node.args[1], tuple(int(s.xreplace(sizes)) for s in node.args[2])
        reads = _patches(torch.ones(1, math.prod(size), dtype=torch.float64), spec, size)
        windows = a[0].detach().reshape(-1, spec.taps, a[0].shape[1])
        windows = torch.where(reads.repeat(1, a[0].shape[1] // reads.shape[1]) > 0, windows, -torch.inf)
        mask = torch.nn.functional.one_hot(windows.argmax(1), spec.taps).transpose(1, 2)
        return mask.reshape(a[0].shape).to(a[0].dtype)
    if t is E.Unfold:
        spec, size = node.args[1], tuple(int(s.xreplace(sizes)) for s in node.args[2])
        return _patches(a[0], spec, size)
    if t is E.Fold:  # PyTorch's col2im onto the padded input, the padding cut off
        spec, size = node.args[1], tuple(int(s.xreplace(sizes)) for s in node.args[2])
        image, options, pads = _as_image(spec, size)
        padded = tuple(n + before + after for n, (before, after) in zip(image, pads))
        out = torch.nn.functional.fold(a[0][None], output_size=padded, **options)[0]
        (top, _), (left, _) = pads
        return out[:, top : top + image[0], left : left + image[1]].reshape(-1, math.prod(size))
    raise NotImplementedError(t.__name__)


def _as_image(spec, size: tuple[int, ...]) -> tuple[tuple[int, int], dict, tuple]:
    """A signal as a 1 × L image: the image's size, PyTorch's unfold options (padding 0: it is applied
    separately, since it may differ before and after) and the padding (before, after) per dimension."""
    flat = 2 - spec.ndim
    options = dict(kernel_size=(1,) * flat + spec.kernel, dilation=(1,) * flat + spec.dilation,
                   stride=(1,) * flat + spec.stride)
    return (1,) * flat + size, options, ((0, 0),) * flat + spec.pads


def _patches(x: torch.Tensor, spec, size: tuple[int, ...]) -> torch.Tensor:
    """PyTorch's im2col of one input (c × N) of ``size``, zero-padded by ``torch.nn.functional.pad``."""
    image, options, ((top, bottom), (left, right)) = _as_image(spec, size)
    padded = torch.nn.functional.pad(x.reshape(1, -1, *image), (left, right, top, bottom))
    return torch.nn.functional.unfold(padded, **options)[0]


def dense_rules(module: mc.Module, name: str, values: dict, dz: np.ndarray, Hz: np.ndarray) -> dict:
    """Jacobian, gradient and 𝓗v in every curvature mode, by torch autograd."""
    env = {s.name: torch.tensor(as_matrix(values[s.name], s, s.name), dtype=torch.float64) for s in module.symbols}
    sizes = {}
    for s in module.symbols:
        for d, n in zip(s.shape, env[s.name].shape):
            if d.is_Symbol:
                sizes[d] = n
    base = env[name]

    def f(flat: torch.Tensor) -> torch.Tensor:
        local = dict(env)
        local[name] = flat.reshape(base.shape[1], base.shape[0]).T  # unvec, column-major
        return forward(module.output, local, sizes).T.reshape(-1)  # vec, column-major

    v0 = base.T.reshape(-1).clone()
    weights = torch.tensor(np.asarray(dz, dtype=float).reshape(-1))
    J = torch.autograd.functional.jacobian(f, v0).numpy()
    S = torch.autograd.functional.hessian(lambda v: weights @ f(v), v0).numpy()
    ggn = J.T @ Hz @ J
    return {
        "jacobian": J,
        "gradient": J.T @ np.asarray(dz).reshape(-1),
        "exact": ggn + S,
        "ggn": ggn,
        "pch-abs": ggn + psd_project(S, "abs"),
        "pch-clip": ggn + psd_project(S, "clip"),
        "second-order": S,
    }


def dense_tangents(module: mc.Module, values: dict, dz: np.ndarray, tangents: dict, Rdz: np.ndarray) -> dict:
    """vec R{z} and every vec R{δv}, by torch's forward-over-reverse autograd (Pearlmutter's R-operator)."""
    env = {s.name: torch.tensor(as_matrix(values[s.name], s, s.name), dtype=torch.float64) for s in module.symbols}
    sizes = {d: n for s in module.symbols for d, n in zip(s.shape, env[s.name].shape) if d.is_Symbol}
    names = [v.name for v in module.variables]
    point = tuple(env[n] for n in names)
    direction = tuple(torch.tensor(as_matrix(tangents[n], module.symbol(n), n)) if n in tangents
                      else torch.zeros_like(env[n]) for n in names)
    weights = torch.tensor(np.asarray(dz, dtype=float).reshape(-1))
    pulled = torch.tensor(np.asarray(Rdz, dtype=float).reshape(-1))

    def output(*variables: torch.Tensor) -> torch.Tensor:
        return forward(module.output, {**env, **dict(zip(names, variables))}, sizes).T.reshape(-1)

    def gradients(*variables: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(weights @ output(*variables), variables, create_graph=True)

    _, Rz = torch.autograd.functional.jvp(output, point, direction)
    _, moved = torch.autograd.functional.jvp(gradients, point, direction)
    _, vjp = torch.autograd.functional.vjp(output, point, pulled)  # Dz(v)ᵀ R{δz}
    out = {"R{z}": Rz.numpy()}
    for n, m, p in zip(names, moved, vjp):
        out[n] = (m + p).T.reshape(-1).numpy()  # vec, column-major
    return out
