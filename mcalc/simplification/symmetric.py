"""Transposed pairs in a symmetric sum: S + X + Xᵀ with X computed once.

A curvature block is symmetric, and a block that is a sum often holds a term and its transpose: the
input block of a residual block z = x + W₂ tanh(W₁x + b₁) under (6) is
𝓗z + 𝓗z Ā + Āᵀ 𝓗z + W₁ᵀ (W₂ᵀ𝓗zW₂ ⊙ E[φ′φ′ᵀ]) W₁ with Ā = W₂ diag(E[φ′]) W₁, and the rewriting of
:mod:`.algebra`, which factors common terms, writes it 𝓗z (I + Ā) + W₁ᵀ (Ā′ 𝓗z + …), where each half
costs its own products. Expanded into monomials, a term m whose transpose mᵀ is another term is
paired with it, and the block is planned as S + X + Xᵀ: X is computed once and Xᵀ is a view
(the classic symmetric rank-2k update, BLAS's ``syr2k``). Kept only where it costs fewer flops.
"""
from __future__ import annotations

import functools
import itertools
import math

import sympy as sp

from ..expr import Add, Diag, Expr, Hadamard, MatMul, Ones, ScalarMul, Transpose
from .engine import simplify
from .psd import is_symmetric

MAX_MONOMIALS = 32  # expanding further costs more planning time than it can save
SIZE = 64  # every dimension, where flops are compared


def pair_transposes(block: Expr) -> Expr:
    """``block`` (symmetric) as S + X + Xᵀ, where that costs fewer flops; else ``block`` itself."""
    monomials = _monomials(block)
    if monomials is None or len(monomials) < 2:
        return block
    pool = [simplify(m) for m in monomials]
    halves: list[Expr] = []  # one term of each pair
    unpaired: list[Expr] = []
    while pool:
        m = pool.pop(0)
        t = simplify(Transpose(m))
        if t != m and t in pool:
            pool.remove(t)
            halves.append(m)
        else:
            unpaired.append(m)
    if not halves:
        return block
    half = simplify(Add(*halves)) if len(halves) > 1 else halves[0]
    paired = _with_pair(unpaired, half)
    folded = _fold_sandwich(unpaired, halves)
    if folded is not None and flops(_with_pair(*folded)) < flops(paired):
        paired = _with_pair(*folded)
    return paired if flops(paired) < flops(block) else block


def _with_pair(unpaired: list[Expr], half: Expr) -> Expr:
    """S + X + Xᵀ: the unpaired terms summed, and the half with its transpose."""
    rest = [simplify(Add(*unpaired)) if len(unpaired) > 1 else unpaired[0]] if unpaired else []
    return Add(*rest, half, Transpose(half))


def _fold_sandwich(unpaired: list[Expr], halves: list[Expr]) -> tuple[list[Expr], Expr] | None:
    """A symmetric sandwich c Aᵀ M A among the unpaired terms folded into halves that all end in A:
    c Aᵀ M A + Σₕ cₕ Nₕ A + (…)ᵀ = Y + Yᵀ with Y = (½ c Aᵀ M + Σₕ cₕ Nₕ) A, since (Aᵀ M A)ᵀ = Aᵀ M A:
    one product by A instead of two (the residual block's input block, A = W₁). The other unpaired
    terms and Y; None where no such term is."""
    split = [_coefficient_and_factors(h) for h in halves]
    last = split[0][1][-1]
    if any(len(factors) < 2 or factors[-1] != last for _, factors in split):
        return None
    for i, term in enumerate(unpaired):
        c, factors = _coefficient_and_factors(term)
        if len(factors) >= 3 and factors[-1] == last and factors[0] == simplify(Transpose(last)) \
                and is_symmetric(_product(factors[1:-1])):
            left = [ScalarMul(c / 2, _product(factors[:-1]))] + [ScalarMul(ch, _product(f[:-1])) for ch, f in split]
            return unpaired[:i] + unpaired[i + 1:], MatMul(Add(*left), last)
    return None


def _coefficient_and_factors(term: Expr) -> tuple[sp.Expr, tuple[Expr, ...]]:
    """c and (F₁, F₂, …) of the term c F₁ F₂ …"""
    c = sp.Integer(1)
    while isinstance(term, ScalarMul):
        c, term = c * term.args[0], term.args[1]
    return c, term.args if isinstance(term, MatMul) else (term,)


def _product(factors: tuple[Expr, ...]) -> Expr:
    return factors[0] if len(factors) == 1 else MatMul(*factors)


def _monomials(e: Expr) -> list[Expr] | None:
    """``e`` as a list of products (its terms with every product of sums multiplied out); None past
    :data:`MAX_MONOMIALS`."""
    if isinstance(e, Add):
        out: list[Expr] = []
        for a in e.args:
            terms = _monomials(a)
            if terms is None or len(out) + len(terms) > MAX_MONOMIALS:
                return None
            out += terms
        return out
    if isinstance(e, ScalarMul):
        terms = _monomials(e.args[1])
        return None if terms is None else [ScalarMul(e.args[0], t) for t in terms]
    if isinstance(e, Transpose):
        terms = _monomials(e.args[0])
        return None if terms is None else [Transpose(t) for t in terms]
    if isinstance(e, MatMul):
        factors = [_monomials(a) for a in e.args]
        if any(f is None for f in factors) or math.prod(len(f) for f in factors) > MAX_MONOMIALS:
            return None
        return [MatMul(*combination) for combination in itertools.product(*factors)]
    return [e]


def flops(*roots: Expr) -> float:
    """Multiply-adds of evaluating ``roots`` as planned (each distinct node once, products left to right,
    elementwise work one per entry), with every dimension :data:`SIZE`."""
    seen: set[Expr] = set()

    def visit(node: Expr) -> float:
        if node in seen:
            return 0.0
        seen.add(node)
        total = sum(visit(c) for c in node.children)
        rows, cols = _size(node.rows), _size(node.cols)
        if isinstance(node, MatMul):
            total += product_flops(node.args)
        elif isinstance(node, (Add, Hadamard, ScalarMul)):
            total += rows * cols * max(len(node.children) - 1, 1)
        return total

    return sum(visit(e) for e in roots)


def product_flops(factors: tuple[Expr, ...]) -> float:
    """Multiply-adds of the product of ``factors``, left to right (a diagonal or ones factor: one per entry)."""
    total, inner_rows, inner_cols = 0.0, _size(factors[0].rows), _size(factors[0].cols)
    for f in factors[1:]:
        total += inner_rows * inner_cols * (1 if isinstance(f, (Diag, Ones)) else _size(f.cols))
        inner_cols = _size(f.cols)
    return total


@functools.cache
def _size(d: sp.Expr) -> float:
    """A dimension with every symbol :data:`SIZE`."""
    return float(d.xreplace({s: SIZE for s in d.free_symbols})) if d.free_symbols else float(d)
