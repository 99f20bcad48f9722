"""The CuPy backend: the kernels :mod:`.fusion` plans printed as CUDA C, and the launches and cuBLAS
products around them printed as CuPy calls.

Kernels are printed for float and double (SymPy's C99 printer with the matching math functions) and
named by their content, so a kernel shared by several functions (another curvature mode, say) is
compiled once; coefficients in the dimensions (1/B) are passed as kernel arguments. Everything that is
not fused (matrix products, eigen-projections) is printed by the array printer.
"""
from __future__ import annotations

import hashlib
import re

import sympy as sp
from sympy.codegen.ast import float32, float64, real
from sympy.printing.c import C99CodePrinter, get_math_macros

from .. import __version__
from ..expr import ONE, Add, Apply, Diag, Expr, Hadamard, Identity, ScalarMul, ScaleBy, broadcast_source
from ..functions import ElementwiseFunction
from ..runtime.cuda import THREADS_PER_BLOCK, Layout
from .fusion import UNNAMED, Kernel, Launch, fuse, is_all_ones, scaled_matrix
from .numpy_printer import ArrayPrinter, reference_code, through_base
from .plan import ModulePlan, Program, Step, sanitise
from .render import ArrayFamily, environment, functions_of, module_context, program_contexts

DTYPES = {"float": float32, "double": float64}
# how a kernel of each kind is launched (the runtime's ``layout``): a thread per entry, a block per row
# (a tree reduction), or a thread per column (a loop down the column)
LAYOUTS = {"map": Layout.ENTRIES, "row_sum": Layout.ROWS, "softmax": Layout.COLUMNS, "log_softmax": Layout.COLUMNS}


def name_kernels(program: Program, kernels: list[Kernel]) -> None:
    """Print each kernel's CUDA source (float and double) and name it by that content."""
    for kernel in kernels:
        kernel.source = {dtype: kernel_source(program, kernel, dtype) for dtype in DTYPES}
        digest = hashlib.sha256("".join(kernel.source.values()).encode()).hexdigest()[:12]
        kernel.name = f"k_{digest}"
        kernel.source = {dtype: src.replace(UNNAMED, kernel.name) for dtype, src in kernel.source.items()}


def kernel_source(program: Program, kernel: Kernel, dtype: str) -> str:
    """One kernel's CUDA C for ``dtype`` (its name still :data:`.fusion.UNNAMED`)."""
    printer = _ElementPrinter(program, kernel, dtype)
    value = printer.element(kernel.body)
    extra_values = [printer.element(e.body) for e in kernel.extra]
    kernel.coefficients, kernel.functions = printer.coefficients, printer.functions
    return environment().get_template("cupy/kernel.cu.j2").render(
        kernel=kernel, dtype=dtype, value=value, extra_values=extra_values, inputs=printer.loads,
        extra_sums=[e.kind == "row_sum" for e in kernel.extra],
        coefficients=[f"c{i}" for i in range(len(printer.coefficients))], threads_per_block=THREADS_PER_BLOCK,
    )


class _ElementPrinter:
    """Prints one entry (row r, column c) of a fused expression as CUDA C."""

    def __init__(self, program: Program, kernel: Kernel, dtype: str) -> None:
        self.program, self.kernel, self.dtype = program, kernel, dtype
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
        source = broadcast_source(node)
        name = self.program.names[source]
        position = [n for n, _ in self.kernel.inputs].index(name)
        return f"in{position}[{self._index(source.shape) if index is None or source.shape == (ONE, ONE) else index}]"

    def element(self, node: Expr) -> str:
        names = self.program.names
        if is_all_ones(node):
            return f"({self.dtype})1"
        if isinstance(node, Identity):
            return f"(r == c ? ({self.dtype})1 : ({self.dtype})0)"
        if names.get(node) not in self.kernel.members:
            source = broadcast_source(node)
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
        if scaled_matrix(node) is not None:  # u[r] M[r, c] v[c]
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
    """``__device__ T fn_sigmoid_1(T t)`` from φ^(k)'s SymPy formula (a step valued at its kink as
    :attr:`~mcalc.functions.ElementwiseFunction.step_at_kink` says)."""
    kink = f.step_at_kink
    expr = f.expr.replace(sp.Heaviside, lambda arg, *rest: sp.Piecewise((1, arg > 0), (kink, sp.Eq(arg, 0)), (0, True))
                          if kink else sp.Piecewise((1, arg > 0), (0, True)))
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
class CuPyPrinter(ArrayPrinter):
    """The array printer with kernel launches: ``_launch(name, dtype, shape, outputs, inputs,
    coefficients, layout)`` (:meth:`mcalc.runtime.cuda.KernelSet.launch`)."""

    writes_in_place = False  # elementwise steps run fused in kernels, which make no temporaries

    def _print_Launch(self, launch: Launch) -> str:
        k = launch.kernel
        shape = lambda rows, cols: f"({self.dim(rows)}, {self.dim(cols)})"  # noqa: E731
        out = shape(k.shape[0], ONE) if k.kind == "row_sum" else shape(*k.shape)
        if k.extra:
            out = "[" + ", ".join([out, *[shape(e.shape[0], ONE) if e.kind == "row_sum" else shape(*e.shape)
                                          for e in k.extra]]) + "]"
        dims = ", ".join(self.dim(d) for d in k.shape)
        coefficients = ", ".join(self.dim(c) for c in k.coefficients)
        inputs = ", ".join(reference_code(name) for name, _ in k.inputs)
        return f"_launch({k.name!r}, dtype, ({dims}), {out}, [{inputs}], [{coefficients}], {LAYOUTS[k.kind].value!r})"


def fused_schedule(program: Program, invariant: set[str]) -> tuple[list[Step | Launch], list[Kernel]]:
    """The fusion pass, with each kernel's CUDA source printed and named."""
    schedule, kernels = fuse(program, invariant)
    name_kernels(program, kernels)
    return schedule, kernels


CUPY = ArrayFamily(schedule=fused_schedule, printer=CuPyPrinter, product="_matmul({a}, {b})")


def _contexts(plan: ModulePlan) -> tuple[dict, dict[str, dict], list[Kernel]]:
    """Every program of a module printed for CuPy (forward, then by family), and all their kernels."""
    forward, families = program_contexts(plan, CUPY)
    contexts = [forward, *[c for family in families.values() for c in family.values()]]
    return forward, families, [k for c in contexts for k in c["kernels"]]


def render_cupy_module(plan: ModulePlan) -> str:
    forward, families, kernels = _contexts(plan)
    return environment().get_template("cupy/module.py.j2").render(
        module=module_context(plan), version=__version__, backend="cupy", functions=functions_of(plan.programs()),
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
    body = "\n".join(functions[name] for name in sorted(functions)) + "\n\n" + "\n".join(
        k.source[dtype] for k in {k.name: k for k in kernels}.values() for dtype in DTYPES)
    return header + _math_macros(body) + body


def _math_macros(source: str) -> str:
    """Definitions of the math.h constants SymPy's C printer writes (M_PI, M_SQRT2, …) that ``source``
    uses: NVRTC compiles without math.h."""
    used: dict[str, sp.Expr] = {}
    for value, name in get_math_macros().items():  # some constants twice: as SymPy's and as codegen's Sqrt
        number = sp.N(value, 21)
        if number.is_Number and re.search(rf"\b{name}\b", source):
            used.setdefault(name, number)
    return "".join(f"#ifndef {name}\n#define {name} {number}\n#endif\n" for name, number in sorted(used.items()))
