"""A derivation's rules rendered as text, LaTeX, Markdown or JSON."""
from __future__ import annotations

import json
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import sympy as sp

from ..expr import Apply
from .latex import LatexPrinter, to_latex
from .shared import shared_names
from .text import TextPrinter, to_text

if TYPE_CHECKING:
    from ..calculus.derivation import Derivation, DerivedRule


def _heading(rule: DerivedRule) -> str:
    return rule.kind if rule.curvature is None else f"{rule.kind} [{rule.curvature}]"


def merged(rules: list[DerivedRule]) -> list[DerivedRule]:
    """Rules with curvature modes that coincide folded into one (e.g. 'exact = ggn')."""
    out: list[DerivedRule] = []
    for r in rules:
        previous = out[-1] if out else None
        if (previous is not None and r.curvature and previous.curvature and r.variable == previous.variable
                and r.kind == previous.kind and r.expr == previous.expr):
            out[-1] = replace(previous, curvature=f"{previous.curvature} = {r.curvature}")
        else:
            out.append(r)
    return out


def functions_used(d: Derivation) -> list[dict[str, str]]:
    """φ, φ′, φ″ of every elementwise function the rules apply, with SymPy's formulas."""
    seen: dict[str, dict[str, str]] = {}
    for r in d.rules():
        for node in r.expr.walk():
            if isinstance(node, Apply):
                f = node.function
                entry = {"name": f.display_name, "formula": str(f.expr), "latex": sp.latex(f.expr)}
                through = f.in_terms_of_base()
                if through is not None:
                    entry["through_base"] = str(through)
                seen.setdefault(f.display_name, entry)
    return [seen[k] for k in sorted(seen)]


def _as_dict(d: Derivation) -> dict[str, Any]:
    m = d.module
    return {
        "module": m.name,
        "output": to_text(m.output),
        "output_latex": to_latex(m.output),
        "inputs": [s.name for s in m.inputs],
        "params": [s.name for s in m.params],
        "constants": [s.name for s in m.constants],
        "rules": [
            {
                "variable": r.variable,
                "kind": r.kind,
                "curvature": r.curvature,
                "lhs": r.lhs,
                "text": to_text(r.expr),
                "latex": to_latex(r.expr),
                "equation": r.equation,
            }
            for r in d.rules()
        ],
        "functions": functions_used(d),
    }


def render(d: Derivation, fmt: str) -> str:
    """All rules of ``d`` in format ``fmt`` (one of :data:`FORMATS`); text, LaTeX and Markdown name the
    subexpressions the rules repeat (:mod:`.shared`) and define them after the rules."""
    if fmt == "json":
        return json.dumps(_as_dict(d), indent=2, ensure_ascii=False)
    m = d.module
    rules = merged(d.rules())
    names = shared_names([r.expr for r in rules])
    text, latex = TextPrinter(names), LatexPrinter({e: _latex_name(n) for e, n in names.items()})
    if fmt == "latex":
        lines = [rf"z &= {to_latex(m.output)} \\"]
        lines += [rf"{r.lhs_latex} &= {latex.doprint(r.expr)} && \text{{{_heading(r)} {r.equation}}} \\"
                  for r in rules]
        lines += [rf"\text{{where }} {latex.names[e]} &= {latex.doprint(e, define=True)} \\" for e in names]
        return "\\begin{align*}\n" + "\n".join(lines) + "\n\\end{align*}"
    if fmt == "markdown":
        out = [f"### {m.name}", "", f"$z = {to_latex(m.output)}$", "", "| rule | | equation |", "|---|---|---|"]
        out += [f"| {_heading(r)} | ${r.lhs_latex} = {latex.doprint(r.expr)}$ | {r.equation} |" for r in rules]
        out += [f"\nwhere ${latex.names[e]} = {latex.doprint(e, define=True)}$" for e in names]
        for f in functions_used(d):
            extra = f" = {f['through_base']}" if "through_base" in f else ""
            out.append(f"\n- `{f['name']}(t) = {f['formula']}`{extra}")
        return "\n".join(out)
    out = [f"{m.name}:  z = {to_text(m.output)}"]
    out += [f"  {r.lhs} = {text.doprint(r.expr)}    [{_heading(r)}, {r.equation}]" for r in rules]
    out += [f"  where {name} = {text.doprint(e, define=True)}" for e, name in names.items()]
    for f in functions_used(d):
        extra = f"  = {f['through_base']}" if "through_base" in f else ""
        out.append(f"  where {f['name']}(t) = {f['formula']}{extra}")
    return "\n".join(out)


def _latex_name(name: str) -> str:
    """s₁ → s_{1}."""
    digits = name[1:].translate(str.maketrans("₀₁₂₃₄₅₆₇₈₉", "0123456789"))
    return f"s_{{{digits}}}"
