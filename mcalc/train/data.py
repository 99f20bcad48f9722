"""Data sets: scikit-learn's bundled digits (offline), MNIST IDX files, CIFAR-10 python batches, .npz files."""
from __future__ import annotations

import gzip
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import McalcError


@dataclass
class Dataset:
    """Features one sample per row (scaled to [0, 1]) and integer labels."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1

    @property
    def features(self) -> int:
        return self.x_train.shape[1]


def digits(seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """The 1797 8×8 handwritten digits bundled with scikit-learn, a stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        data.data / 16.0, data.target, test_size=test_fraction, random_state=seed, stratify=data.target)
    return Dataset("digits", x_train, y_train, x_test, y_test)


def _open(path: Path) -> bytes:
    if not path.exists():
        raise McalcError(f"{path}: no such file")
    raw = path.read_bytes()
    return gzip.decompress(raw) if path.suffix == ".gz" else raw


def read_idx(path: Path) -> np.ndarray:
    """One IDX file (unsigned bytes), as MNIST ships them."""
    raw = _open(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise McalcError(f"{path}: not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise McalcError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    size = int(np.prod(shape))
    if len(raw) - header != size:
        raise McalcError(f"{path}: IDX header says {size} values, the file holds {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find(folder: Path, stem: str) -> Path:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    raise McalcError(f"{folder}: missing {stem} (or {stem}.gz)")


def mnist(folder: str | Path) -> Dataset:
    """MNIST from its four IDX files in ``folder``."""
    folder = Path(folder)
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(_find(folder, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find(folder, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise McalcError(f"{folder}: {prefix} images {images.shape} and labels {labels.shape} do not match")
        parts[split] = (images.reshape(len(images), -1) / 255.0, labels.astype(np.int64))
    return Dataset("mnist", *parts["train"], *parts["test"])


def cifar10(folder: str | Path) -> Dataset:
    """CIFAR-10 from its python batches (data_batch_1…5, test_batch) in ``folder``."""
    folder = Path(folder)

    def batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
        try:
            entry = pickle.loads(_open(path), encoding="bytes")
            data, labels = entry[b"data"], entry[b"labels"]
        except (pickle.UnpicklingError, KeyError, EOFError, TypeError) as exc:
            raise McalcError(f"{path}: not a CIFAR-10 python batch ({type(exc).__name__})") from None
        data = np.asarray(data)
        if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
            raise McalcError(f"{path}: expected (N, 3072) data with N labels, got {data.shape}")
        return data / 255.0, np.asarray(labels, dtype=np.int64)

    train = [batch(p) for p in sorted(folder.glob("data_batch_*")) if not p.name.endswith(".meta")]
    if not train:
        raise McalcError(f"{folder}: no data_batch_* files")
    x_test, y_test = batch(_find(folder, "test_batch"))
    return Dataset("cifar10", np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]),
                   x_test, y_test)


def npz(path: str | Path) -> Dataset:
    """A .npz file with x_train, y_train, x_test, y_test."""
    path = Path(path)
    if not path.exists():
        raise McalcError(f"{path}: no such file")
    try:
        with np.load(path) as f:
            arrays = [np.asarray(f[k]) for k in ("x_train", "y_train", "x_test", "y_test")]
    except (KeyError, ValueError, OSError) as exc:
        raise McalcError(f"{path}: expected a .npz with x_train, y_train, x_test, y_test ({exc})") from None
    x_train, y_train, x_test, y_test = arrays
    if x_train.ndim != 2 or len(x_train) != len(y_train) or x_test.shape[1:] != x_train.shape[1:]:
        raise McalcError(f"{path}: shapes do not fit: x_train {x_train.shape}, y_train {y_train.shape}, "
                         f"x_test {x_test.shape}")
    return Dataset(path.stem, x_train.astype(float), y_train.astype(np.int64), x_test.astype(float),
                   y_test.astype(np.int64))


def load(spec: str, seed: int = 0, folder: str | None = None) -> Dataset:
    """``digits``, ``mnist`` / ``cifar10`` (files in ``folder``, or ``mnist:FOLDER``) or a .npz FILE."""
    if spec == "digits":
        return digits(seed)
    kind, _, where = spec.partition(":")
    where = where or folder or ""
    if kind == "mnist" and where:
        return mnist(where)
    if kind == "cifar10" and where:
        return cifar10(where)
    if spec.endswith(".npz"):
        return npz(spec)
    if kind in ("mnist", "cifar10"):
        raise McalcError(f"--data {kind} needs the folder of its files: --data-dir FOLDER")
    raise McalcError(f"unknown data '{spec}': use digits, mnist, cifar10 (with --data-dir) or a FILE.npz")
