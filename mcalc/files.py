"""Writing files whole or not at all (generated code, manifests, checkpoints, results, plots)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, content: str | bytes) -> None:
    """Write ``content`` (text, or bytes as they are) to ``path`` through a temporary file and a
    rename: never half-written; its mode follows the umask, as a plain ``open`` would."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)  # as open() would make it (mkstemp's own mode is 0600)
        with (os.fdopen(fd, "wb") if isinstance(content, bytes)
              else os.fdopen(fd, "w", encoding="utf-8", newline="\n")) as f:
            f.write(content)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
