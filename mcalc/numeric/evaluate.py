"""Dense NumPy evaluation of any expression (the reference semantics of the IR).

Structured factors are materialised here, and only here: this is what a user
gets when they ask for a dense matrix. vec is column-stacking (Fortran order)
whatever NumPy's storage order.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import sympy as sp

from .. import dims
from ..errors import EvaluationError
from ..expr import BATCH, SAMPLES, Expr, Seed, Symbol, UnfoldSpec
from ..modes import Curvature, Projection


def vec(a: np.ndarray) -> np.ndarray:
    """Column-stacking vec of a 2-D array, as a 1-D array."""
    return np.asarray(a).reshape(-1, order="F")


def unvec(v: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The inverse of :func:`vec`."""
    return np.asarray(v).reshape(shape, order="F")


def commutation_matrix(m: int, n: int) -> np.ndarray:
    """K_{m,n} with K vec(A) = vec(Aᵀ) for A of shape (m, n): row i + n·j (entry (j, i) of Aᵀ, column
    major) takes column i + m·j (entry (i, j) of A). The oracle's own, not the runtime's it checks."""
    K = np.zeros((m * n, m * n))
    for i in range(m):
        for j in range(n):
            K[j + n * i, i + m * j] = 1.0
    return K


def psd_project(a: np.ndarray, projection: Projection | str) -> np.ndarray:
    """V f(Λ) Vᵀ of the symmetric part of ``a``: f = |·| (``abs``) or max(·, 0) (``clip``)."""
    w, v = np.linalg.eigh(0.5 * (a + a.T))
    cast = np.abs(w) if Projection.parse(projection) is Projection.ABS else np.maximum(w, 0.0)
    return (v * cast) @ v.T


def with_curvature(ggn: np.ndarray, second_order: np.ndarray, curvature: Curvature | str) -> np.ndarray:
    """(4a)/(4b) from the dense Gauss–Newton term and second-order term, in a curvature mode."""
    curvature = Curvature.parse(curvature)
    if curvature is Curvature.EXACT:
        return ggn + second_order
    if curvature is Curvature.GGN:
        return ggn
    return ggn + psd_project(second_order, curvature.projection)


def to_user_shape(a: np.ndarray, expr: Expr) -> np.ndarray:
    """(1, 1) → a 0-d float, (n, 1) → 1-D, else 2-D."""
    if expr.is_scalar:
        return np.float64(a[0, 0])
    if expr.is_vector:
        return a[:, 0].copy()
    return a


def as_matrix(value: Any, symbol: Symbol | Seed, what: str) -> np.ndarray:
    """A user's array as a finite 2-D float array with the symbol's orientation."""
    try:
        a = np.asarray(value, dtype=float)
    except (TypeError, ValueError) as exc:
        raise EvaluationError(f"{what}: value is not a numeric array ({exc})") from None
    if a.ndim == 0:
        a = a.reshape(1, 1)
    elif a.ndim == 1:
        a = a.reshape(-1, 1) if symbol.is_vector else a.reshape(1, -1)
    elif a.ndim != 2:
        raise EvaluationError(f"{what}: expected a 1-D or 2-D array, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise EvaluationError(f"{what}: value contains NaN or Inf")
    return a


def side_by_side(samples: np.ndarray) -> np.ndarray:
    """A batch (B, rows) of vectors or (B, rows, cols) of matrices as the samples side by side, (rows,
    B) or (rows, cols·B): the layout of a :class:`~mcalc.expr.Stacked` batch."""
    if samples.ndim == 2:
        return samples.T
    return np.concatenate(list(samples), axis=1)


class Evaluator:
    """Evaluates expressions under one set of values, memoising shared subexpressions."""

    def __init__(self, env: Mapping[str, np.ndarray], binding: Mapping[sp.Symbol, int],
                 seeds: Mapping[str, np.ndarray] | None = None,
                 stacked: Mapping[str, np.ndarray] | None = None) -> None:
        self.env = dict(env)
        self.binding = dict(binding)
        self.seeds = dict(seeds or {})
        self.stacked = dict(stacked or {})  # per-sample quantities over the batch, (rows, B)
        self._memo: dict[Expr, np.ndarray] = {}

    @classmethod
    def for_module(
        cls,
        module: Any,
        values: Mapping[str, Any],
        *,
        dz: Any = None,
        Hz: Any = None,
        seeds: Iterable[Seed] = (),
    ) -> Evaluator:
        """Bind a module's dimensions from ``values`` and check every shape."""
        if not isinstance(values, Mapping):
            raise EvaluationError(f"values for module '{module.name}' must be a mapping from symbol names to arrays")
        binding: dict[sp.Symbol, int] = {}
        env: dict[str, np.ndarray] = {}
        for s in module.symbols:
            if s.name not in values:
                raise EvaluationError(f"module '{module.name}': no value for symbol '{s.name}'")
            a = as_matrix(values[s.name], s, f"value of '{s.name}'")
            dims.bind(s.shape, a.shape, binding, what=f"value of '{s.name}' with shape {a.shape}")
            env[s.name] = a
        out_shape = tuple(dims.evaluate(d, binding) for d in module.output.shape)
        seed_values: dict[str, np.ndarray] = {}
        size = out_shape[0] * out_shape[1]
        for seed in seeds:
            given = dz if seed.kind == "dz" else Hz
            if given is None:
                continue
            a = np.asarray(given, dtype=float)
            if seed.kind == "dz":
                if a.size != size:
                    raise EvaluationError(f"dz: expected {size} entries (the size of z), got shape {a.shape}")
                a = unvec(a.reshape(-1) if a.ndim != 2 or a.shape != out_shape else vec(a), out_shape)
            elif a.shape != (size, size):
                raise EvaluationError(f"Hz: expected shape ({size}, {size}), got {a.shape}")
            if not np.all(np.isfinite(a)):
                raise EvaluationError(f"{seed.kind}: value contains NaN or Inf")
            seed_values[seed.kind] = a
        return cls(env, binding, seed_values)

    @classmethod
    def for_batch(
        cls,
        module: Any,
        shared: Mapping[str, Any],
        batch: Mapping[str, Any],
        *,
        dZ: Any = None,
        Hz: Any = None,
    ) -> Evaluator:
        """Values for batch rules: ``batch`` maps per-sample symbols to (B, …) arrays
        (sample i in row i, as PyTorch stores a batch), ``shared`` the parameters;
        ``dZ`` is (B, size z), ``Hz`` the (size z, size z) batch-averaged loss Hessian."""
        binding: dict[sp.Symbol, int] = {}
        env: dict[str, np.ndarray] = {}
        stacked: dict[str, np.ndarray] = {}
        sizes = {np.shape(v)[0] for v in batch.values()} | ({np.shape(dZ)[0]} if dZ is not None else set())
        if len(sizes) != 1:
            raise EvaluationError(f"batch arrays disagree on the batch size: {sorted(sizes)}")
        binding[BATCH] = binding[SAMPLES] = sizes.pop()  # one process: the batch mean is over B
        for s in module.symbols:
            if s.name in batch:
                a = np.asarray(batch[s.name], dtype=float)
                if a.ndim != (2 if s.is_vector else 3):
                    expected = f"(B, {s.rows})" if s.is_vector else f"(B, {s.rows}, {s.cols})"
                    raise EvaluationError(f"batch of '{s.name}': expected shape {expected}, got {a.shape}")
                dims.bind(s.shape, (a.shape[1], a.shape[2] if a.ndim == 3 else 1), binding,
                          what=f"batch of '{s.name}' with shape {a.shape}")
                stacked[s.name] = side_by_side(a)
            elif s.name in shared:
                a = as_matrix(shared[s.name], s, f"value of '{s.name}'")
                dims.bind(s.shape, a.shape, binding, what=f"value of '{s.name}' with shape {a.shape}")
                env[s.name] = a
            else:
                raise EvaluationError(f"module '{module.name}': no value for symbol '{s.name}'")
        seeds: dict[str, np.ndarray] = {}
        if dZ is not None:  # (B, size z): each row vec(δzᵢ)
            rows, cols = (dims.evaluate(d, binding) for d in module.output.shape)
            dZ = np.asarray(dZ, dtype=float).reshape(binding[BATCH], cols, rows)
            stacked["dz"] = side_by_side(dZ.transpose(0, 2, 1))
        if Hz is not None:
            seeds["Hz"] = np.asarray(Hz, dtype=float)
        return cls(env, binding, seeds, stacked)

    # ------------------------------------------------------------------
    def dim(self, d: sp.Expr) -> int:
        return dims.evaluate(d, self.binding)

    def value(self, expr: Expr) -> np.ndarray:
        """The dense value of ``expr`` as a 2-D array."""
        memo = self._memo
        if expr in memo:
            return memo[expr]
        method = getattr(self, f"_eval_{type(expr).__name__}")
        out = method(expr)
        memo[expr] = out
        return out

    def _eval_Symbol(self, e: Expr) -> np.ndarray:
        return self.env[e.args[0]]

    def _eval_Seed(self, e: Seed) -> np.ndarray:
        if e.kind not in self.seeds:
            name = "dz" if e.kind == "dz" else "Hz"
            raise EvaluationError(f"this rule needs {name}: pass {name}=... to evaluate it")
        return self.seeds[e.kind]

    def _eval_Identity(self, e: Expr) -> np.ndarray:
        return np.eye(self.dim(e.args[0]))

    def _eval_Zero(self, e: Expr) -> np.ndarray:
        return np.zeros((self.dim(e.args[0]), self.dim(e.args[1])))

    def _eval_Ones(self, e: Expr) -> np.ndarray:
        return np.ones((self.dim(e.args[0]), self.dim(e.args[1])))

    def _eval_Commutation(self, e: Expr) -> np.ndarray:
        return commutation_matrix(self.dim(e.args[0]), self.dim(e.args[1]))

    def _eval_MatMul(self, e: Expr) -> np.ndarray:
        return np.linalg.multi_dot([self.value(f) for f in e.args])

    def _eval_Add(self, e: Expr) -> np.ndarray:
        return sum(self.value(t) for t in e.args[1:]) + self.value(e.args[0])

    def _eval_ScalarMul(self, e: Expr) -> np.ndarray:
        c = float(e.args[0].xreplace(self.binding))
        return c * self.value(e.args[1])

    def _eval_ScaleBy(self, e: Expr) -> np.ndarray:
        return self.value(e.args[0])[0, 0] * self.value(e.args[1])

    def _eval_Hadamard(self, e: Expr) -> np.ndarray:
        return self.value(e.args[0]) * self.value(e.args[1])

    def _eval_Transpose(self, e: Expr) -> np.ndarray:
        return self.value(e.args[0]).T

    def _eval_Apply(self, e: Expr) -> np.ndarray:
        with np.errstate(all="ignore"):
            return e.args[0].numpy(self.value(e.args[1]))

    def _eval_Sum(self, e: Expr) -> np.ndarray:
        return np.sum(self.value(e.args[0])).reshape(1, 1)

    def _eval_Trace(self, e: Expr) -> np.ndarray:
        return np.trace(self.value(e.args[0])).reshape(1, 1)

    def _eval_Softmax(self, e: Expr) -> np.ndarray:
        x = self.value(e.args[0])
        p = np.exp(x - x.max(axis=0, keepdims=True))
        return p / p.sum(axis=0, keepdims=True)

    def _eval_LogSoftmax(self, e: Expr) -> np.ndarray:
        x = self.value(e.args[0])
        shifted = x - x.max(axis=0, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=0, keepdims=True))

    def _eval_Stacked(self, e: Expr) -> np.ndarray:
        leaf = e.args[0]
        key = leaf.kind if isinstance(leaf, Seed) else leaf.args[0]
        if key not in self.stacked:
            raise EvaluationError(f"no batch of values for '{key}'")
        return self.stacked[key]

    def _eval_SampleProduct(self, e: Expr) -> np.ndarray:
        m, v = self.value(e.args[0]), self.value(e.args[1])
        blocks = m.reshape(m.shape[0], self.dim(BATCH), v.shape[0])
        return side_by_side((blocks @ v).transpose(1, 0, 2))

    def _eval_SampleMatMul(self, e: Expr) -> np.ndarray:
        left, right = self.value(e.args[0]), self.value(e.args[1])
        pairs = zip(np.split(left, self.dim(BATCH), axis=1), np.split(right, self.dim(BATCH), axis=1))
        return np.concatenate([a @ b for a, b in pairs], axis=1)

    def _eval_SampleTranspose(self, e: Expr) -> np.ndarray:
        return np.concatenate([b.T for b in np.split(self.value(e.args[0]), self.dim(BATCH), axis=1)], axis=1)

    def _eval_VecOfSamples(self, e: Expr) -> np.ndarray:
        m = self.value(e.args[0])
        return np.stack([vec(block) for block in np.split(m, self.dim(BATCH), axis=1)], axis=1)

    def _eval_UnvecOfSamples(self, e: Expr) -> np.ndarray:
        m, rows = self.value(e.args[0]), self.dim(e.args[1])
        return np.concatenate([unvec(m[:, i], (rows, m.shape[0] // rows)) for i in range(m.shape[1])], axis=1)

    def _eval_RankSum(self, e: Expr) -> np.ndarray:
        return self.value(e.args[0])  # one process: this rank's sum is every rank's

    def _eval_BatchMean(self, e: Expr) -> np.ndarray:
        operand, leaves = e.args
        total = None
        size = self.dim(BATCH)
        for i in range(size):
            env, seeds = dict(self.env), dict(self.seeds)
            for leaf in leaves:
                c = self.dim(leaf.cols)  # sample i's columns of the samples side by side
                if isinstance(leaf, Seed):
                    seeds[leaf.kind] = self.stacked[leaf.kind][:, i * c : (i + 1) * c]
                else:
                    env[leaf.args[0]] = self.stacked[leaf.args[0]][:, i * c : (i + 1) * c]
            value = Evaluator(env, self.binding, seeds, self.stacked).value(operand)
            total = value if total is None else total + value
        return total / size

    def _eval_Inverse(self, e: Expr) -> np.ndarray:
        try:
            return np.linalg.inv(self.value(e.args[0]))
        except np.linalg.LinAlgError:
            raise EvaluationError(f"{e.args[0]!r} is singular at these values") from None

    def _eval_UnfoldMatrix(self, e: Expr) -> np.ndarray:
        spec, c, size = e.args
        return _unfold_matrix(spec, self.dim(c), tuple(self.dim(s) for s in size))

    def _per_block(self, a: np.ndarray, P: np.ndarray, length_in: int, rows_out: int) -> np.ndarray:
        """unvec(P vec(block)) for every block of ``length_in`` columns of ``a`` (samples side by side)."""
        blocks = np.split(a, a.shape[1] // length_in, axis=1)
        return np.concatenate([unvec(P @ vec(b), (rows_out, P.shape[0] // rows_out)) for b in blocks], axis=1)

    def _eval_Unfold(self, e: Expr) -> np.ndarray:
        x, spec, size = e.args
        size = tuple(self.dim(s) for s in size)
        P = _unfold_matrix(spec, self.dim(x.rows), size)
        return self._per_block(self.value(x), P, math.prod(size), self.dim(e.rows))

    def _eval_WindowArgmax(self, e: Expr) -> np.ndarray:
        u, spec, size = self.value(e.args[0]), e.args[1], tuple(self.dim(s) for s in e.args[2])
        kernel, positions = spec.taps, spec.positions(size)
        # the taps that read the input: P 1 of one channel, (taps × T); a padded tap is never the maximum
        reads = (_unfold_matrix(spec, 1, size).sum(axis=1) > 0).reshape((kernel, positions), order="F")
        reads = np.tile(reads, (1, u.shape[1] // positions))
        out = np.zeros_like(u)
        for window in range(u.shape[0] // kernel):
            rows = slice(window * kernel, (window + 1) * kernel)
            out[window * kernel + np.argmax(np.where(reads, u[rows], -np.inf), axis=0), np.arange(u.shape[1])] = 1.0
        return out

    def _eval_Fold(self, e: Expr) -> np.ndarray:
        u, spec, size = e.args
        size = tuple(self.dim(s) for s in size)
        P = _unfold_matrix(spec, self.dim(e.rows), size)
        return self._per_block(self.value(u), P.T, spec.positions(size), self.dim(e.rows))

    def _eval_BlockTrace(self, e: Expr) -> np.ndarray:
        m, blocks = self.value(e.args[0]), self.dim(e.args[1])
        rows, cols = m.shape[0] // blocks, m.shape[1] // blocks
        return sum(m[t * rows : (t + 1) * rows, t * cols : (t + 1) * cols] for t in range(blocks))

    def _eval_Kron(self, e: Expr) -> np.ndarray:
        return np.kron(self.value(e.args[0]), self.value(e.args[1]))

    def _eval_Gram(self, e: Expr) -> np.ndarray:
        p = self.value(e.args[0])
        return float(sp.sympify(e.scale).xreplace(self.binding)) * (p @ p.T)

    def _eval_Diag(self, e: Expr) -> np.ndarray:
        return np.diag(self.value(e.args[0])[:, 0])

    def _eval_Vec(self, e: Expr) -> np.ndarray:
        return vec(self.value(e.args[0])).reshape(-1, 1)

    def _eval_PSDProjection(self, e: Expr) -> np.ndarray:
        return psd_project(self.value(e.args[1]), e.args[0])


@functools.lru_cache(maxsize=64)
def _unfold_matrix(spec: UnfoldSpec, channels: int, size: tuple[int, ...]) -> np.ndarray:
    """P of unfold, read-only and kept: finite differences evaluate the same index map again and again."""
    rows = channels * spec.taps * spec.positions(size)
    out = np.zeros((rows, channels * math.prod(size)))
    for row, col in spec.matrix_ones(channels, size):
        out[row, col] = 1.0
    out.flags.writeable = False
    return out
