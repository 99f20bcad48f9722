"""Network plans: a chain of modules linked into one program per pass, planned across module boundaries.

A network's backward pass called module by module hands each module's results to the next through
Python: the planner sees one module at a time, so the bias add of a linear layer and the activation after
it, or an activation's δz ⊙ φ′(x) and the next bias's row sum, run as separate launches. Here the batch
rules of every module are instantiated for the network (their dimensions bound to the layers' sizes,
their parameters renamed W1, b1, …) and linked: a module's input is the previous module's output
expression, its δz the next module's δx expression, its 𝓗z the next module's 𝓗x rule (4a). One
:class:`~mcalc.codegen.plan.ProgramBuilder` over the whole pass names every distinct node once, and the
fusion pass (:mod:`.fusion`) then fuses across the boundaries as it would inside one module. Each
module's own generated code is untouched: a user who calls a module alone keeps it.

A chain qualifies when each module takes one per-sample vector and declares no per-sample constant,
the loss takes the network's outputs and the labels, and every batch rule has a closed form (no
per-sample fallback): MLPs of the built-in library, and users' vector modules.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import sympy as sp

from ..calculus.derivation import Derivation
from ..errors import McalcError
from ..expr import BATCH, ONE, SAMPLES, BatchMean, Expr, MatMul, Ones, ScalarMul, Stacked, Symbol, map_dims, substitute
from ..modes import Approximation, Curvature
from ..module import Module
from .batch import batch_forward, batch_gradient, batch_hbp
from .plan import Program, ProgramBuilder

INPUT, LABELS = "X", "Y"  # the pass's batch arguments: the network's inputs and labels, one column per sample


@dataclass(frozen=True)
class ChainLayer:
    """One layer of a chain: its module, the sizes its dimensions take here, and the network's name of
    each of its parameters (``{'W': 'W1', 'b': 'b1'}``)."""

    module: Module
    dims: Mapping[str, int]
    params: Mapping[str, str]


def bind_dims(module: Module, shapes: Mapping[str, tuple[int, int]]) -> dict[str, int]:
    """The sizes of ``module``'s dimensions from the shapes its symbols take in a network (by name); a
    clear error where two of them disagree."""
    sizes: dict[str, int] = {}
    for s in module.symbols:
        if s.name not in shapes:
            continue
        for declared, actual in zip(s.shape, shapes[s.name]):
            declared = sp.sympify(declared)
            if declared.is_Symbol and sizes.setdefault(str(declared), actual) != actual:
                raise McalcError(f"module {module.name}: {declared} is {sizes[str(declared)]} and {actual} "
                                 "in this network")
    return sizes


def output_size(module: Module, sizes: Mapping[str, int]) -> int:
    """The size of ``module``'s output per sample, its dimensions at ``sizes``."""
    expr = sp.sympify(module.output.rows * module.output.cols)
    return int(expr.xreplace({d: sizes[str(d)] for d in expr.free_symbols}))


@dataclass(frozen=True)
class Chain:
    """A network as a chain of layers and the loss on its outputs (whose size binds its dimensions)."""

    layers: tuple[ChainLayer, ...]
    loss: Module
    loss_dims: Mapping[str, int]

    def key(self) -> str:
        """A hash of what the linked programs depend on: each module's declaration, sizes and names."""
        parts = [(repr(layer.module.output), sorted(layer.dims.items()), sorted(layer.params.items()))
                 for layer in self.layers] + [(repr(self.loss.output), sorted(self.loss_dims.items()))]
        return hashlib.sha256(repr(parts).encode()).hexdigest()


def unsupported(chain: Chain) -> str | None:
    """Why ``chain`` cannot be linked into one program, or None when it can."""
    for layer in chain.layers:
        m = layer.module
        if len(m.inputs) != 1 or m.constants:
            return f"module {m.name} takes {len(m.inputs)} inputs and {len(m.constants)} constants, not one input"
        if any(s.cols != ONE for s in (*m.inputs, m.output)):
            return f"module {m.name} has a per-sample matrix (a convolution's patches, say)"
    if len(chain.loss.inputs) != 1 or len(chain.loss.constants) > 1 or chain.loss.output.shape != (ONE, ONE):
        return f"loss {chain.loss.name} is not one number per sample of the outputs and the labels"
    return None


_DERIVATIONS: dict[int, tuple[Module, Derivation]] = {}


def _derivation(module: Module) -> Derivation:
    """The module's derivation, made once per module object (deriving is symbolic work)."""
    if id(module) not in _DERIVATIONS:
        _DERIVATIONS[id(module)] = (module, Derivation(module))
    return _DERIVATIONS[id(module)][1]


class _Instance:
    """A module's batch rules instantiated for one layer: its dimensions bound, its parameters renamed,
    its batch arguments (input, δz, 𝓗z, labels) replaced by the expressions that the linking gives."""

    def __init__(self, module: Module, dims: Mapping[str, int], params: Mapping[str, str]) -> None:
        self.derivation = _derivation(module)
        extents = {d for s in module.symbols for extent in s.shape for d in sp.sympify(extent).free_symbols}
        self.dims = {d: sp.Integer(dims[str(d)]) for d in extents if str(d) in dims}
        missing = sorted(str(d) for d in extents if str(d) not in dims)
        if missing:
            raise McalcError(f"module {module.name}: no size for its dimension {missing[0]} in this network")
        self.renamed: dict[Expr, Expr] = {}
        for p in module.params:
            bound = map_dims(p, self.dims)
            self.renamed[bound] = Symbol(params[p.name], *bound.shape)
        d = self.derivation
        self.input = self.bound(Stacked(module.inputs[0]))
        self.dz, self.Hz = self.bound(Stacked(d.dz)), self.bound(d.Hz)
        self.constant = self.bound(Stacked(module.constants[0])) if module.constants else None

    def bound(self, e: Expr) -> Expr:
        return map_dims(e, self.dims)

    def instance(self, rule: Expr, arguments: dict[Expr, Expr]) -> Expr:
        """``rule`` for this layer, reading ``arguments`` (batch leaves → their expressions)."""
        linked = substitute(self.bound(rule), {**self.renamed, **arguments})
        if any(isinstance(node, BatchMean) for node in linked.walk()):
            raise McalcError(f"module {self.derivation.module.name}: a batch rule has no closed form "
                             "(a per-sample fallback), which one linked program cannot hold")
        return linked


def link(chain: Chain, curvature: Curvature | None, approximation: Approximation,
         per_layer: tuple[Approximation, ...] | None = None) -> Program:
    """One pass over ``chain`` as one program: forward, the batch-mean loss (``'loss'``), the gradient
    of every parameter (``'grad:W1'``, …) and, with ``curvature``, its HBP block by ``approximation``
    (``'block:W1'``, …), or by each layer's own in ``per_layer`` (what :attr:`Approximation.AUTO` chose
    for it; HBP then starts from the loss's (6) blocks). Its arguments are the batch ``S['X']``,
    ``S['Y']`` and the parameters ``P`` by network name. δZ carries 1/B_all (the batch mean; every
    rank's samples in data parallelism, where the gradients and loss are this rank's share of them)."""
    why = unsupported(chain)
    if why is not None:
        raise McalcError(f"this network cannot be linked into one program: {why}")
    approximation = Approximation.MEAN_OF_SANDWICHES if approximation is Approximation.AUTO else approximation
    per_layer = per_layer or (approximation,) * len(chain.layers)
    layers = [_Instance(layer.module, layer.dims, layer.params) for layer in chain.layers]
    loss = _Instance(chain.loss, chain.loss_dims, {})
    inputs, Z = [], Stacked(Symbol(INPUT, layers[0].input.rows, ONE))
    for layer in layers:
        inputs.append(Z)
        Z = layer.instance(batch_forward(layer.derivation), {layer.input: Z})
    per_sample_mean = ScalarMul(1 / SAMPLES, Ones(ONE, BATCH))  # δ of each sample's loss: 1/B_all
    at_loss = {loss.input: Z, loss.dz: per_sample_mean}
    if loss.constant is not None:
        at_loss[loss.constant] = Stacked(Symbol(LABELS, loss.constant.rows, ONE))
    builder, outputs = ProgramBuilder(), chain.loss.inputs[0].name
    losses = loss.instance(batch_forward(loss.derivation), at_loss)
    builder.named_result("loss", ScalarMul(1 / SAMPLES, MatMul(losses, Ones(BATCH, ONE))))
    dZ = loss.instance(batch_gradient(loss.derivation, outputs), at_loss)
    Hz = None  # where HBP starts: the loss's own Hessian, (4a) with nothing from above
    if curvature is not None:
        Hz = loss.instance(batch_hbp(loss.derivation, outputs, Curvature.EXACT, approximation, terminal=True), at_loss)
    blocks = {}
    for position in reversed(range(len(layers))):
        layer, d = layers[position], layers[position].derivation
        arguments = {layer.input: inputs[position], layer.dz: dZ, **({layer.Hz: Hz} if Hz is not None else {})}
        for p in d.module.params:
            name = layer.renamed[layer.bound(p)].name
            builder.named_result(f"grad:{name}", layer.instance(batch_gradient(d, p.name), arguments))
            if curvature is not None:
                rule = batch_hbp(d, p.name, curvature, per_layer[position])
                blocks[f"block:{name}"] = layer.instance(rule, arguments)
        if position > 0:  # the data needs no gradient or curvature
            x = d.module.inputs[0].name
            if curvature is not None:
                Hz = layer.instance(batch_hbp(d, x, curvature, per_layer[position]), arguments)
            dZ = layer.instance(batch_gradient(d, x), arguments)
    builder.program.results.update(builder.blocks(blocks))
    return builder.program
