"""A chain of structured factors as one tensor network, contracted pair by pair in the order of least cost.

Every factor of a chain (:mod:`.chain`) acts between spaces that are products of smaller ones, and says
so through its structure: A ⊗ B maps (cols of A) × (cols of B) to (rows of A) × (rows of B), A's index the
slower (M&N 2.2); an identity factor of a Kronecker product passes its index through; diag(v) keeps its
index; the commutation matrix K_{m,n} swaps the two indices of vec A, A m × n (K vec A = vec Aᵀ, M&N 3.7);
a matrix joins its row index to its column index. Written with one label per index, the chain is one
einsum: an identity or a permutation is no operand, only a label two factors share; a diagonal is a label
three operands share; a Kronecker product is two operands, never formed. Where two neighbours split their
common space differently, both are refined to the common split (an index of size p·q is two of sizes p, q),
which exists when every cut of one split divides into the other's.

Attention's chains need this: (I_T ⊗ A) diag(vec S) K_{T,T} (I_T ⊗ B) is, per sample, Σ A_ik S_kt B_tc
over nothing but its own entries, T²d² products, where the matrix-chain order of :mod:`.chain`, which can
only apply or form each factor, multiplies through the T² space of the scores (T³d² and more).

The pairs are contracted in the order that dynamic programming over the chain's runs finds cheapest (the
matrix-chain order, Cormen et al. §15.2, with a pair's cost the product of the sizes of all the labels it
touches, as ``opt_einsum`` counts it); a pair that sums over a label is one batched matrix product
(the labels both keep, the samples among them, as its batch), one that does not is an elementwise product.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

from .blocks import namespace
from .cuda_graph import matmul

STACK = -1  # the label of the samples of a stack, shared by every per-sample operand and by the result


class _Spaces:
    """Labels with their sizes, joined (union-find) where two factors share an index, and refined into
    sub-labels where a neighbour splits a space finer."""

    def __init__(self) -> None:
        self.size: dict[int, int] = {}
        self.parent: dict[int, int] = {}
        self.parts: dict[int, list[int]] = {}

    def new(self, size: int) -> int:
        label = len(self.size)
        self.size[label], self.parent[label] = size, label
        return label

    def find(self, label: int) -> int:
        while self.parent[label] != label:
            label = self.parent[label]
        return label

    def leaves(self, labels: list[int]) -> list[int]:
        """The labels as they are now: joined, refined, and without those of size 1 (which index nothing)."""
        out = []
        for label in labels:
            root = self.find(label)
            if root in self.parts:
                out += self.leaves(self.parts[root])
            elif self.size[root] > 1:
                out.append(root)
        return out

    def align(self, left: list[int], right: list[int]) -> bool | None:
        """Makes one space's two splits (a factor's columns, its right neighbour's rows) the same labels;
        whether anything changed, or None where the splits have no common refinement."""
        lefts, rights = self.leaves(left), self.leaves(right)
        left_sizes, right_sizes = [self.size[a] for a in lefts], [self.size[b] for b in rights]
        if math.prod(left_sizes) != math.prod(right_sizes):
            return None
        if left_sizes == right_sizes:
            joined = [(a, b) for a, b in zip(lefts, rights) if a != b]
            for a, b in joined:
                self.parent[b] = a
            return bool(joined)
        cuts = sorted(set(_cuts(left_sizes)) | set(_cuts(right_sizes)))  # from the slowest index
        if any(b % a for a, b in zip([1, *cuts], cuts)):
            return None
        for labels, sizes in ((lefts, left_sizes), (rights, right_sizes)):
            start = 1
            for label, size in zip(labels, sizes):
                inside = [c for c in cuts if start < c <= start * size]
                if len(inside) > 1:  # the label spans several of the common split's indices
                    self.parts[label] = [self.new(b // a) for a, b in zip([start, *inside], inside)]
                start *= size
        return True


def _cuts(sizes: list[int]) -> list[int]:
    """The products of the leading sizes of a split, the slowest index first: where its indices end."""
    out, total = [], 1
    for size in sizes:
        total *= size
        out.append(total)
    return out


@dataclass(frozen=True)
class _Operand:
    """Where an operand comes from: ``factor``'s ``part`` ('a', 'b', 'v', 'm'; or 'ones', made here),
    its trailing axes split into ``shape`` for ``labels`` (the stack first, flattened, if ``stacked``)."""

    factor: int
    part: str
    labels: tuple[int, ...]
    shape: tuple[int, ...]
    stacked: bool


@dataclass(frozen=True)
class _Program:
    """A compiled chain: its operands, the order of contraction (the split of each run), the labels each run
    keeps, the result's labels and shape, and the samples its stacks hold (summed over in a mean). A label
    on both sides of the result (an identity through the chain) is there twice, the second time as its
    ``twins`` partner: the contraction makes the diagonal, written into zeros."""

    operands: tuple[_Operand, ...]
    split: dict
    kept: dict
    result: tuple[int, ...]
    sizes: dict
    cost: int
    lead: tuple[int, ...]
    rows: int
    cols: int
    samples: int
    largest: int  # the entries of the largest array the contraction makes (the result among them)
    twins: tuple[tuple[int, int], ...]


def signature(factors: tuple[Any, ...]) -> tuple | None:
    """What a chain's program depends on: each factor's kind, the shapes of its arrays and which factors of
    its Kronecker products are 1 1ᵀ, as the softmax's I ⊗ 1 1ᵀ (None for a factor kind a tensor network
    does not take)."""
    from .chain import CommutationFactor, DiagonalFactor, KronFactor

    def part(x: Any, ones: bool) -> tuple | None:
        return None if x is None else (tuple(x.shape), ones)

    out = []
    for f in factors:
        if isinstance(f, KronFactor):
            out.append(("kron", part(f.a, f.ones[0]), part(f.b, f.ones[1]), f.shape))
        elif isinstance(f, DiagonalFactor):
            out.append(("diag", tuple(f.v.shape)))
        elif isinstance(f, CommutationFactor):
            out.append(("perm", f.m, f.n))
        elif hasattr(f, "shape") and getattr(f, "ndim", 0) >= 2:
            out.append(("dense", tuple(f.shape)))
        else:
            return None
    return tuple(out)


@functools.lru_cache(maxsize=1024)
def compile_chain(sig: tuple, mean: bool = False) -> _Program | None:
    """The program of a chain of signature ``sig`` (:func:`signature`), or None where its factors' splits
    of a space have no common refinement or its stacks differ in their samples. With ``mean`` the samples'
    label is summed inside the contraction: the program makes the sum of the samples' products, never
    their stack."""
    spaces = _Spaces()
    rows, cols, arrays = [], [], []  # per factor: row labels, column labels; (factor, part, shape, labels, ones)
    leads = set()
    for k, entry in enumerate(sig):
        kind = entry[0]
        if kind == "dense":
            shape = entry[1]
            x, y = spaces.new(shape[-2]), spaces.new(shape[-1])
            rows.append([x]), cols.append([y]), arrays.append((k, "m", shape, [x, y], False))
        elif kind == "kron":
            a, b, (total_rows, total_cols) = entry[1], entry[2], entry[3]
            a_shape = a[0][-2:] if a is not None else (total_rows // b[0][-2], total_cols // b[0][-1])
            b_shape = b[0][-2:] if b is not None else (total_rows // a[0][-2], total_cols // a[0][-1])
            alpha, beta = spaces.new(a_shape[0]), spaces.new(b_shape[0])
            gamma = alpha if a is None else spaces.new(a_shape[1])
            delta = beta if b is None else spaces.new(b_shape[1])
            rows.append([alpha, beta]), cols.append([gamma, delta])
            if a is not None:
                arrays.append((k, "a", a[0], [alpha, gamma], a[1]))
            if b is not None:
                arrays.append((k, "b", b[0], [beta, delta], b[1]))
        elif kind == "diag":
            x = spaces.new(entry[1][-2])
            rows.append([x]), cols.append([x]), arrays.append((k, "v", entry[1][:-1], [x], False))
        else:  # K_{m,n}: from vec A, indices (j, i) of A's (i, j), to vec Aᵀ, indices (i, j)
            m, n = entry[1], entry[2]
            i, j = spaces.new(m), spaces.new(n)
            rows.append([i, j]), cols.append([j, i])
    if not arrays:
        return None
    changed = True
    while changed:  # until every space's splits agree: a refinement may reach other spaces through a label
        changed = False
        for k in range(len(sig) - 1):
            done = spaces.align(cols[k], rows[k + 1])
            if done is None:
                return None
            changed |= done
    operands = []
    for k, part, shape, labels, ones in arrays:
        lead = shape[:len(shape) - len(labels)]
        if lead:
            leads.add(lead)
        ones = ones and not lead  # 1 1ᵀ the samples share: the ones of its rows times the ones of its columns,
        for final in ([spaces.leaves([x]) for x in labels] if ones else [spaces.leaves(labels)]):  # two sums
            if len(set(final)) < len(final):  # a trace within one operand: not a chain this program takes
                return None
            operands.append(_Operand(k, "ones" if ones else part, tuple(final),
                                     tuple(spaces.size[x] for x in final), bool(lead)))
    # a ones vector whose labels another operand has multiplies by 1: only where it is alone with a label
    # (a sum of ones, or a result constant along it) does it count
    others = lambda o: {x for p in operands if p is not o and p.part != "ones" for x in p.labels}  # noqa: E731
    operands = [o for o in operands if o.part != "ones" or not set(o.labels) <= others(o)]
    if len(leads) > 1:
        return None
    lead = next(iter(leads)) if leads else ()
    out_rows, out_cols = spaces.leaves(rows[0]), spaces.leaves(cols[-1])
    result, twins = list(out_rows), []
    for label in out_cols:  # a label on both sides of the result (an identity through the chain): I
        if label in result:
            twins.append((label, spaces.new(spaces.size[label])))
            label = twins[-1][1]
        result.append(label)
    if leads and not mean:
        result.insert(0, STACK)
    if leads:
        operands = [o if not o.stacked else _Operand(o.factor, o.part, (STACK, *o.labels), o.shape, True)
                    for o in operands]
    sizes = {**spaces.size, STACK: math.prod(lead)}
    present = {x for o in operands for x in o.labels}
    contracted = tuple(x for x in result if x not in {twin for _, twin in twins})
    if any(x not in present for x in contracted):
        return None
    split, kept, cost = _plan(tuple(o.labels for o in operands), contracted, sizes)
    made, runs = [result], [(0, len(operands) - 1)]  # the result, and each run of the chosen order contracted
    while runs:
        i, j = runs.pop()
        made.append(kept[i, j])
        runs += [(i, split[i, j]), (split[i, j] + 1, j)] if i < j else []
    return _Program(tuple(operands), split, kept, tuple(result), sizes, cost, () if mean else lead,
                    math.prod(spaces.size[x] for x in out_rows), math.prod(spaces.size[x] for x in out_cols),
                    math.prod(lead), max(math.prod(sizes[x] for x in labels) for labels in made), tuple(twins))


def _plan(operands: tuple[tuple[int, ...], ...], result: tuple[int, ...],
          sizes: dict[int, int]) -> tuple[dict, dict, int]:
    """For every run i…j of the operands, the labels its contraction keeps (those the operands outside it
    or the result still need) and, for the order of least cost, the k where it splits into (i…k)(k+1…j)."""
    n = len(operands)
    kept: dict[tuple[int, int], frozenset] = {}
    for i in range(n):
        for j in range(i, n):
            inside = set().union(*operands[i:j + 1])
            outside = set(result).union(*operands[:i], *operands[j + 1:])
            kept[i, j] = frozenset(inside & outside)
    best = {(i, i): 0 for i in range(n)}
    split = {}
    for length in range(2, n + 1):
        for i in range(n - length + 1):
            j = i + length - 1
            choices = [(best[i, k] + best[k + 1, j] + math.prod(sizes[x] for x in kept[i, k] | kept[k + 1, j]), k)
                       for k in range(i, j)]
            best[i, j], split[i, j] = min(choices)
    return split, kept, best[0, n - 1]


def contract(program: _Program, factors: tuple[Any, ...], like: Any) -> Any:
    """The chain's product by its compiled ``program``: a matrix, or a stack (the samples of its stacks);
    ``like``, an array of the chain, gives the array type and dtype of what it makes."""
    xp = namespace(like)
    arrays = []
    for o in program.operands:
        if o.part == "ones":
            arrays.append(xp.ones(o.shape, dtype=like.dtype))
            continue
        f = factors[o.factor]
        array = f if o.part == "m" else getattr(f, o.part)  # a matrix, or a factor's A, B or v
        arrays.append(array.reshape(((-1,) if o.stacked else ()) + o.shape))
    labels = [o.labels for o in program.operands]

    def run(i: int, j: int, order: tuple[int, ...] | None = None) -> tuple[Any, tuple[int, ...]]:
        if i == j:
            return _sum_out(arrays[i], labels[i], program.kept[i, i])
        k = program.split[i, j]
        return _pair(*run(i, k), *run(k + 1, j), program.kept[i, j], program.sizes, order)

    twins = dict(program.twins)
    contracted = tuple(x for x in program.result if x not in twins.values())
    out, have = run(0, len(arrays) - 1, contracted)
    out = out.transpose([have.index(x) for x in contracted])
    if twins:  # the contraction is the diagonal of the result along each pair of twin axes: into zeros
        full = xp.zeros(tuple(program.sizes[x] for x in program.result), dtype=out.dtype)
        strides = dict(zip(program.result, full.strides))
        for label, twin in twins.items():
            strides[label] += strides.pop(twin)
        diagonal = xp.lib.stride_tricks.as_strided(full, out.shape, tuple(strides[x] for x in contracted))
        diagonal[...] = out
        out = full
    return out.reshape(program.lead + (program.rows, program.cols))


def _sum_out(array: Any, labels: tuple[int, ...], kept: frozenset) -> tuple[Any, tuple[int, ...]]:
    """The operand summed over the labels no other operand and not the result has."""
    gone = tuple(axis for axis, x in enumerate(labels) if x not in kept)
    if gone:
        array = array.sum(axis=gone)
    return array, tuple(x for x in labels if x in kept)


def _pair(x: Any, lx: tuple[int, ...], y: Any, ly: tuple[int, ...], kept: frozenset, sizes: dict[int, int],
          order: tuple[int, ...] | None = None) -> tuple[Any, tuple[int, ...]]:
    """Two partial products contracted: over the labels both have that are not ``kept``, as one batched
    matrix product (the kept common labels its batch), or elementwise where there are none; the result's
    labels in ``order`` where it is given and the contraction can make them so without a copy."""
    place = {a: i for i, a in enumerate(order)} if order is not None else {}
    by_order = lambda labels: sorted(labels, key=lambda a: place.get(a, -1))  # noqa: E731  (stable)
    if not [a for a in lx if a in ly and a not in kept]:  # elementwise, each side broadcast over the other's labels
        out = tuple(order) if order is not None else tuple(lx) + tuple(a for a in ly if a not in lx)
        return _spread(x, lx, out) * _spread(y, ly, out), out
    batch = by_order([a for a in lx if a in ly and a in kept])
    summed = [a for a in lx if a in ly and a not in kept]
    left, right = by_order([a for a in lx if a not in ly]), by_order([a for a in ly if a not in lx])
    shape = lambda labels: [sizes[a] for a in labels]  # noqa: E731
    b, m, k, n = (math.prod(shape(labels)) for labels in (batch, left, summed, right))
    xs = x.transpose([lx.index(a) for a in batch + left + summed]).reshape(b, m, k)
    ys = y.transpose([ly.index(a) for a in batch + summed + right]).reshape(b, k, n)
    product = matmul(xs, ys) if b > 1 else matmul(xs[0], ys[0])
    return product.reshape(shape(batch) + shape(left) + shape(right)), tuple(batch + left + right)


def _spread(x: Any, labels: tuple[int, ...], out: tuple[int, ...]) -> Any:
    """``x`` (axes ``labels``) as a view with the axes of ``out``: its own in that order, one of size 1 for each
    label it lacks, to broadcast over."""
    view = x.transpose([labels.index(a) for a in out if a in labels])
    return namespace(x).expand_dims(view, tuple(i for i, a in enumerate(out) if a not in labels))
