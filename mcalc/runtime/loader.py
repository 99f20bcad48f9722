"""Loading generated code at run time, refusing stale or corrupted entries."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

from .. import __version__
from ..codegen.generate import DEFAULT_DIRECTORY, entry_name, generate
from ..codegen.manifest import compiler_hash, content_hash, read_manifest, source_hash
from ..codegen.render import template_hash
from ..errors import McalcError
from ..module import Module


def cache_directory() -> Path:
    """Where user modules' generated code is cached (keyed by their hashes)."""
    root = os.environ.get("MCALC_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mcalc")
    return Path(root)


def check_entry(directory: Path, module: Module, backend: str) -> Path:
    """The path of a valid generated entry; a clear error saying how to regenerate otherwise."""
    name = entry_name(module, backend)
    path = directory / name
    hint = f"regenerate it with `mcalc generate --target {backend} --out {directory}`"
    entry = read_manifest(directory).get("entries", {}).get(name)
    if entry is None or not path.exists():
        raise McalcError(f"{path}: no generated code for module '{module.name}' ({backend}); {hint}")
    if content_hash(path.read_text(encoding="utf-8")) != entry["content_hash"]:
        raise McalcError(f"{path}: corrupted (its content does not match the manifest); {hint}")
    stale = [what for what, now in (("mcalc version", __version__), ("module declaration", source_hash(module)),
                                    ("templates", template_hash(backend)))
             if entry.get({"mcalc version": "mcalc_version", "module declaration": "source_hash",
                           "templates": "template_hash"}[what]) != now]
    if stale:
        raise McalcError(f"{path}: stale ({', '.join(stale)} changed since it was generated); {hint}")
    return path


def _import(path: Path, key: str) -> ModuleType:
    name = f"_mcalc_generated_{key}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module


def load(module: Module, backend: str = "auto", directory: Path | None = None) -> ModuleType:
    """The generated code of ``module``: from ``generated/`` for the library, else from the cache
    (keyed by the module's declaration, the templates and mcalc's own source).

    ``backend='auto'`` takes CuPy when a GPU is usable, NumPy otherwise.
    """
    if backend == "auto":
        from .backends import gpu_available

        backend = "cupy" if gpu_available() else "numpy"
    from ..layers import LIBRARY

    if directory is None and any(module is m for m in LIBRARY):
        directory = DEFAULT_DIRECTORY
    if directory is None:  # a user module: generate on first use, keyed by its hashes
        key = (source_hash(module), template_hash(backend), compiler_hash())
        directory = cache_directory() / "-".join(part[:16] for part in key)
        if not (directory / entry_name(module, backend)).exists():
            generate([module], [backend], directory)
    path = check_entry(directory, module, backend)
    return _import(path, f"{backend}_{content_hash(path.read_text(encoding='utf-8'))[:16]}")
