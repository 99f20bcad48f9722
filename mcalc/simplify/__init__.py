"""Simplification: algebraic rewriting of derived rules (layer 4 of the compiler)."""
from . import algebra, fusion, psd  # noqa: F401 - importing registers the rules
from .engine import Rule, all_rules, record_rewrites, rule, simplify

__all__ = ["Rule", "all_rules", "record_rewrites", "rule", "simplify"]
