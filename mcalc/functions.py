"""Elementwise functions φ: declared by a SymPy expression in one variable.

SymPy derives φ′ and φ″; each derivative is itself an
:class:`ElementwiseFunction`, so a derived rule refers to ``φ'(x)`` as a node
and a printer or code generator can look at its formula.

Non-smooth functions: SymPy's derivative of a kink is a ``Heaviside`` step and
its second derivative a ``DiracDelta``. Before each derivative mcalc looks at
where the function may break (the roots of the arguments of ``Heaviside``,
``Abs``, ``sign``, ``Max``, ``Min`` and of a ``Piecewise``'s conditions): where it
is continuous there, its derivative's Dirac terms vanish (t·δ(t), or δ(t) − e^t δ(−t)
in ELU's second derivative) and are dropped; where it jumps, the derivative does
not exist and mcalc refuses it, unless the function is declared
``piecewise_linear=True`` (as :data:`relu` is); then the convention is the value
almost everywhere, φ″ = 0 at a kink, and a step's value at the kink is 0, i.e.
relu′(0) = 0 (the convention of PyTorch and NumPy codes).
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import sympy as sp

from .errors import DeclarationError, DifferentiabilityError, UnsupportedOperationError
from .expr import Apply, Expr

_T = sp.Symbol("t", real=True)

NON_SMOOTH_CONVENTION = (
    "mcalc's convention for piecewise-linear functions is φ″ = 0 (its value almost "
    "everywhere) and a step's value 0 at the kink (relu′(0) = 0); declare the function "
    "with mc.elementwise(..., piecewise_linear=True) to use it"
)


class ElementwiseFunction:
    """A scalar function applied entry by entry.

    Calling it on an expression gives an :class:`~mcalc.expr.Apply` node.
    """

    def __init__(
        self,
        name: str,
        expr: sp.Expr,
        var: sp.Symbol,
        *,
        latex: str | None = None,
        piecewise_linear: bool = False,
        order: int = 0,
        base: ElementwiseFunction | None = None,
    ) -> None:
        if not isinstance(name, str) or not name.replace("_", "a").isalnum():
            raise DeclarationError(f"elementwise function name {name!r} must be an identifier")
        expr = sp.sympify(expr)
        if not isinstance(var, sp.Symbol):
            raise DeclarationError(f"elementwise function '{name}': variable {var!r} is not a SymPy Symbol")
        extra = expr.free_symbols - {var}
        if extra:
            raise DeclarationError(
                f"elementwise function '{name}' = {expr} depends on {sorted(map(str, extra))} "
                f"besides its variable {var}"
            )
        self.name = name
        self.expr: sp.Expr = expr.xreplace({var: _T})
        self.latex_name = latex or rf"\operatorname{{{name}}}"
        self.piecewise_linear = piecewise_linear
        self.order = order
        self.base = base or self
        self._key = (name, order, sp.srepr(self.expr), piecewise_linear)

    # ------------------------------------------------------------------
    def __call__(self, operand: Expr) -> Expr:
        if not isinstance(operand, Expr):
            raise UnsupportedOperationError(
                f"{self.name}({operand!r}): the argument is not an mcalc expression"
            )
        return Apply(self, operand)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ElementwiseFunction) and self._key == other._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __repr__(self) -> str:
        return self.display_name

    @property
    def display_name(self) -> str:
        return self.base.name + "'" * self.order

    @property
    def is_zero(self) -> bool:
        return self.expr == 0

    # ------------------------------------------------------------------
    def derivative(self, k: int = 1) -> ElementwiseFunction:
        """φ^(k), derived and simplified by SymPy."""
        f = self
        for _ in range(k):
            f = f._first_derivative()
        return f

    @functools.cache  # noqa: B019 - functions are few and live for the process
    def _first_derivative(self) -> ElementwiseFunction:
        raw = sp.diff(self.expr, _T)
        if raw.has(sp.Derivative) or raw.has(sp.Subs):
            raise UnsupportedOperationError(
                f"no differential rule for elementwise function '{self.display_name}': "
                f"SymPy cannot differentiate {self.expr}"
            )
        jumps = [] if self.piecewise_linear else _jumps(self)
        if jumps:
            what = "differentiable" if self.order == 0 else "twice differentiable" if self.order == 1 \
                else f"{self.order + 1} times differentiable"
            raise DifferentiabilityError(
                f"elementwise function '{self.base.name}' is not {what}: {self.display_name}(t) = {self.expr} "
                f"jumps at t = {', '.join(format(p, 'g') for p in jumps)}; " + NON_SMOOTH_CONVENTION
            )
        # where the function is continuous its derivative's Dirac terms vanish; declared, they are dropped
        raw = raw.replace(sp.DiracDelta, lambda *a: sp.Integer(0))
        derived = _simplify(raw)
        return ElementwiseFunction(
            self.base.name,
            derived,
            _T,
            latex=self.base.latex_name,
            piecewise_linear=self.piecewise_linear,
            order=self.order + 1,
            base=self.base,
        )

    def in_terms_of_base(self) -> sp.Expr | None:
        """This derivative written through the base function's value, e.g. σ′ = σ(1 − σ).

        Returns an expression in the symbol ``φ`` (the base function's output)
        when one exists without the input, else ``None``.
        """
        return _through_base(self)

    # ------------------------------------------------------------------
    @property
    def step_at_kink(self) -> sp.Rational:
        """A step's value where its argument is 0: 0 for a function declared piecewise-linear (relu′(0) = 0,
        the convention of PyTorch and NumPy codes), ½ otherwise, where every derivative that mcalc accepts is
        continuous (its Dirac terms vanish) and ½ on both sides of a kink gives its value there: ELU's
        φ′(t) = H(t) + eᵗ H(−t) is 1 at 0, not 0."""
        return sp.Integer(0) if self.piecewise_linear else sp.Rational(1, 2)

    def with_steps_valued(self) -> sp.Expr:
        """φ's formula with each step's value at its kink set (:attr:`step_at_kink`), as code evaluates it."""
        return self.expr.replace(sp.Heaviside, lambda arg, *rest: sp.Heaviside(arg, self.step_at_kink))

    @functools.cached_property
    def numpy(self) -> Callable[[np.ndarray], np.ndarray]:
        """A vectorised NumPy implementation of φ (kinks valued by the convention)."""
        expr = self.with_steps_valued()
        fn = sp.lambdify(_T, expr, modules=["scipy", "numpy"])  # special functions (erf, …) from SciPy

        def apply(values: np.ndarray) -> np.ndarray:
            out = fn(values)
            return np.broadcast_to(np.asarray(out, dtype=float), np.shape(values)).copy()

        return apply

    def at(self, value: sp.Expr) -> sp.Expr:
        """φ evaluated at a SymPy expression (for entrywise symbolic checks)."""
        return self.expr.xreplace({_T: value})


def _breakpoints(expr: sp.Expr) -> list[float]:
    """The real points where ``expr`` may break: roots of the arguments of steps, kinks and signs, of
    max/min's differences, and of a piecewise function's conditions."""
    candidates: list[sp.Expr] = []
    for node in sp.preorder_traversal(expr):
        if isinstance(node, (sp.Heaviside, sp.Abs, sp.sign, sp.DiracDelta)):
            candidates.append(node.args[0])
        elif isinstance(node, (sp.Max, sp.Min)):
            candidates += [a - b for i, a in enumerate(node.args) for b in node.args[i + 1:]]
        elif isinstance(node, sp.Piecewise):
            candidates += [c.lhs - c.rhs for _, c in node.args if isinstance(c, sp.core.relational.Relational)]
    points: set[float] = set()
    for g in candidates:
        try:
            roots = sp.solve(g, _T)
        except (NotImplementedError, TypeError, ValueError):
            continue
        points |= {float(r) for r in roots if r.is_real}
    return sorted(points)


def _jumps(function: ElementwiseFunction, width: float = 1e-7) -> list[float]:
    """The breakpoints (:func:`_breakpoints`) where ``function`` jumps: its values (by its NumPy form) just
    left and right of the point differ by more than a difference quotient's worth (``width`` times the
    slope near it)."""
    points = _breakpoints(function.expr)
    if not points:
        return []
    f = function.numpy
    jumps = []
    for p in points:
        left, right = (float(f(p + s * width)) for s in (-1.0, 1.0))
        outer = [float(f(p + s * 100 * width)) for s in (-1.0, 1.0)]  # the slope near it, on either side
        allowance = 10 * (abs(left - outer[0]) + abs(outer[1] - right)) / 99 + 1e-9 * (1 + abs(left))
        if not abs(right - left) <= allowance:
            jumps.append(p)
    return jumps


FULL_SIMPLIFY_OPS = 12  # SymPy's simplify on larger derivatives can take minutes (GELU's tanh form: 200 s)


def _simplify(expr: sp.Expr) -> sp.Expr:
    """A shorter form of a derivative. A small one (every built-in function's) goes through SymPy's
    ``simplify``; a larger one is simplified as a rational function of its function applications, each
    held as a symbol (tanh(u) as T): deterministic and fast, where ``simplify``'s trigonometric rewriting
    of the applications themselves is what costs minutes. Results are kept on disk across calls
    (:func:`_cached_simplification`)."""
    if expr.has(sp.Heaviside, sp.Piecewise, sp.Max, sp.Min, sp.sign):
        return expr
    return _cached_simplification(expr, _simplify_now)


def _cached_simplification(expr: sp.Expr, simplify: Callable[[sp.Expr], sp.Expr]) -> sp.Expr:
    """``simplify(expr)``, read from the cache folder's ``simplified/`` where an earlier call wrote it:
    a file per expression, named by a hash of SymPy's version, this module's source and the
    expression, holding the result's ``srepr``. Expressions with functions of the user's own (not
    SymPy's classes, which a file could not name again) are simplified afresh every time."""
    import hashlib

    from .files import write_atomic
    from .locations import cache_directory

    def sympy_functions_only(e: sp.Expr) -> bool:
        return all((type(f).__module__ or "").startswith("sympy.") for f in e.atoms(sp.Function))

    if not sympy_functions_only(expr):
        return simplify(expr)
    digest = hashlib.sha256(b"\0".join([sp.__version__.encode(), Path(__file__).read_bytes(),
                                         sp.srepr(expr).encode()])).hexdigest()
    path = cache_directory() / "simplified" / f"{digest[:32]}.txt"
    try:
        return sp.sympify(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError, SyntaxError, sp.SympifyError):
        pass  # not there yet, or unreadable: simplified again and written anew
    result = simplify(expr)
    text = sp.srepr(result)
    if sympy_functions_only(result) and sp.srepr(sp.sympify(text)) == text:
        try:
            write_atomic(path, text)
        except OSError:
            pass  # a read-only cache folder costs time, not correctness
    return result


def _simplify_now(expr: sp.Expr) -> sp.Expr:
    if sp.count_ops(expr) <= FULL_SIMPLIFY_OPS:
        simpler = sp.simplify(expr)
    else:
        held = {f: sp.Dummy(f"f{i}") for i, f in enumerate(sorted(expr.atoms(sp.Function), key=sp.default_sort_key))}
        simpler = sp.simplify(expr.xreplace(held)).xreplace({d: f for f, d in held.items()})
    return simpler if sp.count_ops(simpler) <= sp.count_ops(expr) else expr


_FIT_POINTS = (-1.7, -1.1, -0.6, -0.25, 0.3, 0.8, 1.3, 1.9)
_CHECK_POINTS = (-2.3, -0.45, 0.55, 2.6)


@functools.cache
def _through_base(f: ElementwiseFunction) -> sp.Expr | None:
    """Fit φ^(k) = g(φ) with g a polynomial of degree ≤ 3, exact rational coefficients."""
    if f.order == 0 or f.expr.is_number:
        return None
    base = sp.lambdify(_T, f.base.expr, "math")
    deriv = sp.lambdify(_T, f.expr, "math")
    try:
        phi = np.array([float(base(t)) for t in _FIT_POINTS + _CHECK_POINTS])
        values = np.array([float(deriv(t)) for t in _FIT_POINTS + _CHECK_POINTS])
    except (ValueError, ZeroDivisionError, OverflowError, TypeError):
        return None
    if not (np.all(np.isfinite(phi)) and np.all(np.isfinite(values))):
        return None
    fit = len(_FIT_POINTS)
    vandermonde = np.vander(phi, 4, increasing=True)
    coefficients = np.linalg.lstsq(vandermonde[:fit], values[:fit], rcond=None)[0]
    exact = [sp.nsimplify(round(c, 9), rational=True) for c in coefficients]
    check = np.array([float(c) for c in exact])
    if not np.allclose(vandermonde @ check, values, rtol=1e-9, atol=1e-9):
        return None
    s = sp.Symbol(f.base.name)
    polynomial = sum(c * s**k for k, c in enumerate(exact))
    factored, expanded = _tidy(sp.factor(polynomial)), sp.expand(polynomial)
    return factored if sp.count_ops(factored) <= sp.count_ops(expanded) else expanded


def _tidy(e: sp.Expr) -> sp.Expr:
    """-s*(s - 1) → s*(1 - s): absorb a leading minus into a binomial factor."""
    if isinstance(e, sp.Mul) and e.could_extract_minus_sign():
        factors = list((-e).args) if isinstance(-e, sp.Mul) else [-e]
        for i, g in enumerate(factors):
            if isinstance(g, sp.Add):
                factors[i] = sp.Add(*[-a for a in g.args], evaluate=False)
                return sp.Mul(*factors, evaluate=False)
    return e


def elementwise(
    name: str,
    expr: sp.Expr,
    var: sp.Symbol,
    *,
    latex: str | None = None,
    piecewise_linear: bool = False,
) -> ElementwiseFunction:
    """Declare an elementwise function from a SymPy expression in ``var``."""
    return ElementwiseFunction(name, expr, var, latex=latex, piecewise_linear=piecewise_linear)


# --- built-ins -------------------------------------------------------------
_t = sp.Symbol("t")
sigmoid = elementwise("sigmoid", 1 / (1 + sp.exp(-_t)), _t, latex=r"\sigma")
tanh = elementwise("tanh", sp.tanh(_t), _t, latex=r"\tanh")
relu = elementwise("relu", sp.Max(0, _t), _t, latex=r"\operatorname{relu}", piecewise_linear=True)
softplus = elementwise("softplus", sp.log(1 + sp.exp(_t)), _t, latex=r"\operatorname{softplus}")
exp = elementwise("exp", sp.exp(_t), _t, latex=r"\exp")
log = elementwise("log", sp.log(_t), _t, latex=r"\log")
sqrt = elementwise("sqrt", sp.sqrt(_t), _t, latex=r"\sqrt")
reciprocal = elementwise("reciprocal", 1 / _t, _t, latex=r"\operatorname{recip}")
absolute = elementwise("abs", sp.Abs(_t), _t, latex=r"\operatorname{abs}", piecewise_linear=True)


@functools.cache
def power(p: sp.Expr) -> ElementwiseFunction:
    """t ↦ t**p, the function behind ``A ** p``."""
    label = str(p).replace("/", "_over_").replace("-", "neg").replace(".", "_")
    return elementwise(f"pow_{label}", _t**p, _t, latex=rf"(\cdot)^{{{sp.latex(p)}}}")
