"""Rendering plans through the Jinja templates of the top-level ``templates/`` folder."""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jinja2

from .. import __version__
from ..expr import Apply, BatchMean, Expr
from ..locations import project_folder
from ..printing.text import to_text
from .batch_means import mean_steps
from .fusion import Kernel, Launch, unfused
from .numpy_printer import (
    ArrayPrinter,
    BatchedArrayPrinter,
    argument_code,
    dim_code,
    dimension_code,
    function_source,
    makes_own_array,
    reference_code,
    scale_code,
    shared_parts,
)
from .plan import (
    LOOPED,
    BlockPlan,
    HBPKey,
    ModulePlan,
    Program,
    Step,
    batch_reference,
    memo_keys,
    memoised_steps,
)

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


Schedule = Callable[[Program, set[str]], tuple[list[Step | Launch], list[Kernel]]]


@dataclass(frozen=True)
class ArrayFamily:
    """How a backend family prints a program: the schedule pass that decides what runs (every step;
    or, for CuPy, :func:`.fusion.fuse`'s kernels and the steps they leave), the printer of a step's
    right-hand side (by node class, ``_print_<Node>``), and how it writes a matrix product."""

    schedule: Schedule = unfused
    printer: type[ArrayPrinter] = ArrayPrinter
    product: str = "({a} @ {b})"


NUMPY = ArrayFamily()


def program_context(program: Program, array_family: ArrayFamily, family: str | None = None,
                    keys: dict[Expr, str] | None = None, means: set[str] = frozenset()) -> dict[str, Any]:
    """The lines of a program (and of its per-sample fallbacks) as the template prints them, and the
    kernels they launch: one printer loop over the family's schedule. ``family`` (forward, gradients,
    jvp, …) and ``keys`` (:func:`.plan.memo_keys`): which steps a cache keeps, and under what key;
    ``means``, of a per-sample program: its steps computed as their batch means (:mod:`.batch_means`)."""
    kept = memoised_steps(program, family, keys) if family is not None and keys else set()
    # A loop's invariants run apart from the rest, once per loop. Elsewhere a kernel may fuse a step
    # another function shares (an activation's derivative), which is then computed again inside it:
    # cheaper on a GPU than a launch of its own.
    schedule, kernels = array_family.schedule(program, kept if family in LOOPED else set())
    memoised = {t for step in schedule for t in _targets(step) if set(_targets(step)) <= kept}
    # an elementwise function's value may be the part its cache keeps (tanh(x) for tanh′): never written to
    kept_parts = {s.target for s in program.steps if isinstance(s.node, Apply) and shared_parts(s.node.args[0])}
    overwritable = program.overwritable(memoised) - kept_parts
    own = {s.target for s in program.steps if makes_own_array(s.node)}
    printer = array_family.printer(program.names, overwritable, array_family.product, writable=overwritable & own)
    if means:  # a per-sample program's (BatchedArrayPrinter)
        printer.means = means
    node_of = {s.target: s.node for s in program.steps}
    lines, calls = [], iter(program.fallbacks)
    for step in schedule:
        targets = _targets(step)
        printer.reads, printer.step = set(), targets[0]
        if isinstance(step, Step) and isinstance(step.node, BatchMean):
            rhs = f"{next(calls)[0]}()"
        else:
            rhs = printer.rhs(step.node if isinstance(step, Step) else step)
        # a line may assign several targets (a kernel with several outputs): all or none are kept
        key = " ".join(keys[node_of[t]] for t in targets) if targets[0] in memoised else None
        lines.append({"targets": ", ".join(targets), "rhs": rhs, "key": key, "reads": printer.reads,
                      "fallback": isinstance(step, Step) and isinstance(step.node, BatchMean)})
    if array_family.schedule is unfused:
        lines = _read_lines(lines, set(program.result_names()))
    batched = ArrayFamily(printer=BatchedArrayPrinter, product=array_family.product)  # no loop over the batch
    means = [mean_steps(p) for _, p, _ in program.fallbacks]
    inner = [program_context(p, batched, means=m) for (_, p, _), m in zip(program.fallbacks, means)]
    fallbacks = [
        {"name": name, "lines": context["lines"], "value": _mean_code(inner_program, m),
         "leaves": [argument_code(batch_reference(leaf)) for leaf in leaves]}
        for (name, inner_program, leaves), context, m in zip(program.fallbacks, inner, means)
    ]
    return {"lines": lines, "fallbacks": fallbacks, "results": printed_results(program),
            "kernels": kernels + [k for context in inner for k in context["kernels"]],
            "reads_cache": printer.reads_cache or any(context["reads_cache"] for context in inner)}


def _mean_code(program: Program, means: set[str]) -> str:
    """The batch mean a per-sample program returns: of its value (the value itself where it is computed as
    its mean, ``means``), or of the Kronecker product of its two factors without forming it
    (:meth:`.plan.ProgramBuilder._fallback`)."""
    results = program.results
    if results.get("value") in means:
        return reference_code(results["value"])
    if "value" in results:
        return f"_batch_mean({reference_code(results['value'])})"
    return f"_kron_mean({reference_code(results['left'])}, {reference_code(results['right'])})"


def _read_lines(lines: list[dict[str, Any]], results: set[str]) -> list[dict[str, Any]]:
    """The lines whose values the results need, through what each printed line reads: a broadcast v 1ᵀ
    that every reader takes as v, or a constant c 1 1ᵀ that every reader takes as c
    (:meth:`.numpy_printer.ArrayPrinter.elementwise_operands`), is not made."""
    needed, kept = set(results), []
    for line in reversed(lines):
        if line["fallback"] or set(line["targets"].split(", ")) & needed:
            kept.append(line)
            needed |= line["reads"]
    return kept[::-1]


def _targets(step: Step | Launch) -> tuple[str, ...]:
    return step.targets if isinstance(step, Launch) else (step.target,)


def program_contexts(plan: ModulePlan, array_family: ArrayFamily) -> tuple[dict[str, Any], dict[str, dict]]:
    """Every program of a module printed by one family: the forward pass, then each function family."""
    keys = memo_keys(plan)
    return (program_context(plan.forward, array_family, "forward", keys),
            {family: {key: program_context(p, array_family, family, keys) for key, p in programs.items()}
             for family, programs in plan.families().items()})


def printed_results(program: Program) -> dict[str, Any]:
    """The results as the templates print them: code that reads each, a block as its printed parts."""
    out: dict[str, Any] = {}
    for name, result in program.results.items():
        if isinstance(result, BlockPlan):
            dense = None if result.dense is None else reference_code(result.dense)
            if dense is None and not result.kron:  # a zero block: its zeros, so that it has a size
                dense = f"xp.zeros(({dim_code(result.order)}, {dim_code(result.order)}), dtype=dtype)"
            out[name] = {"kron": [(scale_code(s), reference_code(a), reference_code(b)) for s, a, b in result.kron],
                         "dense": dense}
        elif name in program.sample_rows:  # per-sample matrices, back to (rows, B, cols)
            out[name] = f"{reference_code(result)}.reshape({dim_code(program.sample_rows[name])}, B, -1)"
        else:
            out[name] = reference_code(result)
    return out


def functions_of(programs: list[Program]) -> list[str]:
    """The Python source of every elementwise function (and derivative) the programs apply, once each."""
    seen: dict[str, str] = {}
    programs = list(programs)
    while programs:
        p = programs.pop()
        programs += [inner for _, inner, _ in p.fallbacks]
        for step in p.steps:
            if isinstance(step.node, Apply):
                f = step.node.args[0]
                seen.setdefault(f"{f.base.name}{f.order}", function_source(f))
    return [seen[k] for k in sorted(seen)]


def served_modes(plan: ModulePlan) -> dict[HBPKey, str]:
    """For each distinct HBP program, the curvature modes and approximations it computes, in words
    (``exact, ggn under (6) and (7), parameters only``)."""
    served: dict[HBPKey, list[HBPKey]] = {}
    for key, kept in plan.hbp_aliases.items():
        served.setdefault(kept, []).append(key)
    words = {}
    for kept, keys in served.items():
        curvatures: dict[str, list[str]] = {}  # approximation → its curvatures
        for k in keys:
            curvatures.setdefault(k.approximation, []).append(k.curvature)
        approximations: dict[str, list[str]] = {}  # the curvatures, written out → their approximations
        for approximation, modes in curvatures.items():
            approximations.setdefault(", ".join(dict.fromkeys(modes)), []).append(f"({approximation})")
        words[kept] = "; ".join(f"{modes} under {' and '.join(a)}" for modes, a in approximations.items()) + (
            ", parameters only" if not kept.with_inputs else "")
    return words


def module_context(plan: ModulePlan) -> dict[str, Any]:
    """What the templates say about the module itself."""
    m = plan.derivation.module
    return {
        "hbp_aliases": plan.hbp_aliases,
        # the modes whose blocks are formed sample by sample somewhere (a per-sample program): the cost
        # model of Approximation.AUTO reads it
        "hbp_per_sample": sorted({(k.curvature.value, k.approximation.value) for k, kept in plan.hbp_aliases.items()
                                  if plan.hbp[kept].fallbacks}),
        "loss_aliases": plan.loss_aliases,
        "hbp_served": served_modes(plan),
        "name": m.name,
        "output_text": to_text(m.output),
        "per_sample": plan.per_sample,
        "params": plan.params,
        "variables": [v.name for v in m.variables],
        "symbols": {s.name: {"shape": (dim_code(s.rows), dim_code(s.cols)), "positive": "positive" in s.hints}
                    for s in m.symbols},
        "output_shape": (dim_code(m.output.rows), dim_code(m.output.cols)),
        "dims": {name: dimension_code(source) for name, source in plan.dims.items()},
        "dim_names": ", ".join(plan.dims) + ("," if len(plan.dims) == 1 else ""),
    }


def render_module(plan: ModulePlan, backend: str, header: str, product: str = NUMPY.product) -> str:
    """The module's source for the NumPy family (``header`` imports NumPy or CuPy as ``xp``);
    ``product`` prints a matrix product (``a @ b``)."""
    forward, families = program_contexts(plan, ArrayFamily(product=product))
    return environment().get_template(f"{backend}/module.py.j2").render(
        module=module_context(plan), version=__version__, backend=backend, header=header,
        functions=functions_of(plan.programs()), forward=forward, **families,
    )
