"""A product of structured factors, multiplied in the order that costs least for the sizes it meets.

A per-sample program (a batch mean with no closed form) multiplies chains such as attention's

    (X ⊗ K X) diag(vec S) (I_T ⊗ Xᵀ Vᵀ) 𝓗z (I_T ⊗ V X) diag(vec S) (Xᵀ ⊗ Xᵀ Kᵀ)

over a stack of samples. Multiplied from 𝓗z outward, as the printer's sandwich order does, every
intermediate is T² × T² (the softmax's space); which order is cheapest depends on T² against h·d and m·T,
sizes the generated code meets only at run time. So it hands the factors to :func:`chain_product`, which
picks the order by dynamic programming over the chain (the matrix-chain order: Cormen et al.,
*Introduction to Algorithms*, 3rd ed., §15.2; ``numpy.linalg.multi_dot`` does it for dense matrices),
counting a Kronecker product as applied by :func:`.array_ops.kron_matmul` and a diagonal as a scaling,
and forming either only where the other side is one too.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

from .array_ops import check_stack, kron_matmul, kron_product, matmul_kron, transpose
from .blocks import namespace
from .cuda_graph import matmul


@dataclass(frozen=True)
class KronFactor:
    """A ⊗ B, applied to what it multiplies; None is an identity, whose size follows from ``shape``, the
    (rows, cols) of A ⊗ B. Either factor may be a stack."""

    a: Any
    b: Any
    shape: tuple[int, int]

    def factor_shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """The (rows, cols) of A and of B, an identity's inferred from the other's."""
        rows, cols = self.shape
        if self.a is None:
            b = tuple(self.b.shape[-2:])
            return (rows // b[0], cols // b[1]), b
        a = tuple(self.a.shape[-2:])
        return a, (tuple(self.b.shape[-2:]) if self.b is not None else (rows // a[0], cols // a[1]))

    def dense(self) -> Any:
        """A ⊗ B formed (M&N 2.2)."""
        (identity_a, _), (identity_b, _) = self.factor_shapes()
        some = self.a if self.a is not None else self.b
        xp = namespace(some)
        a = self.a if self.a is not None else xp.eye(identity_a, dtype=some.dtype)
        b = self.b if self.b is not None else xp.eye(identity_b, dtype=some.dtype)
        return kron_product(a, b)


@dataclass(frozen=True)
class DiagonalFactor:
    """diag(v) of a column v (n, 1), or of each column of a stack (…, n, 1)."""

    v: Any


class Sketch(NamedTuple):
    """What the order's planner knows of a factor, or of a product of a run of factors."""

    kind: str  # 'dense', 'kron' or 'diag'
    rows: int
    cols: int
    stack: int  # the samples it holds; 1 for a matrix the samples share
    kron_cost: tuple[int, int] = (0, 0)  # a Kronecker product's multiplications per column (row) it is applied to

    def formed(self) -> Sketch:
        return Sketch("dense", self.rows, self.cols, self.stack)


def _sketch(f: Any) -> Sketch:
    if isinstance(f, KronFactor):
        ((ar, ac), (br, bc)), stack = f.factor_shapes(), _stack(f.a, f.b)
        if f.b is None:  # (A ⊗ I) M: one product of A with M's reshape
            left, right = ar * ac * br, ar * ac * br
        elif f.a is None:  # (I ⊗ B) M: B times each block of M
            left, right = ac * br * bc, ar * br * bc
        else:  # B times each block, then A times the result's rows (kron_matmul)
            left, right = ac * br * bc + ar * ac * br, ar * br * bc + ar * ac * bc
        return Sketch("kron", *f.shape, stack, (left, right))
    if isinstance(f, DiagonalFactor):
        return Sketch("diag", f.v.shape[-2], f.v.shape[-2], _stack(f.v))
    return Sketch("dense", f.shape[-2], f.shape[-1], _stack(f))


def _stack(*arrays: Any) -> int:
    return max((math.prod(a.shape[:-2]) for a in arrays if a is not None), default=1)


def _combine(left: Sketch, right: Sketch) -> tuple[int, str]:
    """The multiplications of left · right (times the larger stack) and how it is done."""
    stack, size = max(left.stack, right.stack), left.rows * right.cols
    kinds = (left.kind, right.kind)
    if kinds == ("dense", "dense"):
        return stack * left.rows * left.cols * right.cols, "product"
    if kinds == ("kron", "dense"):
        return stack * left.kron_cost[0] * right.cols, "apply left"
    if kinds == ("dense", "kron"):
        return stack * right.kron_cost[1] * left.rows, "apply right"
    if kinds == ("diag", "diag"):
        return stack * left.rows, "diagonal"
    if "kron" in kinds and "diag" in kinds:  # the Kronecker product formed, then scaled
        return 2 * stack * size, "scale rows" if left.kind == "diag" else "scale columns"
    if left.kind == "diag":
        return stack * size, "scale rows"
    if right.kind == "diag":
        return stack * size, "scale columns"
    # two Kronecker products: the one cheaper to form is formed, the other applied to it
    form_left = left.stack * left.rows * left.cols + _combine(left.formed(), right)[0]
    form_right = right.stack * right.rows * right.cols + _combine(left, right.formed())[0]
    return (form_left, "form left") if form_left <= form_right else (form_right, "form right")


def _product(left: Sketch, right: Sketch) -> Sketch:
    kind = "diag" if left.kind == right.kind == "diag" else "dense"
    return Sketch(kind, left.rows, right.cols, max(left.stack, right.stack))


@functools.lru_cache(maxsize=1024)
def plan(sketches: tuple[Sketch, ...]) -> tuple[int, dict[tuple[int, int], int]]:
    """The least cost of the chain and, for every run i…j of it, the k where its product splits into
    (i…k)(k+1…j)."""
    n = len(sketches)
    best: dict[tuple[int, int], tuple[int, Sketch]] = {(i, i): (0, s) for i, s in enumerate(sketches)}
    split: dict[tuple[int, int], int] = {}
    for length in range(2, n + 1):
        for i in range(n - length + 1):
            j = i + length - 1
            choices = []
            for k in range(i, j):
                (left_cost, left), (right_cost, right) = best[i, k], best[k + 1, j]
                choices.append((left_cost + right_cost + _combine(left, right)[0], k, _product(left, right)))
            cost, k, sketch = min(choices, key=lambda choice: choice[:2])
            best[i, j], split[i, j] = (cost, sketch), k
    return best[0, n - 1][0], split


def chain_product(*factors: Any) -> Any:
    """F₁ F₂ … Fₙ of matrices (or stacks of them), :class:`KronFactor` s and :class:`DiagonalFactor` s,
    multiplied in the order of least cost for their sizes (:func:`plan`); a matrix or stack. A stack larger
    than :data:`.array_ops.STACK_LIMIT_BYTES` is refused before it is made (:func:`.array_ops.check_stack`)."""
    sketches = tuple(_sketch(f) for f in factors)
    samples = max(s.stack for s in sketches)
    if samples > 1:
        check_stack(samples, sketches[0].rows, sketches[-1].cols, _dtype(factors).itemsize)
    _, split = plan(sketches)

    def product(i: int, j: int) -> Any:
        if i == j:
            return factors[i]
        k = split[i, j]
        return _multiply(product(i, k), product(k + 1, j))

    return _dense(product(0, len(factors) - 1))


def _dtype(factors: tuple[Any, ...]) -> Any:
    for f in factors:
        array = f.v if isinstance(f, DiagonalFactor) else next(
            (x for x in (f.a, f.b) if x is not None), None) if isinstance(f, KronFactor) else f
        if array is not None:
            return array.dtype
    raise ValueError("a chain of identities")


def _dense(f: Any) -> Any:
    if isinstance(f, KronFactor):
        return f.dense()
    if isinstance(f, DiagonalFactor):
        return namespace(f.v).eye(f.v.shape[-2], dtype=f.v.dtype) * f.v
    return f


def _multiply(left: Any, right: Any) -> Any:
    """left · right as :func:`_combine` plans it."""
    how = _combine(_sketch(left), _sketch(right))[1]
    if how == "product":
        return matmul(left, right)
    if how == "apply left":
        return kron_matmul(left.a, left.b, right)
    if how == "apply right":
        return matmul_kron(left, right.a, right.b)
    if how == "diagonal":
        return DiagonalFactor(left.v * right.v)
    if how == "scale rows":
        return left.v * _dense(right)
    if how == "scale columns":
        return _dense(left) * transpose(right.v)
    if how == "form left":
        return _multiply(left.dense(), right)
    return _multiply(left, right.dense())
