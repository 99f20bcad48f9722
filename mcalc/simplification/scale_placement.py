"""A number that scales a product, applied where the product has the fewest entries.

Batch rules carry 1/B on their products: the residual block's input block holds
(½/B)·W₁ᵀ M (n × h) and (1/B)·(𝓗z W₂ ⊙ 1 d̄ᵀ) (n × h), each an extra pass over n·h entries. Since
c (A B) = (c A) B = A (c B) and c (A ⊙ B) = (c A) ⊙ B, the number can scale the smallest operand
instead: W₁ᵀ ((½/B) M) scales h·h entries, and (1/B) d̄ only h. Code generation only: the
display form keeps the paper's.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import sympy as sp

from ..expr import (
    Diag,
    Expr,
    Hadamard,
    Identity,
    Kron,
    MatMul,
    Ones,
    ScalarMul,
    Transpose,
    UnfoldMatrix,
    Zero,
    broadcast_source,
    is_broadcast,
)


def place_scales(roots: list[Expr], varies: Callable[[Expr], bool]) -> list[Expr]:
    """``roots`` with every c·X moved into X's operand of fewest entries, where that has fewer than X and
    nothing else reads X. ``varies(X)``: X is computed afresh by each call, so not a value that a cache
    holds whole (forming it from a scaled operand would compute it again)."""
    parents = _parent_counts(roots)
    done: dict[Expr, Expr] = {}

    def alone(node: Expr) -> bool:  # computed for this one reader: it may be computed otherwise
        return parents[node] == 1 and varies(node)

    def place(node: Expr) -> Expr:
        if node not in done:
            kids = node.children
            out = node.rebuild([place(c) for c in kids]) if kids else node
            if isinstance(node, ScalarMul) and alone(node.args[1]):
                out = _pushed(out.args[0], out.args[1], alone) or out
            done[node] = out
        return done[node]

    return [place(root) for root in roots]


def _parent_counts(roots: list[Expr]) -> Counter:
    """How many distinct nodes read each node (a root counts as read from outside)."""
    seen: set[Expr] = set()
    counts: Counter = Counter(roots)
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for child in set(node.children):
            counts[child] += 1
            stack.append(child)
    return counts


def entries(node: Expr) -> sp.Expr:
    """A node's entries: a diagonal's or a broadcast's (1 wᵀ) those of its vector."""
    if isinstance(node, Diag):
        return entries(node.args[0])
    if is_broadcast(node):
        return entries(broadcast_source(node))
    return sp.sympify(node.rows * node.cols)


def fewer(a: sp.Expr, b: sp.Expr) -> bool:
    """Entries a < b for every size of the dimensions: b/a is a product of dimensions (h·h against n·h,
    say, is not)."""
    coefficient, dimensions = sp.powsimp(sp.sympify(b) / a).as_coeff_Mul()
    if dimensions == 1:
        return bool(coefficient > 1)
    return bool(coefficient >= 1) and all(base.is_Symbol and exponent.is_positive
                                          for base, exponent in dimensions.as_powers_dict().items())


_HELD = (Ones, Identity, Zero, Kron, UnfoldMatrix)  # structure a product reads in place


def _pushed(c: sp.Expr, product: Expr, alone: Callable[[Expr], bool]) -> Expr | None:
    """c·product with c on its operand of fewest entries (recursively, through a product that is read
    there alone), or None where no operand has fewer entries than the product."""
    if not isinstance(product, (MatMul, Hadamard)):
        return None
    candidates = [i for i, f in enumerate(product.args)  # a structured factor, or its transpose, is applied
                  if not isinstance(f.args[0] if isinstance(f, Transpose) else f, _HELD)]
    if not candidates:
        return None
    fewest = [k for k in candidates if fewer(entries(product.args[k]), entries(product))]
    if not fewest:
        return None
    i = next(k for k in fewest if all(not fewer(entries(product.args[j]), entries(product.args[k])) for j in fewest))
    operand = product.args[i]
    if isinstance(operand, ScalarMul):  # c (d Y) = (c d) Y: one scaling
        scaled = ScalarMul(c * operand.args[0], operand.args[1])
    elif isinstance(operand, Diag):  # c diag(v) = diag(c v): the vector scaled
        scaled = Diag(ScalarMul(c, operand.args[0]))
    else:
        scaled = (_pushed(c, operand, alone) if alone(operand) else None) or ScalarMul(c, operand)
    return product.rebuild([*product.args[:i], scaled, *product.args[i + 1:]])
