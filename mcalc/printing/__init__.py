"""Printers: text and LaTeX forms of expressions, reports of derivations."""
from .latex import to_latex
from .text import to_text

__all__ = ["to_latex", "to_text"]
