"""Prints program steps as NumPy (or CuPy) array code, one ``_print_<Node>`` method per node type.

Constants (ones, identities, zeros) take the arguments' floating type, ``dtype``
in the generated function: a float64 constant would silently promote a float32
pass to float64.

The array module is ``xp`` in the generated code, so the same printer serves
NumPy and CuPy. Structured factors are printed without materialising them:
a product with a ones vector is a sum, diag(v) M is a row scaling, and a
diagonal added to a matrix is written onto its diagonal.
"""
from __future__ import annotations

import functools
import itertools
from collections.abc import Mapping

import sympy as sp
from sympy.printing.numpy import NumPyPrinter as _SymPyNumPyPrinter
from sympy.printing.numpy import SciPyPrinter as _SymPySciPyPrinter
from sympy.printing.pycode import PythonCodePrinter

from ..errors import McalcError
from ..expr import (
    ONE,
    Add,
    Commutation,
    Diag,
    Expr,
    Hadamard,
    Identity,
    Kron,
    MatMul,
    Ones,
    ScalarMul,
    ScaleBy,
    Transpose,
    UnfoldMatrix,
    UnfoldSpec,
    broadcast_source,
    is_broadcast,
)
from ..functions import ElementwiseFunction
from .plan import (
    Argument,
    Axis,
    BatchColumns,
    Column,
    DimensionSource,
    InPlace,
    Reference,
    SampleCount,
    batch_reference,
    repeated_patches,
    sanitise,
    selected_taps,
    window_inputs,
)


def _is_constant(node: Expr) -> bool:
    """c 1 1ᵀ: a number in every entry."""
    return isinstance(node, ScalarMul) and isinstance(node.operand, Ones)


def is_whole(node: Expr) -> bool:
    """An operand whose array holds every entry: not a broadcast v 1ᵀ, a constant, ones, an identity or zeros."""
    return (not is_broadcast(node) and not _is_constant(node) and not isinstance(node, (Ones, Identity))
            and type(node).__name__ != "Zero")


# --- references and dimensions of a plan, as Python ---------------------------------------------
def argument_code(argument: Argument) -> str:
    """``P['W']``, ``S['x']``, ``V['dz']``; ``Hz`` for an argument without a key."""
    return argument.table if argument.key is None else f"{argument.table}[{argument.key!r}]"


def reference_code(reference: Reference) -> str:
    """A temporary's name, an argument, or a per-sample column ``col['S[...]']`` (keyed by where the
    loop read the batch)."""
    if isinstance(reference, Argument):
        return argument_code(reference)
    if isinstance(reference, Column):
        return f"col[{argument_code(reference.of)!r}]"
    if isinstance(reference, InPlace):
        raise ValueError("a constant has no name: the printer writes it where it is read")
    return reference


def scale_code(scale: Reference | sp.Expr) -> str:
    """A Kronecker term's scale: an array's reference, or a number in parentheses."""
    return f"({dim_code(scale)})" if isinstance(scale, sp.Expr) else reference_code(scale)


class _DimensionPrinter(PythonCodePrinter):
    """Dimensions as Python: ⌊a/b⌋ (a convolution's positions) as integer division."""

    def _print_floor(self, e: sp.floor) -> str:
        numerator, denominator = e.args[0].as_numer_denom()
        return f"(({self._print(numerator)}) // {self._print(denominator)})"

    def _print_Pow(self, e: sp.Pow, rational: bool = False) -> str:  # √h (attention's scale) without math
        if e.exp in (sp.S.Half, -sp.S.Half):
            root = f"({self._print(e.base)})**0.5"
            return root if e.exp > 0 else f"1/{root}"
        return super()._print_Pow(e, rational)


def dim_code(d: sp.Expr) -> str:
    """A dimension expression (``n*m``, ``1/B``, ``(L - 1)//2 + 1``) as Python over the dimension variables."""
    return _DimensionPrinter().doprint(d).replace("math.", "")


def dimension_code(source: DimensionSource) -> str:
    """Where a generated function reads a dimension off its arguments."""
    if isinstance(source, BatchColumns):  # δZ's columns, else any per-sample argument's, else 1
        return "S['dz'].shape[1] if 'dz' in S else next(iter(S.values())).shape[1] if S else 1"
    if isinstance(source, SampleCount):
        return f"_samples({dimension_code(BatchColumns())})"
    assert isinstance(source, Axis)
    return f"{argument_code(source.argument)}.shape[{source.axis}]"


class ElementwisePrinter(_SymPySciPyPrinter):
    """SymPy's NumPy printer (SciPy's for special functions such as erf), with a reciprocal written as a
    division: ``1/(1 + exp(-t))``, not ``(1 + exp(-t))**(-1.0)`` (a general power costs NumPy several
    times a division)."""

    _kc = _SymPyNumPyPrinter._kc  # constants from NumPy (π is numpy.pi): CuPy has them too, scipy.constants not

    def _print_Pow(self, expr: sp.Pow, rational: bool = False) -> str:
        if expr.exp == -1:
            return f"1/{self.parenthesize(expr.base, sp.printing.precedence.PRECEDENCE['Pow'])}"
        return super()._print_Pow(expr, rational=rational)

    def _print_Piecewise(self, expr: sp.Piecewise) -> str:
        # pieces are made in t's type: numpy.select and numpy.where of Python numbers give float64 or int64
        # whatever t is, and a float32 network's adjoints would turn float64 at ReLU′
        if len(expr.args) == 2 and expr.args[1].cond == sp.true:  # one condition
            (value, condition), (otherwise, _) = expr.args
            if value.is_number and otherwise.is_number and value.is_finite and otherwise.is_finite:
                if value == 0:  # the indicator of the other side: ReLU′ = [t > 0]
                    value, otherwise, condition = otherwise, value, sp.Not(condition)
                # value·[condition] + otherwise: a comparison and a cast, where numpy.where of two numbers
                # costs eight times as much
                code = f"({self._print(condition)}).astype(t.dtype)"
                code = code if value - otherwise == 1 else f"{self._print(value - otherwise)}*{code}"
                return code if otherwise == 0 else f"({code} + {self._print(otherwise)})"
            typed = [f"t.dtype.type({self._print(e)})" if e.is_number else self._print(e) for e in (value, otherwise)]
            return f"numpy.where({self._print(condition)}, {typed[0]}, {typed[1]})"
        return f"{super()._print_Piecewise(expr)}.astype(t.dtype, copy=False)"


def function_name(f: ElementwiseFunction) -> str:
    return f"_fn_{sanitise(f.base.name)}_{f.order}"


def through_base(f: ElementwiseFunction) -> tuple[sp.Expr, sp.Expr] | None:
    """(φ(t), g(s)) when φ^(k) = g(φ) (σ′ = σ(1 − σ)): one exp instead of sinh and cosh³."""
    g = f.in_terms_of_base()
    if g is None:
        return None
    base = f.base.expr
    (t,) = base.free_symbols
    return base.xreplace({t: sp.Symbol("t")}), g.xreplace({sp.Symbol(f.base.name): sp.Symbol("s")})


def _folded_constants(e: sp.Expr) -> sp.Expr:
    """``e`` with the irrational constant of every product as one float: √2·t·u/(2√π) is printed as
    0.3989…·t·u, one array operation where NumPy would make three (a Python float also keeps a float32
    array float32, where numpy.sqrt(2), a float64 scalar, promotes it)."""
    def fold(m: sp.Mul) -> sp.Expr:
        constant, rest = m.as_independent(*m.free_symbols, as_Add=False)
        if not constant.is_number or not constant.is_real or constant.is_Rational or rest == 1:
            return m
        return sp.Mul(constant.evalf(20), rest, evaluate=False)

    return e.replace(lambda x: x.is_Mul, fold)


def _array_code(printer: ElementwisePrinter, e: sp.Expr) -> str:
    """``e`` over the array module ``xp`` (NumPy or CuPy), its constants folded; a special function from
    the SciPy of the argument's array module (``_special(t)``: scipy.special or cupyx.scipy.special)."""
    code = printer.doprint(_folded_constants(e))
    return code.replace("scipy.special.", "_special(t).").replace("numpy.", "xp.")


_CHEAP = (sp.Piecewise, sp.Heaviside, sp.Abs, sp.sign, sp.DiracDelta)


def _candidate_parts(f: ElementwiseFunction) -> set[sp.Expr]:
    """What φ^(k)'s code computes that a sibling's might too: its special functions and transcendentals
    (erf, exp, tanh, …), or, written through the base (σ′ = σ(1 − σ)), the base's value; and the base
    function's whole formula, which such a sibling reads."""
    pieces = through_base(f)
    if pieces is not None:
        return {pieces[0]}
    expr = f.with_steps_valued().xreplace({t: sp.Symbol("t") for t in f.expr.free_symbols})
    parts = {a for a in expr.atoms(sp.Function) if not isinstance(a, _CHEAP) and a.free_symbols}
    return parts | ({expr} if f.order == 0 and expr.free_symbols else set())


@functools.cache
def shared_parts(f: ElementwiseFunction) -> tuple[sp.Expr, ...]:
    """The parts of φ^(k) (:func:`_candidate_parts`) that φ, φ′ or φ″ computes too, such as GELU's
    erf(t/√2) in φ and φ′, or tanh(t) in tanh and tanh′ = 1 − tanh²: the generated function computes each
    once per argument and cache (:func:`~mcalc.runtime.array_ops.elementwise_part`), not once per order."""
    siblings = set()
    for order in {0, 1, 2} - {f.order}:
        try:
            siblings |= _candidate_parts(f.base.derivative(order))
        except McalcError:  # not that many times differentiable
            continue
    return tuple(sorted(_candidate_parts(f) & siblings, key=sp.srepr))


def _part_line(printer: ElementwisePrinter, name: str, part: sp.Expr) -> str:
    return f"    {name} = _elementwise_part(C, {str(part)!r}, t, lambda: {_array_code(printer, part)})\n"


def function_source(f: ElementwiseFunction) -> str:
    """``def _fn_sigmoid_1(t): return …`` from the SymPy formula of φ^(k); with the cache ``C`` where it
    shares parts with its siblings (:func:`shared_parts`)."""
    printer = ElementwisePrinter({"fully_qualified_modules": True})
    parts = shared_parts(f)
    signature = f"def {function_name(f)}(t{', C=None' if parts else ''}):\n"
    pieces = through_base(f)
    if pieces is not None:
        base, g = pieces
        s = _part_line(printer, "s", base) if parts else f"    s = {_array_code(printer, base)}\n"
        return f"{signature}{s}    return {_array_code(printer, g)}\n"
    expr = f.with_steps_valued()
    (t,) = expr.free_symbols or {sp.Symbol("t", real=True)}
    expr = expr.xreplace({t: sp.Symbol("t")})
    names = {part: sp.Symbol(f"u{i}") for i, part in enumerate(parts)}
    code = _array_code(printer, expr.xreplace(names))
    if not expr.free_symbols:
        code = f"xp.full_like(t, {code})"
    return signature + "".join(_part_line(printer, str(u), part) for part, u in names.items()) + \
        f"    return {code}\n"


def makes_own_array(node: Expr) -> bool:
    """Whether the printed step computing ``node`` makes an array of its own: an elementwise sum, product
    or scaling, or a product of matrices without structured factors, never a view (a transpose, a
    broadcast) or an array passed on. A later step may write into such an array once nothing else reads it."""
    if isinstance(node, (Add, Hadamard, ScalarMul, ScaleBy)):
        return True
    structured = (Ones, Identity, Kron, UnfoldMatrix)
    return isinstance(node, MatMul) and selected_taps(node) is None and not any(
        isinstance(f.args[0] if isinstance(f, Transpose) else f, structured) for f in node.args)


def _typical(d: sp.Expr) -> float:
    """A dimension's size with every symbol 64: what a printer compares intermediate sizes by."""
    return float(d.xreplace({x: 64 for x in d.free_symbols})) if d.free_symbols else float(d)


class ArrayPrinter:
    """Right-hand sides of program steps; ``names`` holds the references of the computed children
    (:attr:`.plan.Program.names`), and a name in ``overwritable`` is an array that no other step reads,
    which a step may write into (in ``writable`` too if the array is the step's own, not a view). A
    matrix product is printed by ``product`` (``a @ b``; the CuPy backend calls a function that a CUDA
    graph can capture)."""

    writes_in_place = True  # a sum or product of matrices into an operand's array (not over stacks; below)

    def __init__(self, names: Mapping[Expr, Reference], overwritable: set[str] = frozenset(),
                 product: str = "({a} @ {b})", writable: set[str] = frozenset()) -> None:
        self.names = names
        self.overwritable = overwritable
        self.writable = writable  # overwritable steps whose arrays are their own (:func:`makes_own_array`)
        self.product = product
        self.reads_cache = False  # whether a printed step reads the function's cache C (shared parts)
        self.reads: set[str] = set()  # the steps printed code reads: render drops a step no line reads
        self.step: str | None = None  # the target of the step being printed

    def ref(self, node: Expr) -> str:
        """The code that reads an already computed (or argument) node."""
        reference = self.names[node]
        if isinstance(reference, str):
            self.reads.add(reference)
        return reference_code(reference)

    def elementwise_operands(self, terms: tuple[Expr, ...]) -> list[str]:
        """The operands of an elementwise sum or product: a broadcast v 1ᵀ (or 1 wᵀ) beside an operand of
        the full shape as v itself, which the array module broadcasts without a view and its strided reads,
        and a constant c 1 1ᵀ there as the number c (LayerNorm's ε beside a row of variances), never made."""
        if not any(is_whole(t) for t in terms):
            return [self.operand(t) for t in terms]
        return [f"({self.dim(t.coefficient)})" if _is_constant(t) else "1" if isinstance(t, Ones)
                else self.operand(broadcast_source(t)) for t in terms]

    def rhs(self, node: Expr) -> str:
        return getattr(self, f"_print_{type(node).__name__}")(node)

    # --- helpers ---------------------------------------------------------
    def dim(self, d: sp.Expr) -> str:
        return dim_code(d)

    def operand(self, node: Expr) -> str:
        """A child as code: a name, or an in-place constant."""
        if isinstance(node, Ones):
            return f"xp.ones(({self.dim(node.rows)}, {self.dim(node.cols)}), dtype=dtype)"
        if isinstance(node, Identity):
            return f"xp.eye({self.dim(node.rows)}, dtype=dtype)"
        if node.__class__.__name__ == "Zero":
            return f"xp.zeros(({self.dim(node.rows)}, {self.dim(node.cols)}), dtype=dtype)"
        return self.ref(node)

    # --- a constant result, computed by a step of its own ------------------
    def _print_Ones(self, node: Expr) -> str:
        return self.operand(node)

    _print_Identity = _print_Zero = _print_Ones

    # --- what a stack of matrices prints otherwise (:class:`BatchedArrayPrinter`) ---
    def _row_sums(self, code: str) -> str:
        return f"{code}.sum(axis=1, keepdims=True)"

    def _column_sums(self, code: str) -> str:
        return f"{code}.sum(axis=0, keepdims=True)"

    def _broadcast_columns(self, code: str, rows: sp.Expr, cols: sp.Expr) -> str:
        return f"xp.broadcast_to({code}, ({self.dim(rows)}, {self.dim(cols)}))"

    _broadcast_rows = _broadcast_columns

    def _transposed(self, code: str) -> str:
        return f"{code}.T"

    # --- products --------------------------------------------------------
    def _kron_factor(self, f: Expr) -> str:
        """An argument of :func:`~mcalc.runtime.array_ops.kron_matmul`: None for an identity."""
        return "None" if isinstance(f, Identity) else self.operand(f)

    def _index_map(self, f: Expr) -> tuple[str, str, str] | None:
        """For P or Pᵀ (an :class:`UnfoldMatrix`): the helpers that apply it from the left, P M and Pᵀ M,
        in that order for P, swapped for Pᵀ, and their trailing arguments; else None."""
        if not is_index_map(f):
            return None
        transposed = isinstance(f, Transpose)
        spec, channels, size = (f.args[0] if transposed else f).args
        arguments = f"{self._spec(spec, size)}, {self.dim(channels)}"
        return ("_fold_rows", "_unfold_rows", arguments) if transposed else ("_unfold_rows", "_fold_rows", arguments)

    def _is_operator(self, f: Expr) -> bool:
        """A factor that is applied to a matrix, never formed: A ⊗ B, or an index map P or Pᵀ."""
        return isinstance(f, Kron) or self._index_map(f) is not None

    def _apply_left(self, f: Expr, code: str) -> str:
        """f M for the computed M (``code``): an operator or a diagonal by its helper, any other factor by
        a product."""
        if isinstance(f, Diag):
            return f"({self.ref(f.args[0])} * {code})"
        if isinstance(f, Kron):
            return f"_kron_matmul({self._kron_factor(f.args[0])}, {self._kron_factor(f.args[1])}, {code})"
        index_map = self._index_map(f)
        if index_map is None:
            return self.product.format(a=self.operand(f), b=code)
        helper, _, arguments = index_map
        return f"{helper}({code}, {arguments})"

    def _apply_right(self, code: str, f: Expr) -> str:
        """M f, as :meth:`_apply_left`."""
        if isinstance(f, Diag):
            return f"({code} * {self._transposed(self.ref(f.args[0]))})"
        if isinstance(f, Kron):
            return f"_matmul_kron({code}, {self._kron_factor(f.args[0])}, {self._kron_factor(f.args[1])})"
        index_map = self._index_map(f)
        if index_map is None:
            return self.product.format(a=code, b=self.operand(f))
        _, transposed, arguments = index_map  # M P = (Pᵀ Mᵀ)ᵀ
        return self._transposed(f"{transposed}({self._transposed(code)}, {arguments})")

    def _print_sandwich(self, node: Expr) -> str | None:
        """A product with operators (Kronecker factors, index maps), which are applied, never formed: from
        its first run of other factors (diagonals aside) outward, each factor on the side that keeps the
        intermediate smaller (every dimension taken as 64), so that the input block of a convolution,
        Pᵀ (I ⊗ Kᵀ) 𝓗z (I ⊗ K) P, never forms (I ⊗ Kᵀ) 𝓗z (I ⊗ K), k² times the block's size. A product of
        operators alone starts from its first, formed. None for a product without operators."""
        factors = node.args
        if not any(self._is_operator(f) for f in factors):
            return None
        # with a Kronecker factor or an index map in the chain, a diagonal is applied too (a row or column scaling)
        core = [i for i, f in enumerate(factors) if not (self._is_operator(f) or isinstance(f, Diag))]
        if not core:  # operators alone ((I ⊗ K) P, a Jacobian kept for several rules): the first one formed
            first = next(i for i, f in enumerate(factors) if self._is_operator(f))
            return self._print_sandwich_around(factors, first, first, self._formed(factors[first]))
        end = next((i for i, j in itertools.pairwise(core) if j != i + 1), core[-1])  # the first run of matrices
        run = factors[core[0] : end + 1]
        code = self.operand(run[0]) if len(run) == 1 else self._print_MatMul(MatMul(*run))
        return self._print_sandwich_around(factors, core[0], end, code)

    def _formed(self, f: Expr) -> str:
        """An operator as a dense matrix: A ⊗ B by ``kron``, P (or Pᵀ) as unfold (fold) of an identity."""
        if isinstance(f, Kron):
            return self._print_Kron(f)
        return self._apply_left(f, f"xp.eye({self.dim(f.cols)}, dtype=dtype)")

    def _print_sandwich_around(self, factors: tuple[Expr, ...], start: int, end: int, code: str) -> str:
        """``code`` (factors[start..end], computed) with the factors left and right of it applied outward."""
        run = factors[start : end + 1]
        left, right = list(factors[:start]), list(factors[end + 1 :])
        rows, cols = _typical(run[0].rows), _typical(run[-1].cols)
        while left or right:
            if right and (not left or rows * _typical(right[0].cols) < _typical(left[-1].rows) * cols):
                f = right.pop(0)
                code, cols = self._apply_right(code, f), _typical(f.cols)
            else:
                f = left.pop()
                code, rows = self._apply_left(f, code), _typical(f.rows)
        return code

    def _print_MatMul(self, node: Expr) -> str:
        selected = selected_taps(node)
        if selected is not None:  # max pooling: each window's selected input, the patches never made
            y, mask = selected
            _, spec, size = mask.args
            return f"_select_taps({self.operand(y)}, {self.operand(mask)}, {self._spec(spec, size)})"
        sandwich = self._print_sandwich(node)
        if sandwich is not None:
            return sandwich
        first = node.args[0]
        if isinstance(first, Ones) and first.cols == ONE and first.rows != ONE:  # 1 wᵀ = wᵀ broadcast down
            rest = node.args[1] if len(node.args) == 2 else MatMul(*node.args[1:])
            code = self.operand(rest) if len(node.args) == 2 else self._print_MatMul(rest)
            return self._broadcast_rows(code, first.rows, node.cols)
        code, row_scales, column_sum = None, [], False
        for f in node.args:
            if isinstance(f, Ones) and code is not None and f.cols == ONE:  # M 1 = row sums
                code = self._row_sums(code) if f.rows != ONE else code
                continue
            if isinstance(f, Ones) and code is not None and f.rows == ONE:  # v 1ᵀ = v broadcast
                code = self._broadcast_columns(code, node.rows, f.cols)
                continue
            if isinstance(f, Ones) and code is None and f.rows == ONE and not row_scales:  # 1ᵀ M = column sums
                column_sum = True
                continue
            if isinstance(f, Diag):  # diag(v) M scales the rows of M, M diag(v) its columns
                v = self.ref(f.args[0])
                if code is None:
                    row_scales.append(v)
                else:
                    code = f"({code} * {self._transposed(v)})"
                continue
            factor = self.operand(f)
            for v in row_scales:
                factor = f"({v} * {factor})"
            row_scales = []
            if column_sum:
                factor, column_sum = self._column_sums(factor), False
            code = factor if code is None else self.product.format(a=code, b=factor)
        return code

    def _print_Add(self, node: Expr) -> str:
        dense, diagonal = [], []
        for t in node.args:
            c, core = (t.coefficient, t.operand) if isinstance(t, ScalarMul) else (sp.Integer(1), t)
            if isinstance(core, Diag):
                v = self.ref(core.args[0])
                diagonal.append(v if c == 1 else f"({self.dim(c)}) * {v}")
            elif isinstance(core, Identity):
                diagonal.append(f"{self.dim(c)}")
            else:
                dense.append(t)
        total = self._elementwise(node, tuple(dense), " + ", "_add_into") if dense else \
            f"xp.zeros(({self.dim(node.rows)}, {self.dim(node.cols)}), dtype=dtype)"
        if not diagonal:
            return total
        # a fresh sum may be written to, and so may a lone step no other step reads; an argument
        # (a parameter, 𝓗z, a batch, a tangent), a cached invariant or a value read again may not
        shared = len(dense) == 1 and self.operand(dense[0]) not in self.overwritable
        return f"_plus_diagonal({total}, {' + '.join(diagonal)}, copy={shared})"

    def _print_ScalarMul(self, node: Expr) -> str:
        if self._writable(node.args[1], node):
            return f"_multiply_into({self.operand(node.args[1])}, ({self.dim(node.args[0])}))"
        return f"({self.dim(node.args[0])}) * {self.operand(node.args[1])}"

    def _print_ScaleBy(self, node: Expr) -> str:
        if self._writable(node.args[1], node):
            return f"_multiply_into({self.operand(node.args[1])}, {self.ref(node.args[0])})"
        return f"{self.operand(node.args[1])} * {self.ref(node.args[0])}"

    def _print_Hadamard(self, node: Expr) -> str:
        return self._elementwise(node, node.args, " * ", "_multiply_into")

    def _elementwise(self, node: Expr, terms: tuple[Expr, ...], operator: str, helper: str) -> str:
        """The elementwise sum or product (``operator``) of ``terms``, computed into the array of one of
        the first two terms where it has the result's shape and no other step reads it (``helper``,
        ``_add_into`` or ``_multiply_into``); else, of three terms or more, into the first two's fresh
        result; else as one expression, a temporary per operator. Either way the operations are those
        of the expression, in its order (the first pair may be swapped), and the result has its memory
        order (:func:`~mcalc.runtime.array_ops.add_into`): the same arrays to the last bit."""
        operands = self.elementwise_operands(terms)
        first_pair = [i for i in (0, 1) if self.writes_in_place and len(terms) > 1 and self._fills(terms[i], node)]
        into = next((i for i in first_pair if self._writable(terms[i], node)), None)
        if into is not None:
            return f"{helper}({operands[into]}, {', '.join([operands[1 - into], *operands[2:]])})"
        if len(terms) >= 3 and first_pair:  # the first pair's result has the whole shape, and is fresh
            return f"{helper}({operands[0]}{operator}{operands[1]}, {', '.join(operands[2:])})"
        return operator.join(operands)

    @staticmethod
    def _fills(term: Expr, node: Expr) -> bool:
        """Whether ``term``'s array has the whole shape of ``node`` (not a broadcast or a constant)."""
        return is_whole(term) and (term.rows, term.cols) == (node.rows, node.cols)

    def _writable(self, term: Expr, node: Expr) -> bool:
        """Whether ``node``'s step may write its result into ``term``'s array."""
        return self.writes_in_place and self.names.get(term) in self.writable and self._fills(term, node)

    def _print_Transpose(self, node: Expr) -> str:
        return self._transposed(self.operand(node.args[0]))

    def _print_Apply(self, node: Expr) -> str:
        f = node.args[0]
        if shared_parts(f):  # its parts are kept in the function's cache C, for the other orders to read
            self.reads_cache = True
            return f"{function_name(f)}({self.operand(node.args[1])}, C)"
        return f"{function_name(f)}({self.operand(node.args[1])})"

    def _print_Sum(self, node: Expr) -> str:
        return f"{self.operand(node.args[0])}.sum(keepdims=True)"

    def _print_Trace(self, node: Expr) -> str:
        return f"xp.trace({self.operand(node.args[0])}).reshape(1, 1)"

    def _print_Softmax(self, node: Expr) -> str:
        return f"_softmax({self.operand(node.args[0])})"

    def _print_LogSoftmax(self, node: Expr) -> str:
        return f"_log_softmax({self.operand(node.args[0])})"

    def _print_Inverse(self, node: Expr) -> str:
        return f"xp.linalg.inv({self.operand(node.args[0])})"

    def _print_Kron(self, node: Expr) -> str:
        a, b = node.args
        if isinstance(b, Ones):  # A ⊗ 1: each entry of A repeated over a block (a pooling's window)
            return f"xp.repeat(xp.repeat({self.operand(a)}, {self.dim(b.rows)}, axis=0), {self.dim(b.cols)}, axis=1)" \
                if b.rows != ONE and b.cols != ONE else \
                f"xp.repeat({self.operand(a)}, {self.dim(b.rows if b.cols == ONE else b.cols)}, " \
                f"axis={0 if b.cols == ONE else 1})"
        if isinstance(a, Ones):  # 1 ⊗ B: B tiled
            return f"xp.tile({self.operand(b)}, ({self.dim(a.rows)}, {self.dim(a.cols)}))"
        return f"xp.kron({self.operand(a)}, {self.operand(b)})"

    def _print_Diag(self, node: Expr) -> str:
        return f"xp.diagflat({self.ref(node.args[0])})"

    def _print_Vec(self, node: Expr) -> str:
        return f"{self.operand(node.args[0])}.reshape(-1, 1, order='F')"

    def _print_Commutation(self, node: Expr) -> str:
        return f"_commutation({self.dim(node.args[0])}, {self.dim(node.args[1])}, xp, dtype)"

    def _print_PSDProjection(self, node: Expr) -> str:
        return f"_psd_project({self.operand(node.args[1])}, {node.args[0]!r})"

    def _print_Gram(self, node: Expr) -> str:  # the scale rides on the product (cuBLAS's alpha)
        scale = "" if node.scale == 1 else f", {self.dim(node.scale)}"
        return f"_gram({self.operand(node.args[0])}{scale})"

    def _print_BlockTrace(self, node: Expr) -> str:
        return f"_block_trace({self.operand(node.args[0])}, {self.dim(node.args[1])})"

    # --- a convolution's patches ---------------------------------------------------------------------
    def _spec(self, spec: UnfoldSpec, size: sp.Tuple) -> str:
        """The trailing arguments of the index-map helpers: kernel, stride, padding, dilation, size."""
        size_code = ", ".join(self.dim(s) for s in size) + ("," if len(size) == 1 else "")
        return f"{spec.kernel}, {spec.stride}, {spec.padding}, {spec.dilation}, ({size_code})"

    def _print_Unfold(self, node: Expr) -> str:
        x, spec, size = node.args
        return f"_unfold({self.operand(x)}, {self._spec(spec, size)})"

    def _print_WindowArgmax(self, node: Expr) -> str:  # read from the windows of X, unfold(X) never made
        x, spec, size = window_inputs(node)
        return f"_window_argmax({self.operand(x)}, {self._spec(spec, size)})"

    def _print_Fold(self, node: Expr) -> str:
        u, spec, size = node.args
        repeated = repeated_patches(node)
        if repeated is not None:  # a pooling's δX: its δZ and window mask read tap by tap, never repeated
            v, mask = repeated
            mask_code = "None" if mask is None else self.operand(mask)
            return f"_fold_repeated({self.operand(v)}, {mask_code}, {self._spec(spec, size)})"
        return f"_fold({self.operand(u)}, {self._spec(spec, size)})"

    # --- per-sample matrices, their samples side by side ------------------------------------------
    def _print_Stacked(self, node: Expr) -> str:  # a per-sample matrix argument, (rows, B, cols)
        return f"_side_by_side({argument_code(batch_reference(node.args[0]))})"

    def _print_RankSum(self, node: Expr) -> str:
        return f"_rank_sum({self.operand(node.args[0])})"

    def _print_SampleMatMul(self, node: Expr) -> str:
        return f"_sample_matmul({self.operand(node.args[0])}, {self.operand(node.args[1])})"

    def _print_SampleTranspose(self, node: Expr) -> str:
        return f"_sample_transpose({self.operand(node.args[0])}, {self.dim(node.args[1])})"

    def _print_SampleProduct(self, node: Expr) -> str:
        return f"_sample_product({self.operand(node.args[0])}, {self.operand(node.args[1])})"

    def _print_VecOfSamples(self, node: Expr) -> str:
        return f"_vec_of_samples({self.operand(node.args[0])}, {self.dim(node.args[1])})"

    def _print_UnvecOfSamples(self, node: Expr) -> str:
        return f"_unvec_of_samples({self.operand(node.args[0])}, {self.dim(node.args[1])})"


def is_index_map(f: Expr) -> bool:
    """Whether ``f`` is P or Pᵀ, an :class:`UnfoldMatrix`: applied by its helpers, never a factor of a chain."""
    return isinstance(f.args[0] if isinstance(f, Transpose) else f, UnfoldMatrix)


def prints_as_chain(node: Expr) -> bool:
    """Whether a per-sample program computes ``node`` by :func:`~mcalc.runtime.chain.chain_product`: a product
    with Kronecker factors or commutation matrices and no index map (:meth:`BatchedArrayPrinter._print_sandwich`)."""
    return (isinstance(node, MatMul) and selected_taps(node) is None
            and any(isinstance(f, (Kron, Commutation)) for f in node.args) and not any(map(is_index_map, node.args)))


class BatchedArrayPrinter(ArrayPrinter):
    """The array printer over stacks of per-sample matrices (…, rows, cols), the samples on the leading
    axis: a per-sample rule with no closed batch form (a :class:`~mcalc.expr.BatchMean`) runs as one
    array program over the whole batch, never a Python loop over it. Products broadcast over the stack
    (``@``), and what would read or write a matrix's two axes reads the last two."""

    writes_in_place = False  # an operand of a stack's shape may broadcast over the leading axis: no fixed shape
    means: set[str] = frozenset()  # the steps computed as their batch means (:func:`.batch_means.mean_steps`)
    _averaging = False  # whether the step being printed is a mean that reads its terms' means

    def rhs(self, node: Expr) -> str:
        self._averaging = self.step in self.means and not prints_as_chain(node)
        return super().rhs(node)

    def ref(self, node: Expr) -> str:
        """As :meth:`ArrayPrinter.ref`; in a mean's step, a term that is a stack is read as its mean."""
        code = super().ref(node)
        return f"_batch_mean({code})" if self._averaging and self.names[node] not in self.means else code

    def _row_sums(self, code: str) -> str:
        return f"{code}.sum(axis=-1, keepdims=True)"

    def _column_sums(self, code: str) -> str:
        return f"{code}.sum(axis=-2, keepdims=True)"

    def _broadcast_columns(self, code: str, rows: sp.Expr, cols: sp.Expr) -> str:
        return f"({code} * xp.ones((1, {self.dim(cols)}), dtype=dtype))"

    def _broadcast_rows(self, code: str, rows: sp.Expr, cols: sp.Expr) -> str:
        return f"(xp.ones(({self.dim(rows)}, 1), dtype=dtype) * {code})"

    def _transposed(self, code: str) -> str:
        return f"_transpose({code})"

    def _print_sandwich(self, node: Expr) -> str | None:
        """A product with Kronecker factors (and no index map) as :func:`~mcalc.runtime.chain.chain_product`
        of its factors, which multiplies them in the order of least cost for the sizes it meets: a
        per-sample chain such as attention's (X ⊗ K X) diag(s) (I ⊗ Xᵀ Vᵀ) 𝓗z (I ⊗ V X) diag(s) (Xᵀ ⊗ Xᵀ Kᵀ)
        is cheap from 𝓗z outward or from the ends inward depending on T² against h·d, which no
        dimension taken as 64 tells apart."""
        if not prints_as_chain(node):
            return super()._print_sandwich(node)
        helper = "_chain_mean" if self.step in self.means else "_chain_product"
        return f"{helper}({', '.join(self._chain_factor(f) for f in node.args)})"

    def _chain_factor(self, f: Expr) -> str:
        if isinstance(f, Kron):
            a, b = (self._kron_factor(g) for g in f.args)
            ones = tuple(isinstance(g, Ones) for g in f.args)  # 1 1ᵀ: summed over, never read
            marked = f", ones={ones}" if any(ones) else ""
            return f"_KronFactor({a}, {b}, ({self.dim(f.rows)}, {self.dim(f.cols)}){marked})"
        if isinstance(f, Diag):
            return f"_DiagonalFactor({self.ref(f.args[0])})"
        if isinstance(f, Commutation):  # a permutation of rows or columns, not a dense product
            return f"_CommutationFactor({self.dim(f.args[0])}, {self.dim(f.args[1])})"
        return self.operand(f)

    def _print_Sum(self, node: Expr) -> str:
        return f"{self.operand(node.args[0])}.sum(axis=(-2, -1), keepdims=True)"

    def _print_Trace(self, node: Expr) -> str:
        return f"xp.trace({self.operand(node.args[0])}, axis1=-2, axis2=-1)[..., None, None]"

    def _print_Kron(self, node: Expr) -> str:
        return f"_kron_product({self.operand(node.args[0])}, {self.operand(node.args[1])})"

    def _print_Diag(self, node: Expr) -> str:
        return f"_diagonal_matrix({self.ref(node.args[0])})"

    def _print_Vec(self, node: Expr) -> str:
        return f"_vec({self.operand(node.args[0])})"

