"""Networks: a sequence of modules on their generated code, with curvature backprop.

A spec such as ``64-128-sigmoid-64-sigmoid-10`` reads: input width 64, a
linear layer to 128, a sigmoid, a linear layer to 64, a sigmoid, a linear
layer to 10; the loss (cross-entropy or square loss) follows. A user's module
takes its place by name, ``64-RMSNorm-128-…`` (:mod:`.model_spec`), given its
generated code. Arrays hold one sample per column, as the generated code does.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import McalcError
from ..modes import Approximation, Curvature, CurvatureMatrix
from ..runtime.array_ops import columns_of_matrices, grid, matrices_of_columns, side_by_side, softmax, unfold
from ..runtime.blocks import CurvatureBlock
from ..runtime.generated_code import PATCHES_KEY, library_code
from ..runtime.rank_sum import across_ranks, samples
from .distributed import DataParallel
from .model_spec import (
    Activation,
    Attention,
    Conv,
    Flatten,
    Pool,
    Signal,
    UserModule,
    Width,
    dimension_names,
    dimension_value,
    parse_spec,
)

if TYPE_CHECKING:
    from ..codegen.network_plan import Chain
    from ..module import Module

SPEC_LOSSES = {"ce": "CrossEntropy", "mse": "MSE"}
BackwardResult = tuple[float, dict[str, Any], dict[str, CurvatureBlock]]  # loss, gradients, blocks


def window(token: Conv | Pool, extents: tuple[int, ...]) -> tuple[tuple, ...]:
    """A convolution's or pooling's kernel, stride, padding and dilation along each dimension of inputs of
    ``extents``, and those extents: the arguments of :func:`~mcalc.runtime.array_ops.unfold`. ``pad=same``
    is TensorFlow's: ⌈L/s⌉ outputs, the total padding split with its odd one after."""
    n = len(extents)
    stride, dilation = (token.step, 1) if isinstance(token, Pool) else (token.stride, token.dilation)
    if token.padding == "same":
        totals = [max((-(-length // stride) - 1) * stride + (token.kernel - 1) * dilation + 1 - length, 0)
                  for length in extents]
        padding = tuple(total // 2 if total % 2 == 0 else (total // 2, total - total // 2) for total in totals)
    else:
        padding = (token.padding,) * n
    return (token.kernel,) * n, (stride,) * n, padding, (dilation,) * n, extents


def glorot_uniform(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """A (rows, cols) weight matrix drawn uniformly from ±√(6/(rows + cols)) (Xavier / Glorot)."""
    bound = np.sqrt(6.0 / (rows + cols))
    return rng.uniform(-bound, bound, (rows, cols))


def _kept(cache: dict | None, key: str, make: Callable[[], Any]) -> Any:
    """``make()``, made once per ``cache`` (a layer's, one per batch) and kept there under ``key``."""
    if cache is None:
        return make()
    if key not in cache:
        cache[key] = make()
    return cache[key]


def kept_matrices(columns: Any, rows: int, cache: dict | None) -> Any:
    """The columns as per-sample matrices of ``rows`` rows, made once per ``cache`` and kept there under
    "input"; a batch already of per-sample matrices as it is."""
    return columns if columns.ndim == 3 else _kept(cache, "input", lambda: matrices_of_columns(columns, rows))


@dataclass
class Layer:
    """One module of the network, by name: the names of its parameters in the network, and the name of
    its per-sample input in its generated code. Between layers every sample is a column (a matrix as its
    vec); a module whose input or output is a per-sample matrix (a convolution's signal) takes or gives
    its batch as (rows, B, cols), and ``input_rows`` / ``output_rows`` say how many rows (None: a vector)."""

    module: str
    params: dict[str, str]  # module's parameter name → network parameter name
    input: str = "x"
    input_rows: int | None = None
    output_rows: int | None = None
    # a convolution's patches: kernel, stride, padding and dilation per dimension, and the input's extents
    window: tuple[tuple[int, ...], ...] | None = None
    dims: dict[str, int] | None = None  # a user's module's dimensions as the spec and its input bound them
    signal_rows: int | None = None  # an activation of a signal: its channels (entry by entry, any layout)

    def takes(self, columns: Any, cache: dict | None = None) -> Any:
        """The layer's input batch from the columns between layers, or from the per-sample matrices that a
        forward pass with ``matrices`` hands a signal's layers; what a layout copy made is kept in the
        layer's ``cache`` (one per batch), so that the passes after the first skip it."""
        if self.input_rows is not None:
            return kept_matrices(columns, self.input_rows, cache)
        return columns if columns.ndim == 2 else _kept(cache, "columns", lambda: columns_of_matrices(columns))

    def takes_output(self, columns: Any) -> Any:
        """A batch shaped like the layer's outputs (δZ, R{δZ}) from the columns between layers."""
        return columns if self.output_rows is None else matrices_of_columns(columns, self.output_rows)

    def patches(self, columns: Any, cache: dict | None = None) -> Any:
        """A convolution's input patches, every sample's side by side: (channels·taps, positions·B); those its
        generated code made for the batch (kept in ``cache`` under ``PATCHES_KEY``) where there are."""
        assert self.window is not None, f"{self.module} is not a convolution"
        if cache is not None and PATCHES_KEY in cache:
            return cache[PATCHES_KEY]
        return unfold(side_by_side(self.takes(columns, cache)), *self.window)


class Network:
    """A feed-forward network of library modules with a loss, run on the generated code of one backend.

    ``code`` maps module names to their imported generated code (as :mod:`mcalc.codegen.store` loads
    it); the modules it lacks come from the library's ``generated/`` folder, by
    :func:`mcalc.runtime.generated_code.library_code`, without the compiler. ``linked``: each backward
    pass of a chain of vector modules (library modules, and a user's whose ``declarations`` are given)
    runs as one program generated for the whole network and fused across its modules
    (:mod:`mcalc.codegen.network_plan`; generated on first use, which needs the compiler); other
    networks, and modes whose rules a linked program cannot hold, run module by module.
    """

    def __init__(self, spec: str, loss: str = "ce", backend: str = "numpy", seed: int = 0,
                 dtype: Any = np.float64, weights: Mapping[str, Any] | None = None,
                 code: Mapping[str, ModuleType] | None = None, linked: bool = False,
                 declarations: Mapping[str, Module] | None = None) -> None:
        if loss not in SPEC_LOSSES:
            raise McalcError(f"unknown loss '{loss}'; choose one of {', '.join(SPEC_LOSSES)}")
        if backend not in ("numpy", "cupy"):
            raise McalcError(f"unknown backend '{backend}'; choose numpy or cupy")
        if np.dtype(dtype).kind != "f":
            raise McalcError(f"dtype must be a floating type (float32, float64), not {np.dtype(dtype)}")
        self.spec, self.backend, self.dtype = spec, backend, dtype
        # one generated program per pass, fused across the modules (codegen.network_plan), where the chain allows
        self.linked = linked
        self.declarations = dict(declarations or {})  # a user's modules of ``code``, declared: what linking reads
        self._chain: Any = None
        self._linked_code: dict[tuple, ModuleType | None] = {}  # by (curvature, approximation); None: unlinkable
        # the ranks a batch is shared out over (the trainer sets it): batch means are averaged over them
        self.parallel = DataParallel()
        self.code: dict[str, ModuleType] = dict(code or {})
        tokens = parse_spec(spec, modules=[name for name in self.code if name not in SPEC_LOSSES.values()])
        self.xp = np
        if backend == "cupy":
            import cupy

            self.xp = cupy
        self.layers: list[Layer] = []
        self._params: dict[str, Any] = {}
        rng = np.random.default_rng(seed)
        self.widths = [tokens[0].size]  # the input's, then each Linear layer's and module's output width
        # each sample's shape after every width, module and flatten: (rows, cols), a vector's (n, 1)
        self.shapes = [(tokens[0].channels, tokens[0].positions) if isinstance(tokens[0], Signal)
                       else (tokens[0].size, 1)]
        # the current signal's length or image's (height, width), its positions the shape's columns; None: a vector
        extents = tokens[0].extents if isinstance(tokens[0], Signal) else None
        for token in tokens[1:]:
            if isinstance(token, Width) and self.shapes[-1][1] != 1:
                raise McalcError(f"model spec '{spec}': a width follows a signal of {self.shapes[-1][0]} × "
                                 f"{self.shapes[-1][1]}; flatten it first (…-flatten-{token.size})")
            if isinstance(token, Width):
                k = sum(layer.module == "Linear" for layer in self.layers) + 1
                self._params[f"W{k}"] = self.xp.asarray(glorot_uniform(rng, token.size, self.widths[-1]), dtype=dtype)
                self._params[f"b{k}"] = self.xp.zeros((token.size, 1), dtype=dtype)
                self.layers.append(Layer("Linear", {"W": f"W{k}", "b": f"b{k}"}))
                self._grow((token.size, 1))
            elif isinstance(token, Activation):  # entry by entry: a signal stays one
                rows, cols = self.shapes[-1]
                self.layers.append(Layer(token.module, {}, signal_rows=rows if cols != 1 else None))
            elif isinstance(token, Flatten):  # of a vector (a user's module's output, say): the identity
                self.shapes.append((self.shapes[-1][0] * self.shapes[-1][1], 1))
                extents = None
            elif isinstance(token, (Conv, Pool, Attention)) and extents is None:
                raise McalcError(f"model spec '{spec}': {type(token).__name__.lower()} needs a signal or an "
                                 f"image, but follows a vector of {self.widths[-1]}")
            elif isinstance(token, (Conv, Pool)):  # conv1.K, conv1.b, conv2.K, …
                label = f"conv{sum(layer.module.startswith('Conv') for layer in self.layers) + 1}" \
                    if isinstance(token, Conv) else None
                patches = window(token, extents)
                after = grid(extents, *patches[:4])
                if min(after) < 1:
                    raise McalcError(f"model spec '{spec}': {type(token).__name__.lower()} leaves no positions of "
                                     f"its input of {self.shapes[-1][0]} × {' × '.join(map(str, extents))}")
                self._grow(self._add_module(self._window_module(token, patches, backend), rng, label))
                if isinstance(token, Conv):
                    self.layers[-1].window = patches
                extents = after
            elif isinstance(token, Attention):  # attention1.Q, attention1.K, attention1.V; positions unchanged
                from ..layers.attention import self_attention

                label = f"attention{sum(layer.module == 'SelfAttention' for layer in self.layers) + 1}"
                module = self._compiled(self_attention(), backend, (("h", token.features), ("m", self.shapes[-1][0])))
                self._grow(self._add_module(module, rng, label))
            else:
                self._grow(self._add_module(token, rng))
                cols = self.shapes[-1][1]
                if extents is not None and cols != math.prod(extents):  # a signal's new length; an image's unknown
                    extents = (cols,) if len(extents) == 1 and cols > 1 else None
        self.loss_module = SPEC_LOSSES[loss]
        for name in [layer.module for layer in self.layers] + [self.loss_module]:
            if name not in self.code:
                self.code[name] = library_code(name, backend)
        if weights is not None:
            self.load_weights(weights)

    def _grow(self, shape: tuple[int, int]) -> None:
        """The next layer's output: each sample's shape, and its size among the widths."""
        self.shapes.append(shape)
        self.widths.append(shape[0] * shape[1])

    def _compiled(self, module: Module, backend: str, dims: tuple[tuple[str, int], ...] = ()) -> UserModule:
        """A built-in module declared on demand (a convolution, a pooling), its code generated on first use and
        cached as a user's module's is (this needs the compiler), as a module token binding ``dims``."""
        from ..codegen.store import load_code

        if module.name not in self.code:
            self.code[module.name] = load_code(module, backend)
        return UserModule(module.name, dims)

    def _window_module(self, token: Conv | Pool, patches: tuple[tuple, ...], backend: str) -> UserModule:
        """The convolution (binding its filters) or pooling module of ``token`` with the kernel, stride, padding
        and dilation of ``patches`` (:func:`window`): over a signal, one for every length; over an image, one
        for its height and width."""
        from ..layers.convolution import avg_pooling, convolution, max_pooling  # declared on demand: SymPy only here

        kernel, stride, padding, dilation, extents = patches
        size = extents if len(extents) > 1 else None
        if isinstance(token, Pool):
            declare = avg_pooling if token.kind == "avg" else max_pooling
            return self._compiled(declare(kernel, stride, padding, size), backend)
        return self._compiled(convolution(kernel, stride, padding, dilation, size), backend, (("m", token.filters),))

    def _add_module(self, token: UserModule, rng: np.random.Generator, label: str | None = None) -> tuple[int, int]:
        """A user's module (or a convolution) as the next layer: its input takes the current shape, the spec
        binds the other dimensions, its parameters start as Glorot-uniform matrices and as vectors of 0
        (or of 1 where the symbol is declared positive: a gain), named ``<label>.<symbol>`` (by default
        ``<module><position>``). Returns each sample's output shape."""
        code, name = self.code[token.name], token.name
        symbols = code.SYMBOLS
        inputs = [v for v in code.VARIABLES if v in code.PER_SAMPLE]
        others = [s for s in symbols if s not in code.VARIABLES]
        if len(inputs) != 1 or others:
            raise McalcError(f"module '{name}' cannot be a layer: a layer has one per-sample input and no "
                             f"constants (it has inputs {inputs} and constants {others})")
        (input_name,) = inputs
        dims = dict(token.dims)
        known = set().union(*(dimension_names(d) for shape in [*(s["shape"] for s in symbols.values()),
                                                                code.OUTPUT_SHAPE] for d in shape))
        if unknown := sorted(set(dims) - known):
            raise McalcError(f"module '{name}' has no dimension '{unknown[0]}'; its dimensions are "
                             f"{', '.join(sorted(known))}")
        in_shape = self.shapes[-1] if symbols[input_name]["shape"][1] != "1" else (self.widths[-1], 1)
        for declared, actual in zip(symbols[input_name]["shape"], in_shape):
            if declared.isidentifier():
                if dims.setdefault(declared, actual) != actual:
                    raise McalcError(f"module '{name}': its input has {declared} = {actual} here, not "
                                     f"{dims[declared]}")
            elif dimension_value(declared, dims, name) != actual:
                raise McalcError(f"module '{name}': its input is {' × '.join(symbols[input_name]['shape'])}, but "
                                 f"the layer before gives {in_shape[0]} × {in_shape[1]}")
        prefix = label or f"{name}{len(self.layers) + 1}"
        names = {}
        for p in code.PARAMS:
            shape = tuple(dimension_value(d, dims, name) for d in symbols[p]["shape"])
            names[p] = f"{prefix}.{p}"
            if shape[1] > 1:
                value = glorot_uniform(rng, *shape)
            else:
                value = np.full(shape, 1.0 if symbols[p]["positive"] else 0.0)
            self._params[names[p]] = self.xp.asarray(value, dtype=self.dtype)
        out_rows, out_cols = (dimension_value(d, dims, name) for d in code.OUTPUT_SHAPE)
        if min(out_rows, out_cols) < 1:
            raise McalcError(f"module '{name}' gives {out_rows} × {out_cols} per sample here: its input of "
                             f"{in_shape[0]} × {in_shape[1]} is too short")
        # a per-sample matrix (a signal) stays one where it has a single column (a signal of one position)
        matrix_in, matrix_out = symbols[input_name]["shape"][1] != "1", code.OUTPUT_SHAPE[1] != "1"
        self.layers.append(Layer(name, names, input_name, input_rows=in_shape[0] if matrix_in else None,
                                 output_rows=out_rows if matrix_out else None, dims=dims))
        return out_rows, out_cols

    @property
    def params(self) -> dict[str, Any]:
        """The parameters by name: a Linear layer's Wᵢ (out, in) and bᵢ (out, 1), numbered in order; a
        user's module's ``Name<position>.<symbol>``."""
        return self._params

    @params.setter
    def params(self, params: dict[str, Any]) -> None:
        """Rebinding them (as optimisers do every step) is checked: the same names and shapes, or an
        :class:`McalcError` (a bias of the batch's size would broadcast into a silently wrong loss)."""
        self._check_like_params(params, "parameters", " (load_weights converts PyTorch's layouts)")
        self._params = params

    def _check_like_params(self, values: Mapping[str, Any], what: str, hint: str = "") -> None:
        """``values`` by the parameters' names, each of its parameter's shape, or an :class:`McalcError`."""
        if values.keys() != self._params.keys() or any(
                tuple(getattr(values[k], "shape", ())) != tuple(v.shape) for k, v in self._params.items()):
            got = {k: tuple(getattr(v, "shape", ())) for k, v in values.items()}
            want = {k: tuple(v.shape) for k, v in self._params.items()}
            raise McalcError(f"{what} of '{self.spec}' must be {want}, not {got}{hint}")

    def _check_batch(self, X: Any) -> None:
        """X as the network takes it: (features, B), B ≥ 1 samples as columns."""
        if getattr(X, "ndim", None) != 2 or X.shape[0] != self.widths[0] or X.shape[1] < 1:
            raise McalcError(f"'{self.spec}' takes a batch X of shape ({self.widths[0]}, B), one sample per column "
                             f"and B ≥ 1, not {tuple(getattr(X, 'shape', ()))}")

    def _check_targets(self, Y: Any, Z: Any) -> None:
        """Y as the loss takes it: one column per sample of the outputs Z (a one-hot label for ce)."""
        if tuple(getattr(Y, "shape", ())) != tuple(Z.shape):
            raise McalcError(f"'{self.spec}' takes targets Y of shape {tuple(Z.shape)}, one column per sample (a "
                             f"one-hot label for ce), not {tuple(getattr(Y, 'shape', ()))}")

    def params_plus(self, updates: Mapping[str, Any]) -> dict[str, Any]:
        """θ + Δ by name, for updates Δ of every parameter (a new dict; the network's own are kept)."""
        return {name: value + updates[name] for name, value in self._params.items()}

    def load_weights(self, weights: Mapping[str, Any]) -> None:
        """Take every parameter from ``weights`` (NumPy, CuPy or torch arrays, by name: W1, b1, W2, …), each
        checked against the spec: Wᵢ is (out, in), as PyTorch's ``nn.Linear.weight``; bᵢ is (out, 1), and
        PyTorch's (out,) is taken as that column. A missing, extra or misshapen entry is refused whole."""
        names = set(self.params)
        if set(weights) != names:
            missing, extra = sorted(names - set(weights)), sorted(set(weights) - names)
            raise McalcError(f"weights for '{self.spec}' need exactly {sorted(names)}"
                             + (f"; missing {missing}" if missing else "") + (f"; unexpected {extra}" if extra else ""))
        loaded = {}
        for name, current in self.params.items():
            value = weights[name]
            value = value.detach().cpu().numpy() if hasattr(value, "detach") else value
            shape = tuple(getattr(value, "shape", ()))
            if name.startswith("b") and shape == current.shape[:1]:
                value = value.reshape(-1, 1)  # PyTorch's bias layout (out,)
            elif shape != current.shape:
                raise McalcError(f"weight {name} of '{self.spec}' must be {current.shape}"
                                 + (f" or {current.shape[:1]}" if name.startswith("b") else "") + f", not {shape}")
            loaded[name] = self.xp.asarray(value, dtype=self.dtype)
        self.params = loaded

    # --- passes -------------------------------------------------------------------
    def _module_params(self, layer: Layer, params: dict[str, Any] | None = None) -> dict[str, Any]:
        params = self.params if params is None else params
        return {own: params[name] for own, name in layer.params.items()}

    def forward(self, X: Any, params: dict[str, Any] | None = None, caches: list[dict] | None = None,
                matrices: bool = False) -> tuple[Any, list[Any]]:
        """Outputs (widths[-1], B) and the input of every layer, each a column per sample; with ``caches`` (a
        dict per layer), what each layer's forward pass shares with its gradients and curvature is kept
        there for them.

        With ``matrices`` a signal stays per-sample matrices (rows, B, cols) from the layer that makes them
        through the activations after it to the next layer that takes them (a pooling, a convolution, a
        flatten), as :meth:`adjoints` keeps them backwards: the layout copies to columns and back between
        them are never made, and such a layer's input is given in that layout (:meth:`Layer.takes` makes
        its columns where a pass needs them, once per cache). An activation runs entry by entry on
        (rows, B·cols), its cache apart from the columns' values."""
        self._check_batch(X)
        inputs, Z = [], X
        for position, layer in enumerate(self.layers):
            inputs.append(Z)
            cache = caches[position] if caches is not None else None
            P = self._module_params(layer, params)
            if Z.ndim == 3 and layer.signal_rows is not None:  # an activation, on the matrices' layout (views)
                own = None if cache is None else cache.setdefault("matrices", {})
                Z = self.code[layer.module].forward(P, {layer.input: Z.reshape(Z.shape[0], -1)}, own)["Z"] \
                    .reshape(Z.shape)
            else:
                Z = self.code[layer.module].forward(P, {layer.input: layer.takes(Z, cache)}, cache)["Z"]
            after = self.layers[position + 1] if position + 1 < len(self.layers) else None
            keep = matrices and after is not None and (after.input_rows is not None or after.signal_rows is not None)
            if Z.ndim == 3 and not keep:
                Z = columns_of_matrices(Z)
        return Z, inputs

    def loss(self, X: Any, Y: Any, params: dict[str, Any] | None = None) -> float:
        """The batch mean of the per-sample losses (over every rank's shard of the batch)."""
        Z, _ = self.forward(X, params, matrices=True)
        self._check_targets(Y, Z)
        local = float(self.code[self.loss_module].forward({}, {"x": Z, "y": Y})["Z"].mean())
        return self.parallel.mean({"loss": local}, X.shape[1])["loss"]

    def backward(self, X: Any, Y: Any, curvature: Curvature | str | None = None,
                 approximation: Approximation | str = Approximation.MEAN_OF_SANDWICHES,
                 parameters: frozenset[str] | None = None,
                 taps: dict[int, tuple[Any, Any]] | None = None) -> BackwardResult:
        """Loss, gradients of every parameter and, with ``curvature``, their HBP blocks (Section 3.3), or
        with ``parameters`` the blocks of the layers from the output down to the lowest that holds one of
        them, whose input's curvature is not formed (the arguments of a :class:`.CurvatureRequest`); with
        ``taps``, every layer's input batch and δZ as its module took them (this rank's, δZ carrying 1/B),
        kept there by layer position, for quantities the gradients do not give (Martens' squared gradients).

        The loss is the batch mean: δZ carries 1/B and 𝓗̄z is the mean of the
        per-sample loss Hessians, passed backwards module by module by (4a). On several ranks
        (:attr:`parallel`) X and Y are this rank's shard and everything returned is the global
        batch's, the same on every rank: the generated HBP code sums each batch mean over the ranks
        as it forms it (:mod:`mcalc.runtime.rank_sum`, δZ carrying 1/B_all), and the loss and the
        gradients are reduced over the ranks in one all-reduce.
        """
        loss, grads, blocks = self._backward(X, Y, curvature, approximation, parameters=parameters, taps=taps)
        if self.parallel.comm.size > 1:  # this rank's share of the sums (with blocks), else its own means
            values = {"": float(loss), **grads}
            reduced = self.parallel.sum(values) if curvature is not None else self.parallel.mean(values, X.shape[1])
            loss, grads = reduced.pop(""), reduced
        return float(loss), grads, blocks

    def output_curvatures(self, X: Any, Y: Any, curvature: Curvature | str = Curvature.GGN,
                          approximation: Approximation | str = Approximation.MEAN_OF_SANDWICHES) -> list[Any]:
        """𝓗̄ at every layer's output, in layer order (the last is the loss's own Hessian where HBP
        starts): what each module's HBP rule receives from above, by (4a)."""
        curvature = Curvature.parse(curvature)
        record: dict[int, Any] = {}
        self._backward(X, Y, curvature, approximation, record)
        return [record[position] for position in range(len(self.layers))]

    def flat(self, tensors: Mapping[str, Any]) -> Any:
        """Parameter-shaped arrays as one vector: in the order of ``params`` (W1, b1, W2, …), each in row-major
        order, as PyTorch's ``parameters_to_vector`` lays out an ``nn.Sequential`` of its Linear layers."""
        return self.xp.concatenate([self.xp.asarray(tensors[name]).reshape(-1) for name in self.params])

    def unflat(self, vector: Any) -> dict[str, Any]:
        """The inverse of :meth:`flat`."""
        out, start = {}, 0
        for name, value in self.params.items():
            out[name] = vector[start:start + value.size].reshape(value.shape)
            start += value.size
        return out

    def curvature_operator(self, X: Any, Y: Any, matrix: CurvatureMatrix | str = CurvatureMatrix.GAUSS_NEWTON) -> Any:
        """The whole network's Gauss–Newton matrix (``'gn'``) or Hessian (``'hessian'``) of the batch-mean
        loss on (X, Y) as a ``scipy.sparse.linalg.LinearOperator`` on :meth:`flat` vectors (so ``eigsh`` and
        ``cg`` work on it, as with curvlinops'), applied through :meth:`curvature_product`, never formed."""
        from scipy.sparse.linalg import LinearOperator

        product = self.curvature_product(X, Y, matrix)
        size = sum(int(v.size) for v in self.params.values())

        def matvec(v: Any) -> Any:
            out = self.flat(product(self.unflat(self.xp.asarray(np.ravel(v), dtype=self.dtype))))
            return out.get() if hasattr(out, "get") else out

        return LinearOperator((size, size), matvec=matvec, rmatvec=matvec, dtype=np.dtype(self.dtype))  # symmetric

    def capture_backward(self, X: Any, Y: Any, curvature: Curvature | str | None = None,
                         approximation: Approximation | str = Approximation.MEAN_OF_SANDWICHES,
                         parameters: frozenset[str] | None = None) -> Callable[[Any, Any], BackwardResult]:
        """:meth:`backward` recorded once as a CUDA graph (cupy backend), for batches shaped as (X, Y).

        The returned function replays it: one launch instead of one per kernel and product. Its
        gradients and blocks are the same arrays on every call, overwritten by the next one. The
        graph reads the parameter arrays bound now: update them in place, or rebind them and each
        call copies the new values into those arrays (and binds them again).
        """
        if self.backend != "cupy":
            raise McalcError(f"CUDA graphs need the cupy backend; this network runs on {self.backend}")
        from ..runtime.cuda_graph import CapturedCall

        captured = CapturedCall(lambda x, y: self._backward(x, y, curvature, approximation, parameters=parameters),
                                [X, Y], lambda: self.params)

        def replay(X: Any, Y: Any) -> BackwardResult:
            loss, grads, blocks = captured(X, Y)
            return float(loss), grads, blocks

        return replay

    def _backward(self, X: Any, Y: Any, curvature: Curvature | str | None, approximation: Approximation | str,
                  record: dict[int, Any] | None = None, taps: dict[int, tuple[Any, Any]] | None = None,
                  parameters: frozenset[str] | None = None) -> tuple[Any, dict[str, Any], dict[str, CurvatureBlock]]:
        """:meth:`backward` with the loss left on the device (no host synchronisation: capturable); with
        ``record``, the curvature arriving at each layer's output is kept there by layer position. On
        several ranks, with ``curvature``, the blocks are the global batch's and the loss and gradients
        this rank's share of it (δZ = 1/B_all); without, its own means (:meth:`backward` reduces both)."""
        if self.parallel.comm.size == 1 or curvature is None:
            return self._backward_pass(X, Y, curvature, approximation, record, taps, parameters)
        with across_ranks(self.parallel.array_sum, self.parallel.samples(X.shape[1])):
            return self._backward_pass(X, Y, curvature, approximation, record, taps, parameters)

    def _backward_pass(self, X: Any, Y: Any, curvature: Curvature | str | None, approximation: Approximation | str,
                       record: dict[int, Any] | None, taps: dict[int, tuple[Any, Any]] | None = None,
                       parameters: frozenset[str] | None = None,
                       ) -> tuple[Any, dict[str, Any], dict[str, CurvatureBlock]]:
        approximation = Approximation.parse(approximation)
        curvature = Curvature.parse(curvature) if curvature is not None else None
        if self.linked and record is None and taps is None and self.chain() is not None:
            linked = self._linked_pass(X, Y, curvature, approximation)
            if linked is not None:
                return linked
        code = self.code[self.loss_module]
        start = Approximation.MEAN_OF_SANDWICHES if approximation is Approximation.AUTO else approximation
        caches: list[dict] = [{} for _ in range(len(self.layers) + 1)]  # one per module, the loss's last
        Z, inputs = self.forward(X, caches=caches, matrices=True)
        S = self._loss_inputs(Z, Y)
        losses, B = code.forward({}, S, caches[-1])["Z"], Z.shape[1]
        # the batch mean; across ranks this rank's share of the global batch's (its sum over B_all)
        loss = losses.mean() if samples(B) == B else losses.sum() / samples(B)
        dZ = code.gradients({}, S, cache=caches[-1])["x"]
        Hz = code.LOSS_HESSIAN[start]({}, S, caches[-1])["x"].dense if curvature is not None else None
        grads: dict[str, Any] = {}
        blocks: dict[str, CurvatureBlock] = {}
        # the lowest layer whose blocks are asked for: below it no curvature is carried
        asked = [p for p, layer in enumerate(self.layers)
                 if parameters is None or parameters & {*layer.params.values()}]
        lowest = min(asked, default=len(self.layers))
        for position in reversed(range(len(self.layers))):
            layer = self.layers[position]
            P = self._module_params(layer)
            S = {layer.input: layer.takes(inputs[position], caches[position]),
                 "dz": layer.takes_output(dZ)}
            first = position == 0  # the data needs no gradient or curvature
            if taps is not None:
                taps[position] = (S[layer.input], S["dz"])
            g = self.code[layer.module].gradients(P, S, inputs=not first, cache=caches[position])
            for own, name in layer.params.items():
                grads[name] = g[own]
            if curvature is not None and position >= lowest:
                if record is not None:
                    record[position] = Hz
                mode = (curvature, self.batch_rule(layer, curvature, approximation))
                out = self.code[layer.module].HBP[mode](P, S, Hz, inputs=position > lowest, cache=caches[position])
                for own, name in layer.params.items():
                    blocks[name] = out[own]
                if position > lowest:
                    Hz = out[layer.input].dense
            if not first:
                dZ = columns_of_matrices(g[layer.input])
        return loss, grads, blocks

    def chain(self) -> Chain | None:
        """The network as a chain of declared modules for :mod:`mcalc.codegen.network_plan`, or None where it
        is not one that a linked program holds (a convolution, a module whose declaration it lacks)."""
        if self._chain is None:
            from ..codegen.network_plan import Chain, ChainLayer, bind_dims, output_size, unsupported
            from ..layers import LIBRARY

            by_name = {**{m.name: m for m in LIBRARY}, **self.declarations}
            layers, width = [], self.widths[0]
            for layer in self.layers:
                module = by_name.get(layer.module)
                if module is None or layer.input_rows is not None or layer.output_rows is not None:
                    self._chain = False
                    return None
                shapes = {layer.input: (width, 1), **{own: tuple(self._params[name].shape)
                                                      for own, name in layer.params.items()}}
                dims = {**bind_dims(module, shapes), **(layer.dims or {})}
                layers.append(ChainLayer(module, dims, dict(layer.params)))
                width = output_size(module, dims)
            loss = by_name[self.loss_module]
            chain = Chain(tuple(layers), loss, bind_dims(loss, {s.name: (width, 1) for s in loss.symbols}))
            self._chain = chain if unsupported(chain) is None else False
        return self._chain or None

    def _linked_pass(self, X: Any, Y: Any, curvature: Curvature | None, approximation: Approximation,
                     ) -> tuple[Any, dict[str, Any], dict[str, CurvatureBlock]] | None:
        """:meth:`_backward_pass` as one generated program over the whole network (generated on first use);
        None, with a warning, where a module's rule in this mode has no closed batch form to link."""
        import warnings

        from ..codegen.network_code import network_code

        if (curvature, approximation) not in self._linked_code:  # generated, or found in the cache, once
            per_layer = None  # auto: each layer's batch rule, as module by module
            if approximation is Approximation.AUTO and curvature is not None:
                per_layer = tuple(self.batch_rule(layer, curvature, approximation) for layer in self.layers)
            try:
                self._linked_code[curvature, approximation] = network_code(
                    self.chain(), curvature, approximation, self.backend, f"{self.spec}, loss {self.loss_module}",
                    per_layer)
            except McalcError as exc:
                warnings.warn(f"{exc}; this mode runs module by module", RuntimeWarning, stacklevel=3)
                self._linked_code[curvature, approximation] = None
        code = self._linked_code[curvature, approximation]
        if code is None:
            return None
        out = code.run(self.params, {"X": X, "Y": Y})
        return out["loss"].reshape(()), out["grads"], out["blocks"]

    def batch_rule(self, layer: Layer, curvature: Curvature, approximation: Approximation) -> Approximation:
        """The batch rule a layer's blocks are computed by: ``approximation`` itself, or for
        :attr:`Approximation.AUTO` (6) where the module's generated code forms it in closed form and
        6-kfac where (6) would be formed sample by sample (its ``HBP_PER_SAMPLE``)."""
        if approximation is not Approximation.AUTO:
            return approximation
        per_sample = getattr(self.code[layer.module], "HBP_PER_SAMPLE", set())
        exact = (curvature.value, Approximation.MEAN_OF_SANDWICHES.value) not in per_sample
        return Approximation.MEAN_OF_SANDWICHES if exact else Approximation.KRONECKER_FACTORED

    def _loss_inputs(self, Z: Any, Y: Any) -> dict[str, Any]:
        """The loss module's batch: outputs, labels, and δ = 1/B per sample (the loss is the batch mean;
        1/B_all, every rank's samples together, inside a backward pass on several ranks)."""
        self._check_targets(Y, Z)
        return {"x": Z, "y": Y, "dz": self.xp.full((1, Z.shape[1]), 1.0 / samples(Z.shape[1]), dtype=Z.dtype)}

    def output_gradient(self, Z: Any, Y: Any) -> Any:
        """δZ: the gradient of the batch-mean loss with respect to the network's outputs."""
        return self.code[self.loss_module].gradients({}, self._loss_inputs(Z, Y))["x"]

    def adjoints(self, inputs: list[Any], dZ: Any, caches: list[dict] | None = None,
                 matrices: bool = False) -> dict[int, Any]:
        """The adjoint of every layer's output, from ``dZ`` at the network's output (gradient backprop). Calls
        on the same ``inputs`` with other ``dZ`` may share ``caches`` (a dict per layer): what does not
        depend on dZ (a max pooling's mask, a convolution's patches) is computed once.

        With ``matrices``, an adjoint that a layer gives as per-sample matrices (rows, B, cols), a convolution's
        or a pooling's δX, stays so: the activations of a signal between such layers run entry by entry on
        that layout, and the layout copies to columns and back between them are never made (a CNN's
        K-FAC statistics), and a matrix-output layer's adjoint that arrives as columns (a flatten above it)
        is made into its matrices once, for the layer and the caller; by default every adjoint is columns."""
        out = {len(self.layers) - 1: dZ}
        for position in range(len(self.layers) - 1, 0, -1):
            layer = self.layers[position]
            cache = None if caches is None else caches[position]
            x = inputs[position]
            matrices_shape = None
            if dZ.ndim == 3 and layer.signal_rows is not None:  # entry by entry, on the matrices' layout
                cache = None if cache is None else cache.setdefault("matrices", {})  # apart from columns' values
                # (rows, B, cols) read as (rows, B·cols), views both: the activation's code (a fused kernel on
                # a GPU) runs on a batch of vectors
                matrices_shape, x = dZ.shape, kept_matrices(x, layer.signal_rows, cache)
                S = {layer.input: x.reshape(x.shape[0], -1), "dz": dZ.reshape(dZ.shape[0], -1)}
            else:  # a δZ already of per-sample matrices is the batch a matrix-output layer takes
                if dZ.ndim == 3 and layer.output_rows is None:
                    dZ = columns_of_matrices(dZ)
                S = {layer.input: layer.takes(x, cache),
                     "dz": dZ if dZ.ndim == 3 else layer.takes_output(dZ)}
            dZ = self.code[layer.module].gradients(self._module_params(layer), S, cache=cache,
                                                   params=False)[layer.input]
            if matrices_shape is not None:
                dZ = dZ.reshape(matrices_shape)
            below = self.layers[position - 1]
            if matrices and dZ.ndim == 2 and below.output_rows is not None:  # columns from a flatten: made
                dZ = below.takes_output(dZ)  # matrices once, for the layer below and the caller alike
            out[position - 1] = dZ if matrices else columns_of_matrices(dZ)
        return out

    def curvature_product(self, X: Any, Y: Any, matrix: CurvatureMatrix | str = CurvatureMatrix.GAUSS_NEWTON,
                          ) -> Callable[[dict[str, Any]], dict[str, Any]]:
        """V ↦ C V over every parameter at once, for the batch-mean loss on (X, Y), without forming C.

        ``matrix='gn'``: the Gauss–Newton matrix Jᵀ 𝓗L J (Schraudolph 2002; Martens 2010): the
        tangents R{Z} run forwards through each module's generated ``jvp``, the loss Hessian takes
        R{δZ} = 𝓗L R{Z}, and plain gradient backprop carries R{δZ} back. ``'hessian'``: the exact
        Hessian (Pearlmutter 1994): the backward pass runs each module's ``rgradients`` instead, which
        adds every module's second-order terms and the couplings between layers.
        The forward pass and the adjoints are computed once here, and each module keeps what does
        not depend on V (activation derivatives, softmax) in a cache of its own for the batch; each
        product costs one tangent pass forwards and one backwards.
        """
        matrix = CurvatureMatrix.parse(matrix)
        xp = self.xp
        Z, inputs = self.forward(X, matrices=True)
        B = X.shape[1]
        loss_S = self._loss_inputs(Z, Y)
        adjoints = self.adjoints(inputs, self.output_gradient(Z, Y)) if matrix is CurvatureMatrix.HESSIAN else {}
        caches: list[dict] = [{} for _ in range(len(self.layers) + 1)]  # the loss's is the last

        def product(V: dict[str, Any]) -> dict[str, Any]:
            self._check_like_params(V, "directions V")
            tangents, T = [], None  # the tangent of every layer's input; the data's is None
            for position, layer in enumerate(self.layers):
                P, moved = self._module_params(layer), self._module_params(layer, V)
                tangents.append(T)
                if T is not None or moved:
                    V_layer = moved if T is None else {layer.input: layer.takes(T), **moved}
                    T = columns_of_matrices(self.code[layer.module].jvp(
                        P, {layer.input: layer.takes(inputs[position], caches[position])}, V_layer,
                        inputs=T is not None, cache=caches[position])["Z"])
            loss = self.code[self.loss_module]
            R = loss.rgradients({}, loss_S, {"x": T, "dz": xp.zeros((1, B), dtype=Z.dtype)},
                                cache=caches[-1])["x"]  # 𝓗L R{Z}
            out: dict[str, Any] = {}
            for position in reversed(range(len(self.layers))):
                layer, T_in = self.layers[position], tangents[position]
                if T_in is None and not layer.params:  # a pooling before the first parameters: nothing moves
                    continue
                code, P = self.code[layer.module], self._module_params(layer)
                S = {layer.input: layer.takes(inputs[position], caches[position])}
                if matrix is CurvatureMatrix.GAUSS_NEWTON:
                    r = code.gradients(P, {**S, "dz": layer.takes_output(R)}, inputs=T_in is not None,
                                       cache=caches[position])
                else:
                    V_layer = {**self._module_params(layer, V), "dz": layer.takes_output(R),
                               **({layer.input: layer.takes(T_in)} if T_in is not None else {})}
                    r = code.rgradients(P, {**S, "dz": layer.takes_output(adjoints[position])}, V_layer,
                                        inputs=T_in is not None, cache=caches[position])
                for own, name in layer.params.items():
                    out[name] = r[own]
                if T_in is not None:
                    R = columns_of_matrices(r[layer.input])
            return self.parallel.mean(out, B)  # over every rank's shard of the batch

        return product

    def predict(self, X: Any) -> Any:
        """The model's predictive distribution softmax(z), (classes, B)."""
        return softmax(self.forward(X, matrices=True)[0])

    def accuracy(self, X: Any, labels: Any) -> float:
        Z, _ = self.forward(X, matrices=True)
        return float((self.xp.argmax(Z, axis=0) == labels).mean())
