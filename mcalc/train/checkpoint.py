"""Checkpoints as data: every array in a NumPy ``.npz``, everything else one JSON document inside it.

Nothing in a checkpoint is code, so loading one passed between people runs nothing (``np.load`` with
``allow_pickle=False``). A run's state is a tree of plain values, arrays (NumPy or CuPy), lists, tuples,
dicts with any keys, random generators, and objects of the classes in :data:`CLASSES` (the optimisers
and what they hold), each object stored as its class name and its attributes. A class not in the table,
an old pickled checkpoint, another version or a damaged file is refused with a clear error.
"""
from __future__ import annotations

import dataclasses
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import McalcError
from ..files import write_atomic

FORMAT, VERSION = "mcalc-checkpoint", 1


def _classes() -> dict[str, type]:
    """The classes a checkpoint may hold, by name (imported here: the optimisers import the trainer)."""
    from ..runtime.blocks import CurvatureBlock, Eigenbasis, GramFactor
    from .block_solvers import BlockSolveState, DampedBlockSolver
    from .hessian_free import HessianFree
    from .optimizers import KBFGS, KFAC, SGD, Adam, HBPNewton

    table = {c.__name__: c for c in (SGD, Adam, HBPNewton, KFAC, KBFGS, HessianFree, DampedBlockSolver,
                                     BlockSolveState, Eigenbasis, CurvatureBlock, GramFactor)}
    return {**table, "Gram": GramFactor}  # its name in checkpoints written before it was renamed


class _Encoder:
    """Turns a state tree into JSON-able values, collecting its arrays."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}
        self.classes = _classes()

    def __call__(self, value: Any) -> Any:
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.random.Generator):
            return {"__generator__": value.bit_generator.state}
        if hasattr(value, "__array__") and hasattr(value, "shape"):  # NumPy, or CuPy on the device
            key = f"a{len(self.arrays)}"
            device = type(value).__module__.split(".")[0] == "cupy"
            self.arrays[key] = value.get() if device else np.asarray(value)
            return {"__array__": key, "cupy": device}
        if isinstance(value, (list, tuple)):
            return {"__tuple__" if isinstance(value, tuple) else "__list__": [self(v) for v in value]}
        if isinstance(value, dict):
            return {"__dict__": [[self(k), self(v)] for k, v in value.items()]}
        name = type(value).__name__
        if self.classes.get(name) is type(value):
            return {"__object__": name, "attributes": {k: self(v) for k, v in vars(value).items()}}
        raise McalcError(f"a checkpoint cannot hold a {type(value).__module__}.{name}")


def _decode(value: Any, arrays: Any, classes: dict[str, type]) -> Any:
    if not isinstance(value, dict):
        return value
    if "__array__" in value:
        array = arrays[value["__array__"]]
        if value.get("cupy"):
            import cupy

            return cupy.asarray(array)
        return array
    if "__list__" in value:
        return [_decode(v, arrays, classes) for v in value["__list__"]]
    if "__tuple__" in value:
        return tuple(_decode(v, arrays, classes) for v in value["__tuple__"])
    if "__dict__" in value:
        return {_freeze(_decode(k, arrays, classes)): _decode(v, arrays, classes) for k, v in value["__dict__"]}
    if "__generator__" in value:
        generator = np.random.default_rng()
        generator.bit_generator.state = value["__generator__"]
        return generator
    if "__object__" in value:
        cls = classes.get(value["__object__"])
        if cls is None:
            raise McalcError(f"it holds a '{value['__object__']}', which no mcalc checkpoint holds")
        obj = cls.__new__(cls)
        # a field added since the checkpoint was written starts at its default, or where the default changed
        # the algorithm, at what the saved run did (the class's SAVED_BEFORE)
        vars(obj).update({**_defaults(cls), **getattr(cls, "SAVED_BEFORE", {})})
        vars(obj).update({k: _decode(v, arrays, classes) for k, v in value["attributes"].items()})
        return obj
    raise McalcError(f"it holds an entry of unknown kind ({sorted(value)})")


def _defaults(cls: type) -> dict[str, Any]:
    """The default of every field of a dataclass that has one."""
    if not dataclasses.is_dataclass(cls):
        return {}
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _freeze(key: Any) -> Any:
    """A decoded dict key as it was: tuples stay tuples (JSON has lists only)."""
    return tuple(_freeze(k) for k in key) if isinstance(key, (list, tuple)) else key


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Everything needed to continue a run, written atomically as data (see the module docstring)."""
    encode = _Encoder()
    document = json.dumps({"format": FORMAT, "version": VERSION, "state": encode(state)})
    buffer = io.BytesIO()
    np.savez(buffer, state=np.array(document), **encode.arrays)
    write_atomic(Path(path), buffer.getvalue())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A run saved by :func:`save_checkpoint`; refuses anything else with an :class:`McalcError`."""
    path = Path(path)
    if not path.exists():
        raise McalcError(f"{path}: no such checkpoint")
    try:
        with np.load(path, allow_pickle=False) as archive:
            document = json.loads(str(archive["state"]))
            if document.get("format") != FORMAT:
                raise McalcError("it is not in mcalc's checkpoint format")
            if document.get("version") != VERSION:
                raise McalcError(f"it is version {document.get('version')}; this mcalc reads version {VERSION}")
            arrays = {k: archive[k] for k in archive.files if k != "state"}
        state = _decode(document["state"], arrays, _classes())
        _ = state["epoch"], state["params"], state["optimizer"], state["rng"], state["history"]
    except McalcError as exc:
        raise McalcError(f"{path}: not an mcalc checkpoint: {exc}") from None
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        raise McalcError(f"{path}: not an mcalc checkpoint ({type(exc).__name__}; checkpoints of mcalc "
                         "before version 1 of the format were pickles and cannot be read)") from None
    return state
