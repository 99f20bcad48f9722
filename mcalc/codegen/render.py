"""Rendering plans through the Jinja templates of the top-level ``templates/`` folder."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jinja2

from .. import __version__
from ..expr import Apply, BatchMean, Expr, Symbol
from ..printing.text import to_text
from .numpy_printer import ArrayPrinter, function_source
from .plan import ModulePlan, Program

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"


@functools.cache
def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # Python and CUDA source, not HTML
    )


def template_hash(backend: str) -> str:
    """A hash of every template of one backend family (part of the manifest)."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted([*(TEMPLATES / backend).glob("*"), *(TEMPLATES / "common").glob("*")]):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _leaf_key(leaf: Expr) -> str:
    return leaf.name if isinstance(leaf, Symbol) else "dz"


def _program_context(program: Program) -> dict[str, Any]:
    """The lines of a program (and of its per-sample fallbacks) as the template prints them."""
    printer = ArrayPrinter(lambda node: program.names[node])
    lines, calls = [], iter(program.fallbacks)
    for step in program.steps:
        rhs = f"{next(calls)[0]}()" if isinstance(step.node, BatchMean) else printer.rhs(step.node)
        lines.append(f"{step.target} = {rhs}")
    fallbacks = [
        {"name": name, "lines": _program_context(inner)["lines"], "value": inner.results["value"],
         "leaves": [_leaf_key(leaf) for leaf in leaves]}
        for name, inner, leaves in program.fallbacks
    ]
    return {"lines": lines, "fallbacks": fallbacks, "results": program.results}


def functions_of(plan: ModulePlan) -> list[str]:
    seen: dict[str, str] = {}
    programs = [plan.forward, *plan.gradients.values(), *plan.hbp.values()]
    while programs:
        p = programs.pop()
        programs += [inner for _, inner, _ in p.fallbacks]
        for step in p.steps:
            if isinstance(step.node, Apply):
                f = step.node.args[0]
                seen.setdefault(f"{f.base.name}{f.order}", function_source(f))
    return [seen[k] for k in sorted(seen)]


def module_context(plan: ModulePlan) -> dict[str, Any]:
    """What the templates say about the module itself."""
    m = plan.derivation.module
    return {
        "name": m.name,
        "output_text": to_text(m.output),
        "per_sample": plan.per_sample,
        "params": plan.params,
        "variables": [v.name for v in m.variables],
        "dims": plan.dims,
        "dim_names": ", ".join(plan.dims) + ("," if len(plan.dims) == 1 else ""),
    }


def render_module(plan: ModulePlan, backend: str, header: str) -> str:
    return environment().get_template(f"{backend}/module.py.j2").render(
        module=module_context(plan),
        version=__version__,
        backend=backend,
        header=header,
        functions=functions_of(plan),
        forward=_program_context(plan.forward),
        gradients={key: _program_context(p) for key, p in plan.gradients.items()},
        hbp={key: _program_context(p) for key, p in plan.hbp.items()},
    )
