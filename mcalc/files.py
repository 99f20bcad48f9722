"""Writing files whole or not at all (generated code, manifests, checkpoints, results, plots)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import McalcError


def check_output(path: str | Path, option: str) -> None:
    """Refuse, before any work, an output path that cannot become a file: a folder, or a path through a file."""
    path = Path(path)
    if path.is_dir():
        raise McalcError(f"{option} {path}: is a folder; give a file name")
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise McalcError(f"{option} {path}: {parent} is a file, not a folder")


def write_atomic(path: Path, content: str | bytes) -> None:
    """Write ``content`` (text, or bytes as they are) to ``path`` through a temporary file and a
    rename: never half-written; its mode follows the umask, as a plain ``open`` would. A path that
    cannot be written is an :class:`McalcError` naming it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise McalcError(f"cannot write {path}: {exc.strerror or exc}") from None
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)  # as open() would make it (mkstemp's own mode is 0600)
        with (os.fdopen(fd, "wb") if isinstance(content, bytes)
              else os.fdopen(fd, "w", encoding="utf-8", newline="\n")) as f:
            f.write(content)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise McalcError(f"cannot write {path}: {exc.strerror or exc}") from None
        raise
