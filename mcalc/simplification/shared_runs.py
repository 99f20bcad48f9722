"""Products that share a run of factors: the run computed once, for all of them.

The blocks of one HBP program often multiply the same factors in different products: a residual block
z = x + W₂ tanh(W₁x + b₁) has W₂ᵀ 𝓗z W₂ in its parameters' blocks and 𝓗z W₂ diag(E[φ′]) W₁ in its
input's. Each product is one step, evaluated left to right, so 𝓗z W₂ is computed in the second and
W₂ᵀ 𝓗z in the first: the run 𝓗z W₂ is written as a product of its own, W₂ᵀ (𝓗z W₂) and (𝓗z W₂) diag(…) W₁,
which the planner names once (common subexpressions). Kept only where it costs fewer flops
(counted as :func:`.symmetric.flops` counts them: products left to right, every distinct node once).

A batch mean without a closed form (:class:`~mcalc.expr.BatchMean`) is left whole: its operand runs as a
per-sample program of its own, which shares no step with the others and multiplies its chain in the
order the sizes it meets favour (:mod:`mcalc.runtime.chain`); a run nested there would only split it.
"""
from __future__ import annotations

import functools
from collections import Counter

from ..expr import BatchMean, Expr, MatMul, Ones
from .symmetric import product_flops

MAX_ROUNDS = 8  # a run shared per round; programs rarely hold more


def share_runs(roots: list[Expr]) -> list[Expr]:
    """``roots`` with, round by round, the run of factors whose own product saves the most flops nested in
    every product that holds it; unchanged where none saves any."""
    return list(_shared(tuple(roots)))


@functools.lru_cache(maxsize=256)  # a module's HBP programs repeat blocks from mode to mode
def _shared(roots: tuple[Expr, ...]) -> tuple[Expr, ...]:
    for _ in range(MAX_ROUNDS):
        products = _products(roots)
        best, most = None, 0.0
        for run in _common_runs(products):
            saved = _saving(run, products)
            if saved > most:
                best, most = run, saved
        if best is None:
            return roots
        done: dict[Expr, Expr] = {}
        roots = tuple(_nest(root, best, done) for root in roots)
    return roots


def _products(roots: tuple[Expr, ...]) -> set[MatMul]:
    """Every distinct product node (a tree's walk would repeat shared subtrees)."""
    seen: set[Expr] = set()
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(node.children if not isinstance(node, BatchMean) else ())
    return {n for n in seen if isinstance(n, MatMul)}


def _saving(run: tuple[Expr, ...], products: set[MatMul]) -> float:
    """The flops that nesting ``run`` saves: each product holding it multiplies its product instead of
    its factors, and the run is multiplied once (:func:`.symmetric.flops` counts the same way)."""
    saved = 0.0 if MatMul(*run) in products else -product_flops(run)
    for p in products:
        i = _position(p.args, run)
        if i is not None and len(p.args) > len(run):
            saved += product_flops(p.args) - product_flops((*p.args[:i], MatMul(*run), *p.args[i + len(run):]))
    return saved


def _position(args: tuple[Expr, ...], run: tuple[Expr, ...]) -> int | None:
    k = len(run)
    return next((i for i in range(len(args) - k + 1) if args[i:i + k] == run), None)


def _runs(product: MatMul) -> set[tuple[Expr, ...]]:
    """Every run of two or more consecutive factors (a broadcast 1 excepted: the printer reads it in place)."""
    args = product.args
    return {args[i:j] for i in range(len(args)) for j in range(i + 2, len(args) + 1)
            if not any(isinstance(f, Ones) for f in args[i:j])}


def _common_runs(products: set[MatMul]) -> list[tuple[Expr, ...]]:
    """The runs that two products or more hold, at least one of them as a proper part, in a fixed order."""
    held = Counter(run for p in products for run in _runs(p))
    proper = {run for p in products for run in _runs(p) if len(run) < len(p.args)}
    return sorted((run for run, count in held.items() if count >= 2 and run in proper), key=repr)


def _nest(node: Expr, run: tuple[Expr, ...], done: dict[Expr, Expr]) -> Expr:
    """``node`` with the first occurrence of ``run`` in each product that holds it as a proper part
    written as a product of its own."""
    if node not in done:
        kids = node.children if not isinstance(node, BatchMean) else ()
        out = node.rebuild([_nest(c, run, done) for c in kids]) if kids else node
        if isinstance(out, MatMul) and len(out.args) > len(run):
            i = _position(out.args, run)
            if i is not None:
                out = MatMul(*out.args[:i], MatMul(*run), *out.args[i + len(run):])
        done[node] = out
    return done[node]
