"""A product of structured factors, multiplied in the order that costs least for the sizes it meets.

A per-sample program (a batch mean with no closed form) multiplies chains such as attention's

    (X ⊗ K X) diag(vec S) (I_T ⊗ Xᵀ Vᵀ) 𝓗z (I_T ⊗ V X) diag(vec S) (Xᵀ ⊗ Xᵀ Kᵀ)

over a stack of samples. Multiplied from 𝓗z outward, as the printer's sandwich order does, every
intermediate is T² × T² (the softmax's space); which order is cheapest depends on T² against h·d and m·T,
sizes the generated code meets only at run time. So it hands the factors to :func:`chain_product`, which
picks the order by dynamic programming over the chain (the matrix-chain order: Cormen et al.,
*Introduction to Algorithms*, 3rd ed., §15.2; ``numpy.linalg.multi_dot`` does it for dense matrices),
counting a Kronecker product as applied by :func:`.array_ops.kron_matmul`, a diagonal as a scaling and a
commutation matrix as a permutation, each formed only where the other side is structured too. A run of
block-diagonal factors with as many blocks (I_T ⊗ B, and a diagonal between two of them) is multiplied
block by block (:class:`BlockDiagonal`): (I_T ⊗ Xᵀ Kᵀ Q) diag(vec S) (I_T ⊗ 1 1ᵀ) diag(vec S) (I_T ⊗ Xᵀ Kᵀ Q),
one of attention's chains, is T products of blocks instead of products through the T² space.

That order can only apply or form each factor. Wherever the factors' splits of the spaces between them
agree, a chain is instead one tensor network (:mod:`.tensor_network`), in which identities and
permutations are shared indices and 1 1ᵀ is two sums: (I_T ⊗ A) diag(vec S) K_{T,T} (I_T ⊗ B) costs its
T² d² entries, not products through the T² space. The matrix-chain order serves the chains whose splits
disagree. :func:`chain_mean` sums the samples inside the contraction, for a per-sample program whose mean
is taken chain by chain (:mod:`mcalc.codegen.batch_means`).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

from .array_ops import (
    batch_mean,
    check_intermediate,
    check_stack,
    commutation,
    kron_matmul,
    kron_product,
    matmul_kron,
    transpose,
)
from .blocks import namespace
from .cuda_graph import matmul
from .tensor_network import compile_chain, contract, signature


@dataclass(frozen=True)
class KronFactor:
    """A ⊗ B, applied to what it multiplies; None is an identity, whose size follows from ``shape``, the
    (rows, cols) of A ⊗ B. Either factor may be a stack. ``ones`` says which of A and B is 1 1ᵀ (the
    softmax's), which the code generator knows: a tensor network sums over it, and never reads its values
    (on a GPU that would wait for the device)."""

    a: Any
    b: Any
    shape: tuple[int, int]
    ones: tuple[bool, bool] = (False, False)

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
        (a_rows, _), (b_rows, _) = self.factor_shapes()
        some = self.a if self.a is not None else self.b
        xp = namespace(some)
        a = self.a if self.a is not None else xp.eye(a_rows, dtype=some.dtype)
        b = self.b if self.b is not None else xp.eye(b_rows, dtype=some.dtype)
        return kron_product(a, b)


@dataclass(frozen=True)
class DiagonalFactor:
    """diag(v) of a column v (n, 1), or of each column of a stack (…, n, 1)."""

    v: Any


@dataclass(frozen=True)
class CommutationFactor:
    """K_{m,n}, K vec(A) = vec(Aᵀ) for A of shape (m, n) (M&N 3.7): a permutation, applied as one, never
    formed unless the other side is structured too."""

    m: int
    n: int

    def apply_left(self, x: Any) -> Any:
        """K X: row i·n + j of the result is row j·m + i of X."""
        lead, cols = x.shape[:-2], x.shape[-1]
        return x.reshape(lead + (self.n, self.m, cols)).swapaxes(-3, -2).reshape(lead + (self.m * self.n, cols))

    def apply_right(self, x: Any) -> Any:
        """X K = (K_{n,m} Xᵀ)ᵀ, since K_{m,n}ᵀ = K_{n,m}."""
        return transpose(CommutationFactor(self.n, self.m).apply_left(transpose(x)))


@dataclass(frozen=True)
class BlockDiagonal:
    """blockdiag(B₁, …, B_T): ``blocks`` (…, T, r, c), or (…, 1, r, c) for T equal blocks (I_T ⊗ B), a product
    of block-diagonal factors kept as its blocks."""

    blocks: Any
    count: int

    @classmethod
    def of(cls, f: Any) -> BlockDiagonal:
        """A block-diagonal factor as its blocks: I_T ⊗ B, or itself."""
        if isinstance(f, KronFactor):
            return cls(f.b[..., None, :, :], f.shape[0] // f.b.shape[-2])
        return f

    def dense(self) -> Any:
        """The block-diagonal matrix formed, zeros off its blocks."""
        xp = namespace(self.blocks)
        blocks = xp.broadcast_to(self.blocks, self.blocks.shape[:-3] + (self.count,) + self.blocks.shape[-2:])
        (r, c), lead = blocks.shape[-2:], blocks.shape[:-3]
        out = xp.zeros(lead + (self.count, r, self.count, c), dtype=blocks.dtype)
        for t in range(self.count):  # one strided copy per block (T of them), never per sample
            out[..., t, :, t, :] = blocks[..., t, :, :]
        return out.reshape(lead + (self.count * r, self.count * c))


class Sketch(NamedTuple):
    """What the order's planner knows of a factor, or of a product of a run of factors."""

    kind: str  # 'dense', 'kron', 'diag' or 'perm'
    rows: int
    cols: int
    stack: int  # the samples it holds; 1 for a matrix the samples share
    # the multiplications per column (from the left) and per row (from the right) of what it is applied to
    apply_cost: tuple[int, int] = (0, 0)
    blocks: int = 0  # block-diagonal with this many equal-sized blocks (I_T ⊗ B, a product of such); 0: not
    distinct: bool = False  # whether its diagonal blocks differ (I_T ⊗ B's do not)

    def formed(self) -> Sketch:
        return Sketch("dense", self.rows, self.cols, self.stack)


# An elementwise pass (a scaling, a permutation's copy, a formed factor's entries) in multiplications of a
# matrix product, per entry: measured on the development machine, one BLAS thread, float64 stacks of 64
# samples, products took 0.04 ns a multiplication, a scaling 1.3–1.9 ns an entry, a permutation 0.6–0.9 ns.
PASS = 32


def _sketch(f: Any) -> Sketch:
    if isinstance(f, KronFactor):
        ((ar, ac), (br, bc)), stack = f.factor_shapes(), _stack(f.a, f.b)
        if f.b is None:  # (A ⊗ I) M: one product of A with M's reshape
            left, right = ar * ac * br, ar * ac * br
        elif f.a is None:  # (I ⊗ B) M: B times each block of M
            left, right = ac * br * bc, ar * br * bc
        else:  # B times each block, then A times the result's rows (kron_matmul)
            left, right = ac * br * bc + ar * ac * br, ar * br * bc + ar * ac * bc
        rows, cols = f.shape  # and the result's layout copied once
        blocks = rows // br if f.a is None else 0
        return Sketch("kron", rows, cols, stack, (left + PASS * rows, right + PASS * cols), blocks)
    if isinstance(f, BlockDiagonal):
        (r, c), count = f.blocks.shape[-2:], f.count
        per = f.blocks.shape[-3] == count and count > 1
        return Sketch("blocks", r * count, c * count, math.prod(f.blocks.shape[:-3]), (r * c * count, r * c * count),
                      count, per)
    if isinstance(f, DiagonalFactor):
        n = f.v.shape[-2]
        return Sketch("diag", n, n, _stack(f.v), (PASS * n, PASS * n))
    if isinstance(f, CommutationFactor):
        n = f.m * f.n
        return Sketch("perm", n, n, 1, (PASS * n, PASS * n))
    return Sketch("dense", f.shape[-2], f.shape[-1], _stack(f))


def _stack(*arrays: Any) -> int:
    return max((math.prod(a.shape[:-2]) for a in arrays if a is not None), default=1)


def _combine(left: Sketch, right: Sketch) -> tuple[int, str]:
    """The multiplications (or copies) of left · right, times the larger stack, and how it is done: a
    structured factor is applied to a matrix; of two structured ones, the cheaper to form is formed."""
    stack = max(left.stack, right.stack)
    if left.kind == right.kind == "dense":
        return stack * left.rows * left.cols * right.cols, "product"
    if right.kind == "dense":
        return stack * left.apply_cost[0] * right.cols, "apply left"
    if left.kind == "dense":
        return stack * right.apply_cost[1] * left.rows, "apply right"
    if left.kind == right.kind == "diag":
        return stack * PASS * left.rows, "diagonal"
    if _aligned(left, right):  # blockdiag(Aₜ) blockdiag(Bₜ) = blockdiag(Aₜ Bₜ): T products of blocks
        count = left.blocks
        times = count if left.distinct or right.distinct else 1
        return stack * times * (left.rows // count) * (left.cols // count) * (right.cols // count), "blocks"
    if left.kind == "diag" and right.blocks and right.rows % right.blocks == 0:
        return stack * PASS * right.rows * right.cols // right.blocks, "scale blocks"
    if right.kind == "diag" and left.blocks and left.cols % left.blocks == 0:
        return stack * PASS * left.rows * left.cols // left.blocks, "scale blocks"
    form_left = left.stack * PASS * left.rows * left.cols + _combine(left.formed(), right)[0]
    form_right = right.stack * PASS * right.rows * right.cols + _combine(left, right.formed())[0]
    return (form_left, "form left") if form_left <= form_right else (form_right, "form right")


def _aligned(left: Sketch, right: Sketch) -> bool:
    """Two block-diagonal factors with as many blocks, those of one as wide as the other's are high."""
    return bool(left.blocks) and left.blocks == right.blocks and "dense" not in (left.kind, right.kind)


def _product(left: Sketch, right: Sketch) -> Sketch:
    stack = max(left.stack, right.stack)
    if left.kind == right.kind == "diag":
        return left._replace(stack=stack)
    how = _combine(left, right)[1]
    if how in ("blocks", "scale blocks"):
        count = left.blocks or right.blocks
        distinct = how == "scale blocks" or left.distinct or right.distinct
        rows, cols = left.rows, right.cols
        return Sketch("blocks", rows, cols, stack, (rows * cols // count,) * 2, count, distinct)
    return Sketch("dense", left.rows, right.cols, stack)


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
    """F₁ F₂ … Fₙ of matrices (or stacks of them), :class:`KronFactor` s, :class:`DiagonalFactor` s and
    :class:`CommutationFactor` s: a tensor network's contraction (:mod:`.tensor_network`), or, where the
    factors' spaces do not align, multiplied in the order of least cost for their sizes (:func:`plan`); a
    matrix or stack. A resulting stack, or an array of the contraction, larger than
    :data:`.array_ops.STACK_LIMIT_BYTES` is refused before anything is computed
    (:func:`.array_ops.check_stack`, :func:`.array_ops.check_intermediate`)."""
    sketches = tuple(_sketch(f) for f in factors)
    like = _an_array(factors)  # the array type and dtype a formed factor takes
    samples = max(s.stack for s in sketches)
    if samples > 1:
        check_stack(samples, sketches[0].rows, sketches[-1].cols, like.dtype.itemsize)
    program = compile_chain(sig) if (sig := signature(factors)) is not None else None
    if program is not None:
        check_intermediate(program.largest, like.dtype.itemsize)
        return contract(program, factors, like)
    _, split = plan(sketches)

    def product(i: int, j: int) -> Any:
        if i == j:
            return factors[i]
        k = split[i, j]
        return _multiply(product(i, k), product(k + 1, j), like)

    return _formed(product(0, len(factors) - 1), like)


def chain_mean(*factors: Any) -> Any:
    """The mean over the samples of F₁ F₂ … Fₙ (:func:`chain_product`'s stack), its samples' index summed
    inside the tensor network's contraction, so that the stack of products is never formed; a chain the
    samples share, its product."""
    sig = signature(factors)
    program = compile_chain(sig, mean=True) if sig is not None else None
    if program is None:
        return batch_mean(chain_product(*factors))
    like = _an_array(factors)
    check_intermediate(program.largest, like.dtype.itemsize)
    total = contract(program, factors, like)
    return total / program.samples if program.samples > 1 else total


def _an_array(factors: tuple[Any, ...]) -> Any:
    for f in factors:
        arrays = (f.v,) if isinstance(f, DiagonalFactor) else (f.a, f.b) if isinstance(f, KronFactor) else \
            () if isinstance(f, CommutationFactor) else (f,)
        for array in arrays:
            if array is not None:
                return array
    raise ValueError("a chain of identities and permutations: nothing to take its type from")


def _formed(f: Any, like: Any) -> Any:
    if isinstance(f, KronFactor):
        return f.dense()
    if isinstance(f, DiagonalFactor):
        return namespace(f.v).eye(f.v.shape[-2], dtype=f.v.dtype) * f.v
    if isinstance(f, CommutationFactor):
        return commutation(f.m, f.n, namespace(like), like.dtype)
    if isinstance(f, BlockDiagonal):
        return f.dense()
    return f


def _multiply(left: Any, right: Any, like: Any) -> Any:
    """left · right as :func:`_combine` plans it."""
    how = _combine(_sketch(left), _sketch(right))[1]
    if how == "product":
        return matmul(left, right)
    if how == "apply left":
        if isinstance(left, KronFactor):
            return kron_matmul(left.a, left.b, right)
        if isinstance(left, BlockDiagonal):  # each block times its rows of the matrix
            lead, (r, c) = right.shape[:-2], left.blocks.shape[-2:]
            out = matmul(left.blocks, right.reshape(lead + (left.count, c, right.shape[-1])))
            return out.reshape(out.shape[:-3] + (left.count * r, right.shape[-1]))
        return left.v * right if isinstance(left, DiagonalFactor) else left.apply_left(right)
    if how == "apply right":
        if isinstance(right, KronFactor):
            return matmul_kron(left, right.a, right.b)
        if isinstance(right, BlockDiagonal):  # (blocksᵀ Mᵀ)ᵀ
            flipped = BlockDiagonal(transpose(right.blocks), right.count)
            return transpose(_multiply(flipped, transpose(left), like))
        return left * transpose(right.v) if isinstance(right, DiagonalFactor) else right.apply_right(left)
    if how == "blocks":
        a, b = BlockDiagonal.of(left), BlockDiagonal.of(right)
        return BlockDiagonal(matmul(a.blocks, b.blocks), a.count)
    if how == "scale blocks":
        if isinstance(left, DiagonalFactor):
            b = BlockDiagonal.of(right)
            return BlockDiagonal(left.v.reshape(left.v.shape[:-2] + (b.count, -1, 1)) * b.blocks, b.count)
        a = BlockDiagonal.of(left)
        return BlockDiagonal(a.blocks * transpose(right.v.reshape(right.v.shape[:-2] + (a.count, -1, 1))), a.count)
    if how == "diagonal":
        return DiagonalFactor(left.v * right.v)
    if how == "form left":
        return _multiply(_formed(left, like), right, like)
    return _multiply(left, _formed(right, like), like)
