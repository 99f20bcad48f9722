"""The rewrite engine: rules registered per node type, applied bottom-up to a fixpoint.

A rule is a function ``node -> Expr | None`` registered with :func:`rule` for
one node type and one rule set. ``'algebra'`` holds the identities that bring
a derived rule into the paper's form (run by :func:`simplify`); other sets
(``'fusion'``) hold rewrites that only a code generator wants.

Every rewrite that fires can be observed with :func:`record_rewrites`; the
tests evaluate both sides of each on random values, so a wrong identity is
caught by its numeric fingerprint.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..expr import Expr


@dataclass(frozen=True)
class RewriteRule:
    """One rewrite: where it applies, what it is called and which equation it is."""

    node_type: type
    name: str
    cite: str
    ruleset: str
    apply: Callable[[Expr], Expr | None]


RULES: dict[tuple[str, type], list[RewriteRule]] = defaultdict(list)
_observers: list[Callable[[RewriteRule, Expr, Expr], None]] = []


def rule(node_type: type, cite: str, ruleset: str = "algebra") -> Callable:
    """Register ``fn`` as a rewrite of ``node_type`` nodes, citing its identity."""

    def register(fn: Callable[[Expr], Expr | None]) -> Callable[[Expr], Expr | None]:
        RULES[(ruleset, node_type)].append(RewriteRule(node_type, fn.__name__, cite, ruleset, fn))
        return fn

    return register


def all_rules() -> list[RewriteRule]:
    """Every registered rule (all rule sets)."""
    return [r for rules in RULES.values() for r in rules]


@contextlib.contextmanager
def record_rewrites() -> Iterator[list[tuple[RewriteRule, Expr, Expr]]]:
    """Collect every (rule, before, after) that fires inside the block."""
    seen: list[tuple[RewriteRule, Expr, Expr]] = []
    observer = lambda r, before, after: seen.append((r, before, after))  # noqa: E731
    _observers.append(observer)
    try:
        yield seen
    finally:
        _observers.remove(observer)


def _rewrite_once(node: Expr, rulesets: tuple[str, ...]) -> Expr | None:
    for ruleset in rulesets:
        for r in RULES.get((ruleset, type(node)), ()):
            out = r.apply(node)
            if out is not None and out != node:
                for observe in _observers:
                    observe(r, node, out)
                return out
    return None


class Simplifier:
    """Applies rule sets to a fixpoint, remembering every node it has simplified."""

    def __init__(self, rulesets: tuple[str, ...] = ("algebra",)) -> None:
        self.rulesets = rulesets
        self._memo: dict[Expr, Expr] = {}

    def __call__(self, expr: Expr) -> Expr:
        memo = self._memo
        if expr in memo:
            return memo[expr]
        visited: list[Expr] = [expr]
        current = expr
        while True:  # iterate (not recurse) so long rewrite chains cannot exhaust the stack
            kids = current.children
            rebuilt = current.rebuild([self(c) for c in kids]) if kids else current
            if rebuilt in memo:
                result = memo[rebuilt]
                break
            visited.append(rebuilt)
            rewritten = _rewrite_once(rebuilt, self.rulesets)
            if rewritten is None:
                result = rebuilt
                break
            if len(visited) > MAX_REWRITES:
                raise RuntimeError(f"simplification does not terminate on {expr!r}")
            current = rewritten
        for node in visited:
            memo[node] = result
        return result


MAX_REWRITES = 10_000
_default = Simplifier()


def simplify(expr: Expr, rulesets: tuple[str, ...] = ("algebra",)) -> Expr:
    """``expr`` rewritten by the rule sets until no rule applies."""
    if rulesets == ("algebra",):
        return _default(expr)
    return Simplifier(rulesets)(expr)


def reset_cache() -> None:
    """Forget every simplified node (so that rewrites fire again, e.g. to observe them)."""
    global _default
    _default = Simplifier()
