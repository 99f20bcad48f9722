"""The manifest of generated code: what each file was generated from, and atomic writes.

An entry records the mcalc version, a hash of the module's declaration, a hash
of the backend's templates and a hash of the file's content; the loader
refuses an entry whose file or inputs no longer match.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import sympy as sp

from ..expr import Expr
from ..functions import ElementwiseFunction
from ..module import Module

MANIFEST = "manifest.json"


def _canonical(value: Any) -> str:
    if isinstance(value, Expr):
        return f"{type(value).__name__}({','.join(_canonical(a) for a in value.args)})"
    if isinstance(value, ElementwiseFunction):
        return f"fn[{value._key!r}]"
    if isinstance(value, sp.Basic):
        return sp.srepr(value)
    if isinstance(value, tuple):
        return "(" + ",".join(_canonical(v) for v in value) + ")"
    return repr(value)


def source_hash(module: Module) -> str:
    """A hash of everything the generated code of ``module`` depends on in its declaration."""
    parts = [module.name, _canonical(module.output)]
    for role, group in (("in", module.inputs), ("param", module.params), ("const", module.constants)):
        parts += [f"{role}:{_canonical(s)}" for s in group]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def write_atomic(path: Path, content: str | bytes) -> None:
    """Write ``content`` (text, or bytes as they are) to ``path`` through a temporary file and a
    rename: never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with (os.fdopen(fd, "wb") if isinstance(content, bytes)
              else os.fdopen(fd, "w", encoding="utf-8", newline="\n")) as f:
            f.write(content)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    if not path.exists():
        return {"entries": {}}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        from ..errors import McalcError

        raise McalcError(f"{path}: corrupted manifest ({exc}); regenerate with `mcalc generate`") from None
    return data


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    write_atomic(directory / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
