"""Loading a user's FILE.py: its top-level ``mc.Module`` objects are the modules."""
from __future__ import annotations

import importlib.util
import sys
import traceback
import uuid
from pathlib import Path

from .errors import McalcError, ModuleFileError
from .module import Module


def load_modules(path: str | Path, name: str | None = None) -> list[Module]:
    """The modules defined at the top level of ``path`` (only ``name`` if given)."""
    path = Path(path)
    if not path.is_file():
        raise ModuleFileError(f"{path}: no such file")
    if path.suffix != ".py":
        raise ModuleFileError(f"{path}: expected a Python file (FILE.py)")
    module_name = f"_mcalc_user_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ModuleFileError(f"{path}: cannot be imported")
    namespace = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = namespace
    try:
        spec.loader.exec_module(namespace)
    except McalcError as exc:
        raise type(exc)(f"{path}: {exc}") from None
    except Exception as exc:  # the user's code failed: report where in it, briefly
        if isinstance(exc, SyntaxError):
            line = exc.lineno
        else:  # the innermost frame in the user's file, not mcalc's own
            frames = traceback.extract_tb(exc.__traceback__)
            line = next((f.lineno for f in reversed(frames) if Path(f.filename).resolve() == path.resolve()),
                        frames[-1].lineno)
        raise ModuleFileError(f"{path}: importing it failed at line {line}: {type(exc).__name__}: {exc}") from None
    finally:
        sys.modules.pop(module_name, None)
    found: dict[str, Module] = {}
    for value in vars(namespace).values():
        if isinstance(value, Module) and value.name not in found:
            found[value.name] = value
    if not found:
        raise ModuleFileError(f"{path}: defines no mc.Module at top level")
    if name is not None:
        if name not in found:
            raise ModuleFileError(f"{path}: no module named '{name}'; it defines {sorted(found)}")
        return [found[name]]
    return list(found.values())
