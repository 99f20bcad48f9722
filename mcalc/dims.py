"""Symbolic dimensions: parsing declarations and binding them to numbers.

A dimension is either a positive integer or a name; names become SymPy
symbols (positive integers) so that shapes such as ``m*n`` simplify.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Mapping

import sympy as sp

from .errors import DimensionError

Dim = sp.Expr
Shape = tuple[sp.Expr, sp.Expr]

_NAME = re.compile(r"^[A-Za-z_][A-Za-z_0-9]*$")


def dim(value: str | int | sp.Expr, *, where: str = "") -> sp.Expr:
    """Parse one declared dimension: a positive int, an identifier, or a product of them (``"c*5"``, the
    columns of a convolution's weight over c channels and 5 taps)."""
    context = f" in {where}" if where else ""
    if isinstance(value, bool):
        raise DimensionError(f"unknown dimension {value!r}{context}: dimensions are identifiers or positive integers")
    if isinstance(value, int):
        if value < 1:
            raise DimensionError(f"unknown dimension {value!r}{context}: a dimension must be a positive integer")
        return sp.Integer(value)
    if isinstance(value, sp.Expr) and (value.is_Symbol or value.is_Integer):
        return dim(int(value), where=where) if value.is_Integer else value
    if isinstance(value, str) and _NAME.match(value):
        return sp.Symbol(value, integer=True, positive=True)
    if isinstance(value, str) and value.strip().isdigit():
        return dim(int(value), where=where)
    if isinstance(value, str) and "*" in value and all(part.strip() for part in value.split("*")):
        return sp.Mul(*[dim(part.strip(), where=where) for part in value.split("*")])
    raise DimensionError(f"unknown dimension {value!r}{context}: dimensions are identifiers, positive integers "
                         "or products of them (c*5)")


def same(a: sp.Expr, b: sp.Expr) -> bool:
    """Whether two dimension expressions are equal for every binding."""
    return a == b or sp.expand(a - b) == 0


def bind(shape: Shape, actual: tuple[int, int], binding: dict[sp.Symbol, int], *, what: str) -> None:
    """Bind the symbols of ``shape`` to the numbers in ``actual``; raise on conflict."""
    for declared, number in zip(shape, actual):
        if declared.is_Integer:
            if int(declared) != number:
                raise DimensionError(f"{what}: expected a size of {declared}, got {number}")
        elif declared.is_Symbol:
            previous = binding.setdefault(declared, number)
            if previous != number:
                raise DimensionError(
                    f"{what}: dimension '{declared}' is {number} here but {previous} elsewhere"
                )
        elif declared.free_symbols <= set(binding):
            if evaluate(declared, binding) != number:
                raise DimensionError(f"{what}: expected a size of {declared} = {evaluate(declared, binding)}, "
                                     f"got {number}")
        elif len(declared.free_symbols - set(binding)) == 1:  # c*3 = 6 fixes c = 2
            (unknown,) = declared.free_symbols - set(binding)
            value = _solve(declared.xreplace(binding), number, unknown)
            if value is None:
                raise DimensionError(f"{what}: a size of {number} is not {declared} for any positive '{unknown}'")
            binding[unknown] = value


@functools.lru_cache(maxsize=1024)
def _solve(declared: sp.Expr, number: int, unknown: sp.Symbol) -> int | None:
    """The positive integer value of ``unknown`` for which ``declared`` is ``number``, if any (kept: finite
    differences bind the same shapes hundreds of thousands of times)."""
    solutions = [v for v in sp.solve(sp.Eq(declared, number), unknown) if v.is_Integer and v > 0]
    return int(solutions[0]) if solutions else None


def evaluate(d: sp.Expr, binding: Mapping[sp.Symbol, int]) -> int:
    """A dimension expression's value under ``binding``."""
    if d.is_Integer:
        return int(d)
    if d in binding:  # a plain dimension, the common case: no substitution
        return binding[d]
    missing = sorted(str(s) for s in d.free_symbols if s not in binding)
    if missing:
        raise DimensionError(f"unknown dimension '{missing[0]}': no value fixes it")
    return int(d.xreplace(dict(binding)))
