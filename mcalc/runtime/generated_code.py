"""Generated code at run time: the files a manifest names, checked against it and imported by path.

The runtime neither derives nor renders, so it needs neither SymPy nor Jinja2: it reads a folder's
``manifest.json``, refuses a file whose content no longer matches its entry, and imports it. Whether
an entry is *stale* (its declaration, the templates or mcalc changed since) is the compiler's
question, answered by :mod:`mcalc.codegen.store`, which also generates what is missing; the
library's own ``generated/`` is checked against its declarations by the test suite.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import McalcError
from ..locations import project_folder

MANIFEST = "manifest.json"
LIBRARY_DIRECTORY = project_folder("generated")  # the built-in library's code, committed
# what a network reads in a module's cache for the batch: the patches of its per-sample input, unfold(X),
# which a convolution's generated forward pass makes (and K-FAC's factors need again)
PATCHES_KEY = "patches"


def content_hash(text: str) -> str:
    """The hash a manifest entry records of its file's text."""
    return hashlib.sha256(text.encode()).hexdigest()


def read_manifest(directory: Path) -> dict[str, Any]:
    """The manifest of ``directory`` (an empty one where there is none)."""
    path = directory / MANIFEST
    if not path.exists():
        return {"entries": {}}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise McalcError(f"{path}: corrupted manifest ({exc}); regenerate with `mcalc generate`") from None


def regenerate_hint(directory: Path, backend: str) -> str:
    return f"regenerate it with `mcalc generate --target {backend} --out {directory}`"


def checked_entry(directory: Path, module: str, backend: str) -> tuple[Path, dict[str, Any]]:
    """The file holding module ``module``'s code for ``backend`` in ``directory`` and its manifest entry;
    a clear error when there is none or its content does not match the manifest."""
    entries = read_manifest(directory).get("entries", {})
    name, entry = next(((n, e) for n, e in entries.items()
                        if e.get("module") == module and e.get("backend") == backend), (None, None))
    hint = regenerate_hint(directory, backend)
    if name is None or not (directory / name).exists():
        raise McalcError(f"{directory}: no generated code for module '{module}' ({backend}); {hint}")
    path = directory / name
    if content_hash(path.read_text(encoding="utf-8")) != entry["content_hash"]:
        raise McalcError(f"{path}: corrupted (its content does not match the manifest); {hint}")
    return path, entry


def import_code(path: Path) -> ModuleType:
    """Import a generated file, once per content (two files with the same text share one module)."""
    key = content_hash(path.read_text(encoding="utf-8"))[:16]
    name = f"_mcalc_generated_{key}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module


def resolve_backend(backend: str) -> str:
    """``'auto'``: CuPy when a GPU is usable, NumPy otherwise; any other name as it is."""
    if backend != "auto":
        return backend
    from .backends import gpu_available

    return "cupy" if gpu_available() else "numpy"


def library_code(module: str, backend: str = "auto") -> ModuleType:
    """The generated code of the built-in library module named ``module``, from ``generated/``."""
    backend = resolve_backend(backend)
    return import_code(checked_entry(LIBRARY_DIRECTORY, module, backend)[0])
