"""Algebraic identities of matrix calculus, one rewrite each.

Citations: M&N = Magnus & Neudecker (1999), chapter.section; S.x and (x) are
the HBP paper's equations. The rewrites are oriented (they shrink the
expression or push transposes and constants outwards), so the engine's
fixpoint terminates.
"""
from __future__ import annotations

import sympy as sp

from .. import dims
from ..expr import (
    BATCH,
    ONE,
    Add,
    Apply,
    Commutation,
    Diag,
    Expr,
    Fold,
    Hadamard,
    Identity,
    Inverse,
    Kron,
    MatMul,
    Ones,
    RankSum,
    ScalarMul,
    ScaleBy,
    Sum,
    Symbol,
    Transpose,
    Unfold,
    Vec,
    Zero,
)
from .engine import rule


def _is_one(e: Expr) -> bool:
    return isinstance(e, (Identity, Ones)) and e.shape == (ONE, ONE)


def _scalar_parts(e: Expr) -> tuple[sp.Expr, Expr]:
    """``c·T`` as ``(c, T)``; any other term as ``(1, term)``."""
    if isinstance(e, ScalarMul):
        return e.coefficient, e.operand
    return ONE, e


# --- matrix products -----------------------------------------------------------
@rule(MatMul, "(A B) C = A (B C), associativity")
def matmul_flatten(e: MatMul) -> Expr | None:
    if any(isinstance(f, MatMul) for f in e.args):
        return MatMul(*[g for f in e.args for g in (f.args if isinstance(f, MatMul) else (f,))])
    return None


@rule(MatMul, "A 0 = 0")
def matmul_zero(e: MatMul) -> Expr | None:
    return Zero(*e.shape) if any(isinstance(f, Zero) for f in e.args) else None


@rule(MatMul, "A I = I A = A")
def matmul_identity(e: MatMul) -> Expr | None:
    kept = [f for f in e.args if not isinstance(f, Identity)]
    if len(kept) == len(e.args):
        return None
    if not kept:
        return Identity(e.rows)
    return kept[0] if len(kept) == 1 else MatMul(*kept)


@rule(MatMul, "A (cB) = c (A B)")
def matmul_pull_constant(e: MatMul) -> Expr | None:
    for i, f in enumerate(e.args):
        if isinstance(f, ScalarMul):
            return ScalarMul(f.coefficient, MatMul(*e.args[:i], f.operand, *e.args[i + 1 :]))
        if isinstance(f, ScaleBy):
            return ScaleBy(f.args[0], MatMul(*e.args[:i], f.args[1], *e.args[i + 1 :]))
    return None


@rule(MatMul, "a (1×1) factor of a product is a scalar multiple: A s B = s·(A B)")
def matmul_scalar_factor(e: MatMul) -> Expr | None:
    if e.is_scalar:  # a (1×1) product stays a product (s·t for scalars is s t, see scale_nested)
        return None
    for i, f in enumerate(e.args):
        if f.is_scalar:
            rest = e.args[:i] + e.args[i + 1 :]
            return ScaleBy(f, rest[0] if len(rest) == 1 else MatMul(*rest))
    return None


def _mixed(left: Expr, right: Expr) -> Expr | None:
    """(A⊗B)(C⊗D) = AC ⊗ BD, lifting a plain factor M to I₁⊗M or M⊗I₁ where that conforms."""
    if isinstance(left, Kron) and isinstance(right, Kron):
        (a, b), (c, d) = left.args, right.args
        if dims.same(a.cols, c.rows) and dims.same(b.cols, d.rows):
            return Kron(MatMul(a, c), MatMul(b, d))
        return None
    if left.is_scalar or right.is_scalar:  # scalars are the scalar rules' business
        return None
    if isinstance(left, Kron):
        a, b = left.args
        if a.cols == ONE:  # M = I₁ ⊗ M
            return Kron(a, MatMul(b, right))
        if b.cols == ONE:  # M = M ⊗ I₁
            return Kron(MatMul(a, right), b)
    if isinstance(right, Kron):
        c, d = right.args
        if c.rows == ONE:
            return Kron(c, MatMul(left, d))
        if d.rows == ONE:
            return Kron(MatMul(left, c), d)
    return None


@rule(MatMul, "mixed-product rule (A⊗B)(C⊗D) = AC⊗BD, M&N 2.2")
def matmul_mixed_product(e: MatMul) -> Expr | None:
    for i in range(len(e.args) - 1):
        merged = _mixed(e.args[i], e.args[i + 1])
        if merged is not None:
            rest = e.args[:i] + (merged,) + e.args[i + 2 :]
            return rest[0] if len(rest) == 1 else MatMul(*rest)
    return None


@rule(MatMul, "diag(a) diag(b) = diag(a ⊙ b)")
def matmul_diagonals(e: MatMul) -> Expr | None:
    for i in range(len(e.args) - 1):
        left, right = e.args[i], e.args[i + 1]
        if isinstance(left, Diag) and isinstance(right, Diag):
            merged = Diag(Hadamard(left.args[0], right.args[0]))
            rest = e.args[:i] + (merged,) + e.args[i + 2 :]
            return rest[0] if len(rest) == 1 else MatMul(*rest)
    return None


@rule(MatMul, "K_{m,n} K_{n,m} = I_{mn}, M&N 3.7")
def matmul_commutations(e: MatMul) -> Expr | None:
    for i in range(len(e.args) - 1):
        left, right = e.args[i], e.args[i + 1]
        if isinstance(left, Commutation) and isinstance(right, Commutation) and left.args == right.args[::-1]:
            rest = e.args[:i] + (Identity(left.rows),) + e.args[i + 2 :]
            return rest[0] if len(rest) == 1 else MatMul(*rest)
    return None


def _replace_pair(e: MatMul, i: int, merged: Expr) -> Expr:
    rest = e.args[:i] + (merged,) + e.args[i + 2 :]
    return rest[0] if len(rest) == 1 else MatMul(*rest)


@rule(MatMul, "1ᵀ diag(v) = vᵀ; diag(v) 1 = v; 1ᵀ v = vᵀ 1 = sum(v)")
def matmul_ones_contraction(e: MatMul) -> Expr | None:
    for i in range(len(e.args) - 1):
        left, right = e.args[i], e.args[i + 1]
        if isinstance(left, Ones) and left.rows == ONE and isinstance(right, Diag):
            return _replace_pair(e, i, Transpose(right.args[0]))
        if isinstance(left, Diag) and isinstance(right, Ones) and right.cols == ONE:
            return _replace_pair(e, i, left.args[0])
        if isinstance(left, Ones) and left.rows == ONE and right.cols == ONE:
            return _replace_pair(e, i, Sum(right))
        if isinstance(right, Ones) and right.cols == ONE and left.rows == ONE:
            return _replace_pair(e, i, Sum(Transpose(left)))
    return None


@rule(MatMul, "v (I + B) = v + v B for a (row) vector v: removes an identity")
def matmul_distribute_identity(e: MatMul) -> Expr | None:
    if len(e.args) != 2:
        return None
    a, b = e.args
    for vector, total, vector_first in ((a, b, True), (b, a, False)):
        if (vector.rows == ONE or vector.cols == ONE) and isinstance(total, Add) and any(
            isinstance(_scalar_parts(t)[1], Identity) for t in total.args
        ):
            return Add(*[MatMul(vector, t) if vector_first else MatMul(t, vector) for t in total.args])
    return None


# --- sums and constant multiples -------------------------------------------------
@rule(Add, "(A + B) + C = A + (B + C), associativity")
def add_flatten(e: Add) -> Expr | None:
    if any(isinstance(t, Add) for t in e.args):
        return Add(*[u for t in e.args for u in (t.args if isinstance(t, Add) else (t,))])
    return None


@rule(Add, "A + 0 = A")
def add_zero(e: Add) -> Expr | None:
    kept = [t for t in e.args if not isinstance(t, Zero)]
    if len(kept) == len(e.args) and len(kept) > 1:
        return None
    if not kept:
        return Zero(*e.shape)
    return kept[0] if len(kept) == 1 else Add(*kept)


@rule(Add, "a·T + b·T = (a + b)·T")
def add_collect(e: Add) -> Expr | None:
    order: list[Expr] = []
    coefficients: dict[Expr, sp.Expr] = {}
    for t in e.args:
        c, core = _scalar_parts(t)
        if core not in coefficients:
            order.append(core)
            coefficients[core] = sp.Integer(0)
        coefficients[core] += c
    if len(order) == len(e.args):
        return None
    terms = [ScalarMul(sp.simplify(coefficients[t]), t) for t in order if sp.simplify(coefficients[t]) != 0]
    if not terms:
        return Zero(*e.shape)
    return terms[0] if len(terms) == 1 else Add(*terms)


@rule(Add, "diag(a) + diag(b) = diag(a + b)")
def add_diagonals(e: Add) -> Expr | None:
    diagonal = [(i, t) for i, t in enumerate(e.args) if isinstance(_scalar_parts(t)[1], Diag)]
    if len(diagonal) < 2:
        return None
    vectors = []
    for _, t in diagonal:
        c, d = _scalar_parts(t)
        vectors.append(d.args[0] if c == ONE else ScalarMul(c, d.args[0]))
    merged = Diag(Add(*vectors))
    others = [t for i, t in enumerate(e.args) if i not in {j for j, _ in diagonal}]
    return merged if not others else Add(*others, merged)


def _factors(term: Expr) -> tuple[sp.Expr, tuple[Expr, ...]]:
    c, core = _scalar_parts(term)
    return c, core.args if isinstance(core, MatMul) else (core,)


def _with(c: sp.Expr, factors: tuple[Expr, ...]) -> Expr:
    core = factors[0] if len(factors) == 1 else MatMul(*factors)
    return core if c == ONE else ScalarMul(c, core)


@rule(Add, "A B + A C = A (B + C); B A + C A = (B + C) A (distributivity)")
def add_common_factor(e: Add) -> Expr | None:
    parts = [_factors(t) for t in e.args]
    for side in (0, -1):
        groups: dict[Expr, list[int]] = {}
        for i, (_, fs) in enumerate(parts):
            if len(fs) >= 2:
                groups.setdefault(fs[side], []).append(i)
        for common, members in groups.items():
            if len(members) < 2:
                continue
            inner = []
            for i in members:
                c, fs = parts[i]
                rest = fs[1:] if side == 0 else fs[:-1]
                inner.append(_with(c, rest))
            factored = MatMul(common, Add(*inner)) if side == 0 else MatMul(Add(*inner), common)
            others = [t for i, t in enumerate(e.args) if i not in members]
            return factored if not others else Add(factored, *others)
    return None


@rule(Add, "A⊗B + A⊗C = A⊗(B + C); B⊗A + C⊗A = (B + C)⊗A (M&N 2.2)")
def add_common_kron_factor(e: Add) -> Expr | None:
    parts = [_scalar_parts(t) for t in e.args]
    for side in (0, 1):
        groups: dict[Expr, list[int]] = {}
        for i, (_, core) in enumerate(parts):
            if isinstance(core, Kron):
                groups.setdefault(core.args[side], []).append(i)
        for common, members in groups.items():
            if len(members) < 2:
                continue
            inner = [ScalarMul(parts[i][0], parts[i][1].args[1 - side]) for i in members]
            factored = Kron(common, Add(*inner)) if side == 0 else Kron(Add(*inner), common)
            others = [t for i, t in enumerate(e.args) if i not in members]
            return factored if not others else Add(factored, *others)
    return None


# --- sums over the ranks of data parallelism (linear: each term's own sum would be an all-reduce) -------
def _same_on_every_rank(c: sp.Expr) -> bool:
    """A coefficient that may cross Σ_r: not this rank's own batch size B (its shard's, which differs)."""
    return BATCH not in sp.sympify(c).free_symbols


@rule(RankSum, "Σ_r (c·A) = c·Σ_r A for c the same on every rank (linearity)")
def rank_sum_pull_constant(e: RankSum) -> Expr | None:
    inner = e.args[0]
    if isinstance(inner, ScalarMul) and _same_on_every_rank(inner.coefficient):
        return ScalarMul(inner.coefficient, RankSum(inner.operand))
    return None


@rule(Add, "a·Σ_r A + b·Σ_r B = Σ_r (a·A + b·B) for a, b the same on every rank (linearity: one all-reduce)")
def add_rank_sums(e: Add) -> Expr | None:
    summed = [i for i, t in enumerate(e.args)
              if isinstance(_scalar_parts(t)[1], RankSum) and _same_on_every_rank(_scalar_parts(t)[0])]
    if len(summed) < 2:
        return None
    inner = []
    for i in summed:
        c, total = _scalar_parts(e.args[i])
        inner.append(_with(c, (total.args[0],)))
    merged = RankSum(Add(*inner))
    others = [t for i, t in enumerate(e.args) if i not in summed]
    return merged if not others else Add(*others, merged)


@rule(ScalarMul, "1·A = A, 0·A = 0, c·0 = 0")
def scalar_trivial(e: ScalarMul) -> Expr | None:
    if e.coefficient == 1:
        return e.operand
    if e.coefficient == 0 or isinstance(e.operand, Zero):
        return Zero(*e.shape)
    return None


@rule(ScalarMul, "a·(b·A) = (ab)·A")
def scalar_nested(e: ScalarMul) -> Expr | None:
    if isinstance(e.operand, ScalarMul):
        return ScalarMul(e.coefficient * e.operand.coefficient, e.operand.operand)
    return None


@rule(ScaleBy, "1·A = A; s·0 = 0; 0·A = 0")
def scale_trivial(e: ScaleBy) -> Expr | None:
    s, a = e.args
    if _is_one(s):
        return a
    if isinstance(s, Zero) or isinstance(a, Zero):
        return Zero(*e.shape)
    return None


@rule(ScaleBy, "(c s)·A = c (s·A); s·(c A) = c (s·A)")
def scale_pull_constant(e: ScaleBy) -> Expr | None:
    s, a = e.args
    if isinstance(s, ScalarMul):
        return ScalarMul(s.coefficient, ScaleBy(s.operand, a))
    if isinstance(a, ScalarMul):
        return ScalarMul(a.coefficient, ScaleBy(s, a.operand))
    return None


@rule(ScaleBy, "s·(t·A) = (s t)·A; s·t = s t for (1×1) t")
def scale_nested(e: ScaleBy) -> Expr | None:
    s, a = e.args
    if isinstance(a, ScaleBy):
        return ScaleBy(MatMul(s, a.args[0]), a.args[1])
    if a.is_scalar:
        return MatMul(s, a)
    return None


# --- Kronecker products -----------------------------------------------------------
@rule(Kron, "A ⊗ 0 = 0 ⊗ A = 0")
def kron_zero(e: Kron) -> Expr | None:
    return Zero(*e.shape) if any(isinstance(f, Zero) for f in e.args) else None


@rule(Kron, "s ⊗ A = A ⊗ s = s·A for (1×1) s, M&N 2.2")
def kron_scalar(e: Kron) -> Expr | None:
    a, b = e.args
    if a.is_scalar:
        return b if _is_one(a) else ScaleBy(a, b)
    if b.is_scalar:
        return a if _is_one(b) else ScaleBy(b, a)
    return None


@rule(Kron, "I_m ⊗ I_n = I_{mn}")
def kron_identities(e: Kron) -> Expr | None:
    a, b = e.args
    return Identity(a.rows * b.rows) if isinstance(a, Identity) and isinstance(b, Identity) else None


@rule(Kron, "(cA) ⊗ B = A ⊗ (cB) = c (A ⊗ B), M&N 2.2")
def kron_pull_constant(e: Kron) -> Expr | None:
    a, b = e.args
    for i, f in enumerate(e.args):
        if isinstance(f, (ScalarMul, ScaleBy)):
            inner = Kron(f.args[1], b) if i == 0 else Kron(a, f.args[1])
            return ScalarMul(f.args[0], inner) if isinstance(f, ScalarMul) else ScaleBy(f.args[0], inner)
    return None


# --- transposes ---------------------------------------------------------------------
@rule(Transpose, "sᵀ = s for (1×1) s; Sᵀ = S for symmetric S; (Aᵀ)ᵀ = A")
def transpose_trivial(e: Transpose) -> Expr | None:
    (a,) = e.args
    if a.is_scalar or a.symmetric:
        return a
    if isinstance(a, Transpose):
        return a.args[0]
    if isinstance(a, Zero):
        return Zero(a.cols, a.rows)
    if isinstance(a, Ones):
        return Ones(a.cols, a.rows)
    if isinstance(a, Commutation):  # K_{m,n}ᵀ = K_{n,m}, M&N 3.7
        return Commutation(a.args[1], a.args[0])
    return None


@rule(Transpose, "(A B)ᵀ = Bᵀ Aᵀ; (A+B)ᵀ = Aᵀ+Bᵀ; (A⊗B)ᵀ = Aᵀ⊗Bᵀ (M&N 2.2); (A⊙B)ᵀ = Aᵀ⊙Bᵀ")
def transpose_distribute(e: Transpose) -> Expr | None:
    (a,) = e.args
    if isinstance(a, MatMul):
        return MatMul(*[Transpose(f) for f in reversed(a.args)])
    if isinstance(a, Add):
        return Add(*[Transpose(t) for t in a.args])
    if isinstance(a, Kron):
        return Kron(Transpose(a.args[0]), Transpose(a.args[1]))
    if isinstance(a, Hadamard):
        return Hadamard(*[Transpose(t) for t in a.args])
    if isinstance(a, (ScalarMul, ScaleBy)):
        return type(a)(a.args[0], Transpose(a.args[1]))
    return None


# --- diagonal matrices and vec ------------------------------------------------------
@rule(Diag, "diag(0) = 0; diag(1) = I; diag(c a) = c diag(a); diag of (1×1) s is s")
def diag_trivial(e: Diag) -> Expr | None:
    (v,) = e.args
    if v.is_scalar:
        return v
    if isinstance(v, Zero):
        return Zero(*e.shape)
    if isinstance(v, Ones):
        return Identity(v.rows)
    if isinstance(v, (ScalarMul, ScaleBy)):
        return type(v)(v.args[0], Diag(v.args[1]))
    return None


@rule(Unfold, "unfold and fold are linear: unfold(0) = 0, unfold(c·U) = c·unfold(U)")
def unfold_linear(e: Unfold) -> Expr | None:
    return _linear_index_map(e)


@rule(Fold, "unfold and fold are linear: fold(0) = 0, fold(c·U) = c·fold(U)")
def fold_linear(e: Fold) -> Expr | None:
    return _linear_index_map(e)


def _linear_index_map(e: Expr) -> Expr | None:
    operand, *rest = e.args
    if isinstance(operand, Zero):
        return Zero(*e.shape)
    if isinstance(operand, ScalarMul):
        return ScalarMul(operand.coefficient, type(e)(operand.operand, *rest))
    return None


@rule(Vec, "vec(a) = a for a vector; vec(aᵀ) = a, M&N 2.4")
def vec_trivial(e: Vec) -> Expr | None:
    (a,) = e.args
    if a.cols == ONE:
        return a
    if a.rows == ONE:
        return Transpose(a)
    if isinstance(a, (ScalarMul, ScaleBy)):
        return type(a)(a.args[0], Vec(a.args[1]))
    if isinstance(a, Zero):
        return Zero(*e.shape)
    if isinstance(a, Ones):
        return Ones(*e.shape)
    return None


# --- elementwise ------------------------------------------------------------------
def _order_key(e: Expr) -> str:
    return repr(e)


@rule(Hadamard, "A ⊙ 0 = 0; A ⊙ 1 = A; (cA) ⊙ B = c (A ⊙ B); A ⊙ B = B ⊙ A (canonical order)")
def hadamard_trivial(e: Hadamard) -> Expr | None:
    a, b = e.args
    if isinstance(a, Zero) or isinstance(b, Zero):
        return Zero(*e.shape)
    if isinstance(a, Ones):
        return b
    if isinstance(b, Ones):
        return a
    for i, f in enumerate(e.args):
        if isinstance(f, (ScalarMul, ScaleBy)):
            other = e.args[1 - i]
            return type(f)(f.args[0], Hadamard(f.args[1], other))
    if _order_key(b) < _order_key(a):
        return Hadamard(b, a)
    return None


@rule(Apply, "φ ≡ c (e.g. relu″ = 0 almost everywhere) gives the constant c")
def apply_constant(e: Apply) -> Expr | None:
    f = e.function.expr
    if f.is_number:
        return Zero(*e.shape) if f == 0 else ScalarMul(f, Ones(*e.shape))
    return None


@rule(Sum, "sum(s) = s for (1×1) s; sum(c A) = c sum(A); sum(1_{m×n}) = mn; sum(y) = 1 on the simplex")
def sum_trivial(e: Sum) -> Expr | None:
    (a,) = e.args
    if a.is_scalar:
        return a
    if isinstance(a, ScalarMul):
        return ScalarMul(a.coefficient, Sum(a.operand))
    if isinstance(a, Ones):
        return ScalarMul(a.size, Identity(ONE))
    if isinstance(a, Zero):
        return Zero(ONE, ONE)
    if isinstance(a, ScaleBy):
        return MatMul(a.args[0], Sum(a.args[1]))
    if isinstance(a, Symbol) and "simplex" in a.hints:  # a label on the simplex sums to one
        return Identity(ONE)
    return None


@rule(Sum, "sum(A + B) = sum(A) + sum(B): a sum of a centred vector, sum(x − mean(x)·1), cancels to 0")
def sum_linear(e: Sum) -> Expr | None:
    (a,) = e.args
    if isinstance(a, Add) and any(isinstance(_scalar_parts(t)[1], ScaleBy) for t in a.args):
        return Add(*[Sum(t) for t in a.args])  # only where a broadcast term s·1 can cancel against the rest
    return None


@rule(Inverse, "(A⁻¹)⁻¹ = A; I⁻¹ = I")
def inverse_trivial(e: Inverse) -> Expr | None:
    (a,) = e.args
    if isinstance(a, Inverse):
        return a.args[0]
    if isinstance(a, Identity):
        return a
    return None


@rule(Commutation, "K_{m,1} = K_{1,n} = I, M&N 3.7")
def commutation_trivial(e: Commutation) -> Expr | None:
    m, n = e.args
    return Identity(m * n) if m == ONE or n == ONE else None
