"""Where the top-level ``templates/`` and ``generated/`` folders are: beside the package in a
source checkout (an editable install), or under ``share/mcalc/`` of the prefix a wheel was
installed into (setup.cfg's data_files)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def project_folder(name: str) -> Path:
    """The folder ``name`` (``templates`` or ``generated``) this installation of mcalc uses."""
    checkout = _PACKAGE.parent / name
    prefixes = [Path(sys.prefix)]
    if len(_PACKAGE.parents) > 3:  # PREFIX/lib/pythonX.Y/site-packages/mcalc: an install with --prefix
        prefixes.insert(0, _PACKAGE.parents[3])
    candidates = [checkout, *(prefix / "share" / "mcalc" / name for prefix in prefixes)]
    return next((path for path in candidates if path.is_dir()), checkout)


def cache_directory() -> Path:
    """Where user modules' generated code, simplified derivatives and the emulator's compiled
    kernels are cached (``$MCALC_CACHE``, else ``~/.cache/mcalc``)."""
    root = os.environ.get("MCALC_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mcalc")
    return Path(root)
