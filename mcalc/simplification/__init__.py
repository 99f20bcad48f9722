"""Simplification: algebraic rewriting of derived rules (layer 4 of the compiler)."""
from . import algebra, fusion, psd  # noqa: F401 - importing registers the rules
from .engine import RewriteRule, all_rules, record_rewrites, rule, simplify

__all__ = ["RewriteRule", "all_rules", "record_rewrites", "rule", "simplify"]
