"""The CuPy backend: elementwise and reducing work fused into CUDA kernels around cuBLAS products.

Fusion: a *group* is an elementwise step with the elementwise steps that feed
only it (same shape), inlined into one expression per output entry (a product
diag(u) M diag(v) that only scales rows and columns counts as elementwise). A
row sum M 1 over such a group becomes one reduction kernel, and a column-wise
softmax or log-softmax of one becomes one kernel with a thread per column (its
max, its sum of exponentials and its entries in one pass down the column,
instead of five or six CuPy operations). Everything else (matrix products,
eigen-projections) is printed as CuPy calls by the array printer. Kernels are
printed for float and double (SymPy's C99 printer with the matching math
functions); coefficients in the dimensions (1/B) are passed as kernel arguments.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import sympy as sp
from sympy.codegen.ast import float32, float64, real
from sympy.printing.c import C99CodePrinter

from .. import __version__
from ..expr import (
    ONE,
    Add,
    Apply,
    BatchMean,
    Diag,
    Expr,
    Hadamard,
    Identity,
    LogSoftmax,
    MatMul,
    Ones,
    ScalarMul,
    ScaleBy,
    Softmax,
)
from ..functions import ElementwiseFunction
from .numpy_printer import ArrayPrinter, through_base
from .plan import ModulePlan, Program, _in_place, invariant_steps, sanitise
from .render import assemble_context, environment, functions_of, module_context

DTYPES = {"float": float32, "double": float64}
FUSABLE = (Add, Hadamard, ScalarMul, ScaleBy, Apply)
# what a kernel of each kind computes, and how it is launched (the runtime's ``layout``): a thread per
# entry, a block per row (a tree reduction), or a thread per column (a loop down the column)
LAYOUTS = {"map": "entries", "row_sum": "rows", "softmax": "columns", "log_softmax": "columns"}
_UNNAMED = "KERNEL_NAME"  # stands for a kernel's name until its content names it


def _is_broadcast(node: Expr) -> bool:
    """v 1ᵀ or 1 wᵀ: a vector repeated, read in place by a kernel."""
    return isinstance(node, MatMul) and len(node.args) == 2 and (
        (isinstance(node.args[1], Ones) and node.args[0].cols == ONE and node.args[1].rows == ONE)
        or (isinstance(node.args[0], Ones) and node.args[1].rows == ONE and node.args[0].cols == ONE))


def _is_all_ones(node: Expr) -> bool:
    """1 or a product of ones (1ₙ 1_Bᵀ): the constant 1 in every entry, printed in place."""
    return isinstance(node, Ones) or (isinstance(node, MatMul) and all(isinstance(a, Ones) for a in node.args))


def _broadcast_source(node: Expr) -> Expr:
    """v for the broadcast v 1ᵀ or 1 vᵀ; any other node itself."""
    if not _is_broadcast(node):
        return node
    return node.args[1] if isinstance(node.args[0], Ones) else node.args[0]


def _scaled_matrix(node: Expr) -> Expr | None:
    """M of diag(u) M diag(v) (either side may be missing or repeated): a product that only scales the
    rows and columns of one matrix, entry (r, c) = u[r] M[r, c] v[c], so elementwise work for a kernel."""
    if not isinstance(node, MatMul):
        return None
    dense = [a for a in node.args if not isinstance(a, Diag)]
    if len(dense) != 1 or len(dense) == len(node.args) or isinstance(dense[0], Ones) \
            or tuple(dense[0].shape) != tuple(node.shape):
        return None
    return dense[0]


def _is_elementwise(node: Expr) -> bool:
    return isinstance(node, FUSABLE) or _scaled_matrix(node) is not None


def _is_row_sum(node: Expr) -> bool:
    return isinstance(node, MatMul) and len(node.args) == 2 and isinstance(node.args[1], Ones) \
        and node.args[1].cols == ONE and node.args[1].rows != ONE


@dataclass
class Kernel:
    """One fused kernel: output ``target`` of shape ``shape``, inputs in order, coefficients.

    ``kind`` says what it computes from ``body``: its entries ('map'), its row sums M 1 ('row_sum'),
    or its column-wise softmax or log-softmax ('softmax', 'log_softmax').

    A row-sum kernel may also write ``extra`` elementwise outputs over the same (rows, cols) in the
    same pass (sibling fusion); the launch then happens at ``placed_at``, the earlier of their steps.
    """

    name: str
    target: str
    shape: tuple[sp.Expr, sp.Expr]
    body: Expr  # the root node (an elementwise node, or the operand of a row sum or softmax)
    kind: str
    members: set[str] = field(default_factory=set)
    inputs: list[tuple[str, tuple[sp.Expr, sp.Expr]]] = field(default_factory=list)
    coefficients: list[sp.Expr] = field(default_factory=list)  # in the order the kernel takes them
    functions: list[ElementwiseFunction] = field(default_factory=list)
    extra: list[Kernel] = field(default_factory=list)
    placed_at: str = ""
    source: dict[str, str] = field(default_factory=dict)  # dtype → CUDA source


class KernelBuilder:
    """Finds fusion groups in a program and prints their CUDA source."""

    def __init__(self, program: Program, invariant: set[str] = frozenset()) -> None:
        self.program = program
        self.invariant = invariant  # the loop-invariant steps, which a cache keeps: not merged with others
        self.by_target = {s.target: s for s in program.steps}
        self.uses = program.use_counts()
        self.kernels: list[Kernel] = []

    def _internal(self, node: Expr, shape: tuple) -> bool:
        """Whether ``node`` is computed inside a kernel over ``shape``: elementwise, used once, and of the
        kernel's shape or a vector or scalar along it (read as entry r, c or 0: |·| of a row sum, say,
        is evaluated where the kernel reads it, instead of in a kernel of its own)."""
        name = self.program.names.get(node, "")
        step = self.by_target.get(name)
        rows, cols = shape
        return (step is not None and _is_elementwise(step.node) and self.uses.get(name, 0) == 1
                and tuple(node.shape) in {(rows, cols), (rows, ONE), (ONE, cols), (ONE, ONE)})

    def build(self) -> list[Kernel]:
        fused: set[str] = set()
        for step in reversed(self.program.steps):
            if step.target in fused:
                continue
            node = step.node
            if _is_row_sum(node) and self._internal(node.args[0], node.args[0].shape):
                kernel = Kernel(_UNNAMED, step.target, node.args[0].shape, node.args[0], "row_sum")
                self._collect(kernel, kernel.body, top=True)
            elif _is_elementwise(node):
                kernel = Kernel(_UNNAMED, step.target, node.shape, node, "map")
                self._collect(kernel, kernel.body, top=True)
            elif isinstance(node, (Softmax, LogSoftmax)):
                kind = "softmax" if isinstance(node, Softmax) else "log_softmax"
                kernel = Kernel(_UNNAMED, step.target, node.shape, node.args[0], kind, members={step.target})
                self._collect(kernel, kernel.body)  # the operand: inlined when it is a group read only here
            else:
                continue
            if not kernel.inputs:  # made of constants alone: the array printer writes it in the function's dtype
                continue
            fused |= kernel.members
            kernel.placed_at = kernel.target
            self.kernels.append(kernel)
        self._merge_siblings()
        for kernel in self.kernels:
            kernel.source = {dtype: self._source(kernel, dtype) for dtype in DTYPES}
            # named by content: the same kernel in another program (another curvature mode, say)
            # gets the same name, so a module's source holds and compiles it once
            digest = hashlib.sha256("".join(kernel.source.values()).encode()).hexdigest()[:12]
            kernel.name = f"k_{digest}"
            kernel.source = {dtype: src.replace(_UNNAMED, kernel.name) for dtype, src in kernel.source.items()}
        return self.kernels

    def _merge_siblings(self) -> None:
        """A row sum and an elementwise kernel over the same (rows, cols), neither reading the other,
        become one launch that reads the inputs once: in an activation's exact or PCH block (6), φ′(x)
        for the Gram product and the row sum of δz ⊙ φ″(x)."""
        position = {s.target: i for i, s in enumerate(self.program.steps)}
        at = lambda name: position.get(name, -1)  # noqa: E731 - an argument (a leaf) is there from the start
        for host in [k for k in self.kernels if k.kind == "row_sum"]:
            for other in [k for k in self.kernels if k.kind == "map" and not k.extra]:
                if other.shape != host.shape or (other.target in self.invariant) != (host.target in self.invariant):
                    continue
                first, later = sorted((host, other), key=lambda k: at(k.target))
                if any(at(name) >= at(first.target) for name, _ in later.inputs):
                    continue  # the later one needs what is computed from the earlier one's place on
                host.extra.append(other)
                host.members |= other.members
                host.inputs += [i for i in other.inputs if i not in host.inputs]
                host.placed_at = first.target
                self.kernels.remove(other)
                break

    def _collect(self, kernel: Kernel, node: Expr, top: bool = False) -> None:
        if top or self._internal(node, kernel.shape):
            kernel.members.add(self.program.names[node])
            for child in node.children:
                target = _in_place(node, child)
                if isinstance(target, Identity) or _is_all_ones(target):
                    continue
                if isinstance(child, Diag) and _scaled_matrix(node) is not None:
                    self._add_input(kernel, target)  # read at r or at c by the scaling, never inlined
                    continue
                self._collect(kernel, target)
            return
        if _is_all_ones(node):
            return
        source = _broadcast_source(node)
        if source is not node and self._internal(source, kernel.shape):
            self._collect(kernel, source)
            return
        self._add_input(kernel, source)

    def _add_input(self, kernel: Kernel, node: Expr) -> None:
        name = self.program.names[node]
        if name not in [n for n, _ in kernel.inputs]:
            kernel.inputs.append((name, node.shape))

    # --- CUDA source ------------------------------------------------------------
    def _source(self, kernel: Kernel, dtype: str) -> str:
        printer = _ElementPrinter(self, kernel, dtype)
        value = printer.element(kernel.body)
        extra_values = [printer.element(e.body) for e in kernel.extra]
        kernel.coefficients, kernel.functions = printer.coefficients, printer.functions
        return environment().get_template("cupy/kernel.cu.j2").render(
            kernel=kernel, dtype=dtype, value=value, extra_values=extra_values, inputs=printer.loads,
            coefficients=[f"c{i}" for i in range(len(printer.coefficients))],
        )


class _ElementPrinter:
    """Prints one entry (row r, column c) of a fused expression as CUDA C."""

    def __init__(self, builder: KernelBuilder, kernel: Kernel, dtype: str) -> None:
        self.builder, self.kernel, self.dtype = builder, kernel, dtype
        self.functions: list[ElementwiseFunction] = []
        self.loads = [(f"in{i}", self._index(shape)) for i, (_, shape) in enumerate(kernel.inputs)]
        self.coefficients: list[sp.Expr] = []

    def _index(self, shape: tuple) -> str:
        rows, cols = self.kernel.shape
        if tuple(shape) == (ONE, ONE):
            return "0"
        if shape[1] == ONE and shape[0] == rows:
            return "r"
        if shape[0] == ONE and shape[1] == cols:
            return "c"
        return "r * cols + c"

    def load(self, node: Expr, index: str | None = None) -> str:
        """The kernel's input ``node`` at (r, c), or at ``index`` (a scaling vector at r or at c)."""
        source = _broadcast_source(node)
        name = self.builder.program.names[source]
        position = [n for n, _ in self.kernel.inputs].index(name)
        return f"in{position}[{self._index(source.shape) if index is None or source.shape == (ONE, ONE) else index}]"

    def element(self, node: Expr) -> str:
        names = self.builder.program.names
        if _is_all_ones(node):
            return f"({self.dtype})1"
        if isinstance(node, Identity):
            return f"(r == c ? ({self.dtype})1 : ({self.dtype})0)"
        if names.get(node) not in self.kernel.members:
            source = _broadcast_source(node)
            return self.element(source) if names.get(source) in self.kernel.members else self.load(node)
        if isinstance(node, Add):
            terms = []
            for t in node.args:
                coefficient, core = (t.args[0], t.args[1]) if isinstance(t, ScalarMul) else (None, t)
                if isinstance(core, (Diag, Identity)):
                    inner = self.element(core.args[0]) if isinstance(core, Diag) else "1"
                    if coefficient is not None:
                        inner = f"({self._coefficient_name(coefficient)} * {inner})"
                    terms.append(f"(r == c ? {inner} : ({self.dtype})0)")
                else:
                    terms.append(self.element(t))
            return "(" + " + ".join(terms) + ")"
        if _scaled_matrix(node) is not None:  # u[r] M[r, c] v[c]
            factors, past_matrix = [], False
            for a in node.args:
                if isinstance(a, Diag):
                    factors.append(self.load(a.args[0], "c" if past_matrix else "r"))
                else:
                    factors.append(self.element(a))
                    past_matrix = True
            return "(" + " * ".join(factors) + ")"
        if isinstance(node, Hadamard):
            return "(" + " * ".join(self.element(f) for f in node.args) + ")"
        if isinstance(node, ScalarMul):
            return f"({self._coefficient_name(node.args[0])} * {self.element(node.args[1])})"
        if isinstance(node, ScaleBy):
            return f"({self.element(node.args[0])} * {self.element(node.args[1])})"
        if isinstance(node, Apply):
            f = node.args[0]
            if f not in self.functions:
                self.functions.append(f)
            return f"{_device_name(f)}_{self.dtype}({self.element(node.args[1])})"
        raise NotImplementedError(type(node).__name__)

    def _coefficient_name(self, c: sp.Expr) -> str:
        self.coefficients.append(c)
        return f"c{len(self.coefficients) - 1}"


def device_function(f: ElementwiseFunction, dtype: str) -> str:
    """``__device__ T fn_sigmoid_1(T t)`` from φ^(k)'s SymPy formula (a step is 0 at its kink)."""
    expr = f.expr.replace(sp.Heaviside, lambda arg, *rest: sp.Piecewise((1, arg > 0), (0, True)))
    expr = expr.rewrite(sp.Piecewise) if expr.has(sp.Max, sp.Min) else expr  # ternaries: no host-only fmax(int, T)
    t = next(iter(expr.free_symbols), sp.Symbol("t"))
    printer = C99CodePrinter(settings={"type_aliases": {real: DTYPES[dtype]}})
    name = f"{_device_name(f)}_{dtype}"
    pieces = through_base(f)
    if pieces is not None:  # φ^(k) = g(φ): evaluate φ once
        base, g = (" ".join(printer.doprint(e).split()) for e in pieces)
        return (f"static __device__ __forceinline__ {dtype} {name}({dtype} t) {{ const {dtype} s = ({dtype})({base}); "
                f"return ({dtype})({g}); }}")
    body = " ".join(printer.doprint(expr.xreplace({t: sp.Symbol("t")})).split())
    return f"static __device__ __forceinline__ {dtype} {name}({dtype} t) {{ return ({dtype})({body}); }}"


def _device_name(f: ElementwiseFunction) -> str:
    return f"fn_{sanitise(f.base.name)}_{f.order}"


# --- the generated CuPy module -----------------------------------------------------------
def _program_context(program: Program, family: str | None = None) -> dict[str, Any]:
    invariant = invariant_steps(program, family)
    kernels = KernelBuilder(program, invariant).build()
    launches = {k.placed_at: k for k in kernels}
    printer = ArrayPrinter(lambda node: program.names[node], program.overwritable(invariant), "_matmul({a}, {b})")
    lines, calls = [], iter(program.fallbacks)
    live = _live_steps(program, kernels)
    for step in program.steps:
        if step.target not in live:
            continue  # fused into a kernel, or only read in place by one (a broadcast)
        if step.target in launches:
            k = launches[step.target]
            dims = ", ".join(printer.dim(d) for d in k.shape)
            shape = lambda rows, cols: f"({printer.dim(rows)}, {printer.dim(cols)})"  # noqa: E731
            out = shape(k.shape[0], ONE) if k.kind == "row_sum" else shape(*k.shape)
            if k.extra:
                out = "[" + ", ".join([out, *[shape(*e.shape) for e in k.extra]]) + "]"
            coefficients = ", ".join(printer.dim(c) for c in k.coefficients)
            args = ", ".join(name for name, _ in k.inputs)
            targets = tuple(t.target for t in (k, *k.extra))
            lines.append((targets, f"{', '.join(targets)} = _launch({k.name!r}, dtype, ({dims}), {out}, [{args}], "
                                   f"[{coefficients}], {LAYOUTS[k.kind]!r})"))
        elif isinstance(step.node, BatchMean):
            lines.append((step.target, f"{step.target} = {next(calls)[0]}()"))
        else:
            lines.append((step.target, f"{step.target} = {printer.rhs(step.node)}"))
    inner = [_program_context(p) for _, p, _ in program.fallbacks]
    kernels += [k for context in inner for k in context["kernels"]]
    return {**assemble_context(program, lines, invariant, inner), "kernels": kernels}


def _live_steps(program: Program, kernels: list[Kernel]) -> set[str]:
    """The targets of the steps the function must run (a kernel's: where it is placed): those its
    results need, through the printed steps' operands and the kernels' inputs. A step fused into a
    kernel is not run, nor one that kernels read only in place (the broadcast v 1ᵀ is read as v)."""
    needed = set(program.result_names())
    outputs = {t.target: k for k in kernels for t in (k, *k.extra)}
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
                needed |= {program.names.get(_in_place(step.node, child)) for child in step.node.children}
    return live


def _contexts(plan: ModulePlan) -> tuple[dict, dict[str, dict], list[Kernel]]:
    """Every program of a module printed for CuPy (forward, then by family), and all their kernels."""
    forward = _program_context(plan.forward)
    families = {family: {key: _program_context(p, family) for key, p in programs.items()}
                for family, programs in plan.families().items()}
    contexts = [forward, *[c for family in families.values() for c in family.values()]]
    return forward, families, [k for c in contexts for k in c["kernels"]]


def render_cupy_module(plan: ModulePlan) -> str:
    forward, families, kernels = _contexts(plan)
    return environment().get_template("cupy/module.py.j2").render(
        module=module_context(plan), version=__version__, backend="cupy", functions=functions_of(plan),
        forward=forward, cuda_source=cuda_source(kernels), **families,
    )


def kernel_sources(plan: ModulePlan) -> str:
    """Every CUDA kernel of a module, for compiling offline (``mcalc verify --compile-only``)."""
    return cuda_source(_contexts(plan)[2])


def cuda_source(kernels: list[Kernel]) -> str:
    """One translation unit: each device function once per dtype, then each distinct kernel once."""
    functions: dict[str, str] = {}
    for k in kernels:
        for f in k.functions:
            for dtype in DTYPES:
                functions.setdefault(f"{_device_name(f)}_{dtype}", device_function(f, dtype))
    header = "// Generated by mcalc: fused elementwise and reduction kernels.\n"
    return header + "\n".join(functions[name] for name in sorted(functions)) + "\n\n" + "\n".join(
        k.source[dtype] for k in {k.name: k for k in kernels}.values() for dtype in DTYPES)
