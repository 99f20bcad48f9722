"""Rendering plans through the Jinja templates of the top-level ``templates/`` folder."""
from __future__ import annotations

import functools
from typing import Any

import jinja2

from .. import __version__
from ..expr import Apply, BatchMean
from ..printing.text import to_text
from .locations import project_folder
from .numpy_printer import ArrayPrinter, function_source
from .plan import ModulePlan, Program, batch_reference, invariant_steps

TEMPLATES = project_folder("templates")


@functools.cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # Python and CUDA source, not HTML
    )
    env.filters["pyrepr"] = repr  # a string as a Python literal (tojson escapes quotes for HTML)
    return env


def template_hash(backend: str) -> str:
    """A hash of every template of one backend family (part of the manifest)."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted([*(TEMPLATES / backend).glob("*"), *(TEMPLATES / "common").glob("*")]):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _program_context(program: Program, family: str | None = None, product: str = "({a} @ {b})") -> dict[str, Any]:
    """The lines of a program (and of its per-sample fallbacks) as the template prints them."""
    invariant = invariant_steps(program, family)
    printer = ArrayPrinter(lambda node: program.names[node], program.overwritable(invariant), product)
    lines, calls = [], iter(program.fallbacks)
    for step in program.steps:
        rhs = f"{next(calls)[0]}()" if isinstance(step.node, BatchMean) else printer.rhs(step.node)
        lines.append((step.target, f"{step.target} = {rhs}"))
    return assemble_context(program, lines, invariant,
                            [_program_context(inner, product=product) for _, inner, _ in program.fallbacks])


def assemble_context(program: Program, lines: list[tuple[str, str]], invariant: set[str],
                     fallback_contexts: list[dict[str, Any]]) -> dict[str, Any]:
    """What the templates print for a program, from its (target, line) pairs and the contexts of its
    per-sample fallbacks (any backend's). The lines are split into the loop-invariant ones
    (``invariant``, :func:`.plan.invariant_steps`), which a cache keeps (``hoisted``, the targets they
    assign), and the rest (``lines``), in program order: an invariant step depends only on invariant
    steps, so it may run first."""
    # a line may assign several targets (a kernel with several outputs): all or none are invariant
    lines = [((t,) if isinstance(t, str) else t, line) for t, line in lines]
    kept = [(t, line) for t, line in lines if t[0] in invariant]
    fallbacks = [
        {"name": name, "lines": context["lines"], "value": inner.results["value"],
         "leaves": [batch_reference(leaf) for leaf in leaves]}
        for (name, inner, leaves), context in zip(program.fallbacks, fallback_contexts)
    ]
    return {"lines": [line for t, line in lines if t[0] not in invariant],
            "invariant_lines": [line for _, line in kept], "hoisted": [name for t, _ in kept for name in t],
            "fallbacks": fallbacks, "results": program.results}


def functions_of(plan: ModulePlan) -> list[str]:
    seen: dict[str, str] = {}
    programs = plan.programs()
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


def render_module(plan: ModulePlan, backend: str, header: str, product: str = "({a} @ {b})") -> str:
    """The module's source for one backend family; ``product`` prints a matrix product of the
    NumPy family (``a @ b``)."""
    return environment().get_template(f"{backend}/module.py.j2").render(
        module=module_context(plan),
        version=__version__,
        backend=backend,
        header=header,
        functions=functions_of(plan),
        forward=_program_context(plan.forward, product=product),
        **{family: {key: _program_context(p, family, product) for key, p in programs.items()}
           for family, programs in plan.families().items()},
    )
