"""Common subexpressions of a report named once: ``where s₁ = sqrt((1/n)·sum(x_c ⊙ x_c) + ε)``.

Only a report with a rule longer than :data:`LONG_RULE` characters names anything (S.11's rules read best
written out). A subexpression is named when it occurs at least twice across the module's rules and
prints to at least :data:`MIN_LENGTH` characters; a name then used only once (say, only inside another
named expression) is put back in place, until every name is used at least twice.
"""
from __future__ import annotations

from collections import Counter

from ..expr import Expr, Identity, Ones, Seed, Symbol, Zero
from .text import TextPrinter

LONG_RULE = 200
MIN_LENGTH = 16
_SUBSCRIPTS = str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉")


def shared_names(exprs: list[Expr]) -> dict[Expr, str]:
    """Names (``s₁``, ``s₂``, … in order of first appearance, inner ones first) for the repeated
    subexpressions of ``exprs``."""
    plain = TextPrinter()
    if all(len(plain.doprint(e)) <= LONG_RULE for e in exprs):
        return {}
    counts = Counter(node for e in exprs for node in e.walk())
    order = list(dict.fromkeys(node for e in exprs for node in e.walk()))  # first appearance, children first
    chosen = [n for n in order if counts[n] >= 2 and not isinstance(n, (Symbol, Seed, Identity, Ones, Zero))
              and len(plain.doprint(n)) >= MIN_LENGTH]
    while True:
        names = {n: f"s{i + 1}".translate(_SUBSCRIPTS) for i, n in enumerate(chosen)}
        uses = Counter()
        for e in [*exprs, *chosen]:
            _count_uses(e, names, uses, top=e in names)
        once = [n for n in chosen if uses[n] < 2]
        if not once:
            return names
        chosen = [n for n in chosen if n not in once]


def _count_uses(e: Expr, names: dict[Expr, str], uses: Counter, top: bool = False) -> None:
    """How often each named node is printed as its name in ``e`` (a named node's own definition is
    printed out, ``top``)."""
    if not top and e in names:
        uses[e] += 1
        return
    for child in e.children:
        _count_uses(child, names, uses)
