"""`mcalc generate`: render modules to code files with a manifest."""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from .. import __version__
from ..calculus.derivation import Derivation
from ..errors import McalcError
from ..files import write_atomic
from ..module import Module
from ..runtime.generated_code import content_hash, read_manifest
from .manifest import source_hash, write_manifest
from .plan import plan_module, sanitise
from .render import render_module, template_hash

BACKENDS = ("numpy", "cupy")
HEADERS = {"numpy": "import numpy as xp", "cupy": "import cupy as xp"}


def render(module: Module, backend: str) -> str:
    """The generated source of one module for one backend."""
    if backend not in BACKENDS:
        raise McalcError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "cupy":
        from .cuda import render_cupy_module

        return render_cupy_module(plan_module(Derivation(module)))
    return render_module(plan_module(Derivation(module)), backend, HEADERS[backend])


def entry_name(module: Module, backend: str) -> str:
    """The file of ``module``'s code for ``backend``, relative to its folder."""
    return f"{backend}/{sanitise(module.name)}.py"


def generate(modules: Iterable[Module], backends: Iterable[str], directory: Path,
             progress: bool = False) -> list[Path]:
    """Render every module for every backend into ``directory`` and record them in its manifest."""
    modules, backends = list(modules), list(backends)
    jobs = [(m, b) for b in backends for m in modules]
    if progress:
        from tqdm import tqdm

        jobs = tqdm(jobs, desc="generate", unit="module", leave=False)
    manifest = read_manifest(directory)
    manifest["mcalc_version"] = __version__
    entries = manifest.setdefault("entries", {})
    written = []
    for m, backend in jobs:
        text = render(m, backend)
        name = entry_name(m, backend)
        write_atomic(directory / name, text)
        entries[name] = {
            "module": m.name,
            "backend": backend,
            "mcalc_version": __version__,
            "source_hash": source_hash(m),
            "template_hash": template_hash(backend),
            "content_hash": content_hash(text),
        }
        written.append(directory / name)
    write_manifest(directory, manifest)  # last: the files it names are complete
    return written
