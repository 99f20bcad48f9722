"""A linked network pass (:mod:`.network_plan`) as generated code: rendered for NumPy or CuPy (its kernels
fused across the modules' boundaries), cached on disk by the chain, the mode, the templates and mcalc's
own source, and imported."""
from __future__ import annotations

import hashlib
from types import ModuleType

from .. import __version__
from ..files import write_atomic
from ..locations import cache_directory
from ..modes import Approximation, Curvature
from ..runtime.generated_code import import_code
from .generate import HEADERS
from .manifest import compiler_hash
from .network_plan import Chain, link
from .plan import Program
from .render import NUMPY, environment, functions_of, printed_results, program_context, template_hash


def render_network(program: Program, backend: str, title: str, params: list[str],
                   curvature: Curvature | None, approximation: Approximation) -> str:
    """The source of one linked pass for ``backend`` (``'numpy'`` or ``'cupy'``)."""
    if backend == "cupy":
        from .cuda import CUPY, cuda_source

        context = program_context(program, CUPY)
        extra = {"cuda_source": cuda_source(context["kernels"])}
    else:
        context, extra = program_context(program, NUMPY), {"header": HEADERS[backend]}
    return environment().get_template(f"{backend}/network.py.j2").render(
        title=title, version=__version__, backend=backend, functions=functions_of([program]),
        program=context, results=printed_results(program), params=params,
        curvature=curvature.value if curvature is not None else None, approximation=approximation.value,
        **extra,
    )


def network_code(chain: Chain, curvature: Curvature | None, approximation: Approximation, backend: str,
                 title: str, per_layer: tuple[Approximation, ...] | None = None) -> ModuleType:
    """The imported code of one linked pass over ``chain`` (:func:`.network_plan.link`), generated into
    the cache on first use."""
    mode = "gradients" if curvature is None else f"{curvature.value}-{approximation.value}"
    if curvature is not None and per_layer:  # auto's choice, layer by layer
        mode += "-" + hashlib.sha256(repr([a.value for a in per_layer]).encode()).hexdigest()[:12]
    key = "-".join(part[:16] for part in (chain.key(), template_hash(backend), compiler_hash()))
    path = cache_directory() / "networks" / key / f"{backend}-{mode}.py"
    if not path.exists():
        params = [name for layer in chain.layers for name in layer.params.values()]
        program = link(chain, curvature, approximation, per_layer)
        write_atomic(path, render_network(program, backend, title, params, curvature, approximation))
    return import_code(path)
