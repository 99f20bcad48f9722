"""Products distributed over sums, for the per-sample programs of batch means without a closed form.

The simplifier factors sums (A B + A C = A (B + C)), which a reader and a closed-form batch mean want. A
per-sample program wants the opposite where a sum sits inside a chain of structured factors: attention's
Jacobian of its scores' softmax, diag(s) − diag(s)(I ⊗ 1 1ᵀ) diag(s), is T² × T² per sample if formed, while
each of its two products is applied to its neighbours by :func:`~mcalc.runtime.chain.chain_product`
without it. So before such a program is planned, each run of factors beside 𝓗z becomes a sum of chains.
"""
from __future__ import annotations

import math

from ..expr import Add, Expr, MatMul, ScalarMul, Seed, Transpose
from .engine import simplify

MAX_TERMS = 16  # a run whose expansion has more terms is kept as it is (a product of k sums has 2ᵏ)


def expanded_runs(e: Expr) -> Expr:
    """``e`` (a product, possibly times a number) with each run of factors beside 𝓗z a sum of products, no
    sum left inside one; a run of more than :data:`MAX_TERMS` terms is kept."""
    if isinstance(e, ScalarMul):
        return ScalarMul(e.coefficient, expanded_runs(e.operand))
    if not isinstance(e, MatMul):
        return e
    out: list[Expr] = []
    run: list[Expr] = []
    done: dict[Expr, Expr] = {}  # each run as it was, and its expansion
    for f in (*e.args, None):
        if f is not None and not (isinstance(f, Seed) and f.kind == "Hz"):
            run.append(f)
            continue
        if run:
            whole = run[0] if len(run) == 1 else MatMul(*run)
            mirrored = done.get(simplify(Transpose(whole)))
            if isinstance(mirrored, Add):  # Jᵀ 𝓗z J with J a sum: the expanded Jᵀ, transposed, made once
                out.append(Transpose(mirrored))
            elif _terms(whole) > MAX_TERMS:
                out.append(whole)
            else:
                # each term in the simplifier's form, so that a term and its transpose (the pairs of a symmetric
                # block's terms) are seen as one, the second read as a view of the first
                terms = [simplify(t) for t in expanded(whole)]
                done[whole] = terms[0] if len(terms) == 1 else Add(*terms)
                out.append(done[whole])
            run = []
        if f is not None:
            out.append(f)
    return out[0] if len(out) == 1 else MatMul(*out)


def _terms(e: Expr) -> int:
    """How many terms :func:`expanded` would give, counted without making them."""
    if isinstance(e, Add):
        return sum(_terms(a) for a in e.args)
    if isinstance(e, ScalarMul):
        return _terms(e.operand)
    if isinstance(e, MatMul):
        return math.prod(_terms(f) for f in e.args)
    return 1


def expanded(e: Expr) -> list[Expr]:
    """``e`` as its terms, products distributed over sums (each term as made: the simplifier flattens it)."""
    if isinstance(e, Add):
        return [t for a in e.args for t in expanded(a)]
    if isinstance(e, ScalarMul):
        return [ScalarMul(e.coefficient, t) for t in expanded(e.operand)]
    if isinstance(e, MatMul):
        terms: list[list[Expr]] = [[]]
        for f in e.args:
            terms = [[*t, p] for t in terms for p in expanded(f)]
        return [MatMul(*t) for t in terms]
    return [e]
