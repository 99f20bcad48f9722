"""Kernel fusion, a planning pass: which steps of a program run fused into CUDA kernels, and the
schedule of what the generated function then runs.

A *group* is an elementwise step with the elementwise steps that feed only it (same shape), inlined
into one expression per output entry (a product diag(u) M diag(v) that only scales rows and columns
counts as elementwise). A bias added to a product, read by elementwise work alone, is computed again
inside every kernel that reads it and never written (across a linked network's modules: the bias
add inside the activation's kernels). A row sum M 1 over such a group becomes one reduction kernel,
and a column-wise softmax or log-softmax of one becomes one kernel with a thread per column (its
max, its sum of exponentials and its entries in one pass down the column). A kernel whose output is
also summed by rows writes both; kernels over the same (rows, cols), neither reading the other, share
one launch (maps with maps, maps and row sums with a row sum). :func:`fuse` hands the backend a
schedule of plain steps and :class:`Launch` steps; the CUDA source of each kernel is the printer's
(:mod:`mcalc.codegen.cuda`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp

from ..expr import (
    ONE,
    Add,
    Apply,
    BatchMean,
    Diag,
    Expr,
    Hadamard,
    Identity,
    Kron,
    LogSoftmax,
    MatMul,
    Ones,
    ScalarMul,
    ScaleBy,
    Softmax,
    broadcast_source,
    is_broadcast,
)
from ..functions import ElementwiseFunction
from .plan import Program, Reference, Step, read_by

FUSABLE = (Add, Hadamard, ScalarMul, ScaleBy, Apply)
UNNAMED = "KERNEL_NAME"  # stands for a kernel's name until its content names it (its CUDA source)


def is_all_ones(node: Expr) -> bool:
    """1 or a product of ones (1ₙ 1_Bᵀ): the constant 1 in every entry, printed in place."""
    return isinstance(node, Ones) or (isinstance(node, MatMul) and all(isinstance(a, Ones) for a in node.args))


def scaled_matrix(node: Expr) -> Expr | None:
    """M of diag(u) M diag(v) (either side may be missing or repeated): a product that only scales the
    rows and columns of one matrix, entry (r, c) = u[r] M[r, c] v[c], so elementwise work for a kernel."""
    if not isinstance(node, MatMul):
        return None
    dense = [a for a in node.args if not isinstance(a, Diag)]
    if len(dense) != 1 or len(dense) == len(node.args) or isinstance(dense[0], (Ones, Kron)) \
            or tuple(dense[0].shape) != tuple(node.shape):
        return None
    return dense[0]


def is_elementwise(node: Expr) -> bool:
    return isinstance(node, FUSABLE) or scaled_matrix(node) is not None


def is_row_sum(node: Expr) -> bool:
    return isinstance(node, MatMul) and len(node.args) == 2 and isinstance(node.args[1], Ones) \
        and node.args[1].cols == ONE and node.args[1].rows != ONE


@dataclass
class Kernel:
    """One fused kernel: output ``target`` of shape ``shape``, inputs in order, coefficients.

    ``kind`` says what it computes from ``body``: its entries ('map'), its row sums M 1 ('row_sum'),
    or its column-wise softmax or log-softmax ('softmax', 'log_softmax').

    A kernel may also write ``extra`` outputs over the same (rows, cols) in the same pass (sibling
    fusion: maps, and row sums beside a row sum); the launch then happens at ``placed_at``, the earliest
    of their steps.
    """

    name: str
    target: str
    shape: tuple[sp.Expr, sp.Expr]
    body: Expr  # the root node (an elementwise node, or the operand of a row sum or softmax)
    kind: str
    members: set[str] = field(default_factory=set)
    inputs: list[tuple[Reference, tuple[sp.Expr, sp.Expr]]] = field(default_factory=list)
    coefficients: list[sp.Expr] = field(default_factory=list)  # in the order the kernel takes them
    functions: list[ElementwiseFunction] = field(default_factory=list)
    extra: list[Kernel] = field(default_factory=list)
    placed_at: str = ""
    source: dict[str, str] = field(default_factory=dict)  # dtype → CUDA source

    @property
    def outputs(self) -> tuple[str, ...]:
        """The steps it writes: its own and its siblings'."""
        return tuple(k.target for k in (self, *self.extra))


class KernelBuilder:
    """Finds the fusion groups of a program."""

    def __init__(self, program: Program, invariant: set[str] = frozenset()) -> None:
        self.program = program
        self.invariant = invariant  # the loop-invariant steps, which a cache keeps: not merged with others
        self.by_target = {s.target: s for s in program.steps}
        self.uses = program.use_counts()
        self.kernels: list[Kernel] = []
        self.readers = program.readers()  # the nodes of the steps that read each step
        results = set(program.result_names())
        self.recomputed = {s.target for s in program.steps if s.target not in results and self._recomputable(s)}

    def _recomputable(self, step: Step) -> bool:
        """A bias added to a product, (W X) + b 1ᵀ, read by elementwise work alone (an activation, its
        derivatives, a softmax): computed again inside each kernel that reads it (one read of W X and of b
        either way), never written. Across a network's modules this fuses a bias add with the activation
        after it and with that activation's derivatives in the backward pass."""
        node = step.node
        if not isinstance(node, Add) or self.uses.get(step.target, 0) < 2 or step.target in self.invariant:
            return False
        if not all(is_broadcast(t) or not is_elementwise(t) for t in node.args):
            return False
        readers = self.readers.get(step.target, [])
        return bool(readers) and all(
            is_elementwise(r) or isinstance(r, (Softmax, LogSoftmax)) or (is_row_sum(r) and r.args[0] == node)
            for r in readers)

    def _internal(self, node: Expr, shape: tuple) -> bool:
        """Whether ``node`` is computed inside a kernel over ``shape``: elementwise, used once, and of the
        kernel's shape or a vector or scalar along it (read as entry r, c or 0: |·| of a row sum, say,
        is evaluated where the kernel reads it, instead of in a kernel of its own)."""
        name = self.program.names.get(node, "")
        step = self.by_target.get(name)
        rows, cols = shape
        return (step is not None and is_elementwise(step.node)
                and (self.uses.get(name, 0) == 1 or name in self.recomputed)
                and tuple(node.shape) in {(rows, cols), (rows, ONE), (ONE, cols), (ONE, ONE)})

    def build(self) -> list[Kernel]:
        fused: set[str] = set()
        for step in reversed(self.program.steps):
            if step.target in fused or step.target in self.recomputed:
                continue
            node = step.node
            if is_row_sum(node) and self._internal(node.args[0], node.args[0].shape):
                kernel = Kernel(UNNAMED, step.target, node.args[0].shape, node.args[0], "row_sum")
                self._collect(kernel, kernel.body, top=True)
            elif is_elementwise(node):
                kernel = Kernel(UNNAMED, step.target, node.shape, node, "map")
                self._collect(kernel, kernel.body, top=True)
            elif isinstance(node, (Softmax, LogSoftmax)):
                kind = "softmax" if isinstance(node, Softmax) else "log_softmax"
                kernel = Kernel(UNNAMED, step.target, node.shape, node.args[0], kind, members={step.target})
                self._collect(kernel, kernel.body)  # the operand: inlined when it is a group read only here
            else:
                continue
            if not kernel.inputs:  # made of constants alone: the array printer writes it in the function's dtype
                continue
            fused |= kernel.members
            kernel.placed_at = kernel.target
            self.kernels.append(kernel)
        self._sum_rows_of_written()
        self._merge_siblings()
        return self.kernels

    def _sum_rows_of_written(self) -> None:
        """A row sum M 1 of a map kernel's output M that others read too (a layer's δZ, whose row sum is
        its bias gradient) is summed by that kernel as it writes M: a row-sum kernel over M's expression
        with M as its sibling output, one launch instead of a kernel and a reduction."""
        kernel_of = {k.target: k for k in self.kernels}
        fused = set().union(*[k.members for k in self.kernels]) if self.kernels else set()
        for step in self.program.steps:
            operand = step.node.args[0] if is_row_sum(step.node) else None
            written = kernel_of.get(self.program.names.get(operand, "")) if operand is not None else None
            if written is None or written.kind != "map" or written.extra or step.target in fused \
                    or (written.target in self.invariant) != (step.target in self.invariant):
                continue
            host = Kernel(UNNAMED, step.target, written.shape, written.body, "row_sum",
                          members=written.members | {step.target}, inputs=list(written.inputs),
                          extra=[written], placed_at=written.target)
            self.kernels[self.kernels.index(written)] = host
            kernel_of[written.target] = host

    def _merge_siblings(self) -> None:
        """Kernels over the same (rows, cols), neither reading the other, become one launch that reads the
        inputs once: elementwise maps and row sums with a row sum, maps with each other (in an
        activation's exact or PCH block (6), φ′(x) for the Gram product and the row sum of δz ⊙ φ″(x);
        across a network, δz ⊙ φ′(x), its row sum (a bias gradient), φ′(x) and the row sum of δz ⊙ φ″(x))."""
        position = {s.target: i for i, s in enumerate(self.program.steps)}
        at = lambda name: position.get(name, -1)  # noqa: E731 - an argument (a leaf) is there from the start
        hosts = sorted([k for k in self.kernels if k.kind in ("row_sum", "map")], key=lambda k: k.kind != "row_sum")
        for host in hosts:
            if host not in self.kernels:
                continue  # merged into another already
            absorbed = ("map", "row_sum") if host.kind == "row_sum" else ("map",)  # a block per row sums too
            for other in [k for k in self.kernels if k.kind in absorbed and k is not host
                          and (not k.extra or host.kind == "row_sum")]:
                if other.shape != host.shape or (other.target in self.invariant) != (host.target in self.invariant):
                    continue
                first, later = sorted((host, other), key=lambda k: at(k.placed_at))
                if any(at(name) >= at(first.placed_at) for name, _ in later.inputs):
                    continue  # the later one needs what is computed from the earlier one's place on
                if any(name in other.outputs for name, _ in host.inputs) or \
                        any(name in host.outputs for name, _ in other.inputs):
                    continue  # one reads the other's output
                host.extra += [other, *other.extra]  # its own siblings become the host's
                other.extra = []
                host.members |= other.members
                host.inputs += [i for i in other.inputs if i not in host.inputs]
                host.placed_at = first.placed_at
                self.kernels.remove(other)

    def _collect(self, kernel: Kernel, node: Expr, top: bool = False) -> None:
        if top or self._internal(node, kernel.shape):
            kernel.members.add(self.program.names[node])
            for child in node.children:
                for target in read_by(node, child):
                    if isinstance(target, Identity) or is_all_ones(target):
                        continue
                    if isinstance(child, Diag) and scaled_matrix(node) is not None:
                        self._add_input(kernel, target)  # read at r or at c by the scaling, never inlined
                        continue
                    self._collect(kernel, target)
            return
        if is_all_ones(node):
            return
        source = broadcast_source(node)
        if source is not node and self._internal(source, kernel.shape):
            self._collect(kernel, source)
            return
        self._add_input(kernel, source)

    def _add_input(self, kernel: Kernel, node: Expr) -> None:
        name = self.program.names[node]
        if name not in [n for n, _ in kernel.inputs]:
            kernel.inputs.append((name, node.shape))

def live_steps(program: Program, kernels: list[Kernel]) -> set[str]:
    """The targets of the steps the function must run (a kernel's: where it is placed): those its
    results need, through the printed steps' operands and the kernels' inputs. A step fused into a
    kernel is not run, nor one that kernels read only in place (the broadcast v 1ᵀ is read as v)."""
    needed = set(program.result_names())
    outputs = {target: k for k in kernels for target in k.outputs}
    members = set().union(*[k.members for k in kernels])
    live = set()
    for step in reversed(program.steps):
        if step.target not in needed:
            continue
        if step.target in outputs:
            live.add(outputs[step.target].placed_at)
            needed |= {name for name, _ in outputs[step.target].inputs}
        elif step.target in members:
            continue
        else:
            live.add(step.target)
            if not isinstance(step.node, BatchMean):  # a per-sample fallback reads the batch itself
                needed |= {program.names.get(read) for child in step.node.children
                           for read in read_by(step.node, child)}
    return live


@dataclass
class Launch:
    """A step of the schedule: ``kernel`` launched where its first output is due, writing every output."""

    kernel: Kernel

    @property
    def targets(self) -> tuple[str, ...]:
        return self.kernel.outputs


def fuse(program: Program, invariant: set[str] = frozenset()) -> tuple[list[Step | Launch], list[Kernel]]:
    """The fusion pass: the schedule of ``program`` (in program order, the steps its results need that
    no kernel computes, and a :class:`Launch` where each kernel is placed) and its kernels.
    ``invariant``: the loop-invariant steps, which a cache keeps (a kernel never mixes them with others)."""
    kernels = KernelBuilder(program, invariant).build()
    live = live_steps(program, kernels)
    launches = {k.placed_at: k for k in kernels}
    schedule: list[Step | Launch] = [Launch(launches[s.target]) if s.target in launches else s
                                     for s in program.steps if s.target in live]
    return schedule, kernels


def unfused(program: Program, invariant: set[str] = frozenset()) -> tuple[list[Step | Launch], list[Kernel]]:
    """The schedule without fusion: every step, in program order (the NumPy family's)."""
    return list(program.steps), []
