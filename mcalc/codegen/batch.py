"""Batch lowering: a per-sample rule rewritten over a batch of B samples (Section 3.3).

Per-sample vectors (inputs, labels, δz) become stacked (rows × B) matrices,
column i holding sample i, and per-sample matrices (rows × cols: a signal's
positions) their samples side by side, (rows × cols·B); batch means are pushed
through the rule's structure with closed forms, so that batch work is matrix
products plus elementwise passes:

    meanᵢ(S vᵢ T)               = S meanᵢ(vᵢ) T                   (linearity)
    meanᵢ(uᵢ wᵢᵀ)               = U Wᵀ / B                        (one matrix product)
    meanᵢ(diag(aᵢ) H diag(bᵢ))  = H ⊙ (A Bᵀ) / B                  (diag(a)H diag(b) = H ⊙ abᵀ)
    meanᵢ(Pᵢ ⊗ Q)               = meanᵢ(Pᵢ) ⊗ Q                   (M&N 2.2, linearity)
    meanᵢ(Lᵢ Rᵢ)                = [L₁ … L_B] [R₁ᵀ … R_Bᵀ]ᵀ / B      (per-sample matrices side by side)
    [Lᵢ Rᵢ]ᵢ                    = [L₁R₁ … L_BR_B]                 (one batched product: attention's Xᵢᵀ Q Xᵢ)

A rule with no closed form keeps a :class:`~mcalc.expr.BatchMean` node that
is evaluated sample by sample.

HBP's means are over every rank's shard of the batch in data parallelism: each
is (1/B_all) Σ_ranks of this rank's batch sum (:class:`~mcalc.expr.RankSum`),
which the runtime all-reduces (one process: the sum itself, B_all = B), so that
a PSD cast or a product of means reads the global mean. Gradients, tangents and
R-products stay this rank's sums; their callers reduce them.

Batch conventions (BackPACK's): the loss is the batch mean, δZ holds the
gradients of that mean (so each column carries the 1/B), 𝓗z̄ is the batch
average of the per-sample loss Hessians, and the PCH cast applies to the
summed concave term.
"""
from __future__ import annotations

from ..calculus.derivation import Derivation
from ..calculus.hbp import cast_concave
from ..errors import McalcError
from ..expr import (
    BATCH,
    ONE,
    SAMPLES,
    Add,
    Apply,
    BatchMean,
    BlockTrace,
    Diag,
    Expr,
    Fold,
    Hadamard,
    Identity,
    Kron,
    LogSoftmax,
    MatMul,
    Ones,
    RankSum,
    SampleMatMul,
    SampleProduct,
    SampleTranspose,
    ScalarMul,
    ScaleBy,
    Softmax,
    Stacked,
    Sum,
    Transpose,
    Unfold,
    UnvecOfSamples,
    Vec,
    VecOfSamples,
    WindowArgmax,
    product,
    tangent,
)
from ..modes import Approximation, Curvature
from ..simplification import simplify


class BatchLowering:
    """Lowers the per-sample rules of one module over a batch."""

    def __init__(self, derivation: Derivation, approximation: Approximation = Approximation.MEAN_OF_SANDWICHES,
                 across_ranks: bool = False) -> None:
        self.derivation = derivation
        self.approximation = approximation
        self.across_ranks = across_ranks  # batch means over every rank's shard (:class:`RankSum`)
        self.factored = approximation.factored  # E[Aᵢ ⊗ Bᵢ] → E[Aᵢ] ⊗ E[Bᵢ] (K-FAC's)
        m = derivation.module
        self._varies: dict[Expr, bool] = {}
        self._stacked: dict[Expr, Expr | None] = {}
        self.leaves: tuple[Expr, ...] = (*m.inputs, *[c for c in m.constants if c.is_vector], derivation.dz,
                                         *map(tangent, m.inputs), derivation.Rdz)

    def varies(self, e: Expr) -> bool:
        """Whether ``e`` differs from sample to sample (memoised per lowering)."""
        if e not in self._varies:
            self._varies[e] = e in self.leaves or (
                not isinstance(e, Stacked) and any(self.varies(c) for c in e.children))
        return self._varies[e]

    def _mean_fallback(self, e: Expr) -> Expr:
        mean = BatchMean(e, tuple(leaf for leaf in self.leaves if _contains(e, leaf)))
        return self._averaged(ScalarMul(BATCH, mean)) if self.across_ranks else mean

    def _averaged(self, total: Expr) -> Expr:
        """The batch mean whose sum over this rank's samples is ``total``: (1/B) Σᵢ, or across ranks
        (1/B_all) Σ_ranks Σᵢ, which a PSD cast or a product of means ((7), 6-kfac) may then read whole."""
        if self.across_ranks:
            return ScalarMul(1 / SAMPLES, RankSum(total))
        return ScalarMul(1 / BATCH, total)

    # --- per-sample vectors → (rows × B), matrices → (rows × cols·B) ---------------------
    def stack(self, e: Expr) -> Expr | None:
        """The batch of a per-sample vector or matrix, its samples side by side (as :class:`Stacked`), or
        None where the lowering has no batch form for it (memoised per lowering: a rule's expression is a
        DAG, and lowering each path to a shared subexpression anew costs exponential time in its depth)."""
        if e not in self._stacked:
            self._stacked[e] = self._stack(e)
        return self._stacked[e]

    def _stack(self, e: Expr) -> Expr | None:
        if not self.varies(e):
            return _repeated(e)
        if e in self.leaves:
            return Stacked(e)
        if isinstance(e, Vec):
            inner = e.args[0]
            columns = self.stack(inner)
            return columns if inner.cols == ONE or columns is None else VecOfSamples(columns, inner.cols)
        unvec = _unvec_operand(e)
        if unvec is not None:  # the adjoint of vec, a per-sample vector back to its matrix
            vectors = self.stack(unvec)
            return None if vectors is None else UnvecOfSamples(vectors, e.rows)
        parts = [self.stack(c) for c in e.children]
        if any(p is None for p in parts):
            return self._stack_product(e) if isinstance(e, MatMul) else None
        if isinstance(e, (Add, Hadamard)):
            return type(e)(*parts)
        if isinstance(e, (ScalarMul, Apply)):
            return type(e)(e.args[0], parts[0])
        if isinstance(e, Transpose):  # each sample's block transposed: a column's rows side by side, (1 × n·B)
            return SampleTranspose(parts[0], e.args[0].cols)
        if isinstance(e, (Softmax, LogSoftmax)):  # column by column: a matrix's columns side by side too
            return type(e)(parts[0])
        if isinstance(e, (Unfold, Fold, WindowArgmax)):  # sample by sample, each sample's part side by side
            return type(e)(parts[0], *e.args[1:])
        if isinstance(e, Kron):  # with a shared column v: [M₁ M₂ …] ⊗ v = [M₁ ⊗ v, M₂ ⊗ v, …], v ⊗ alike
            a, b = e.args
            if not self.varies(b) and b.cols == ONE:
                return Kron(parts[0], b)
            if not self.varies(a) and a.cols == ONE:
                return Kron(a, parts[1])
        if isinstance(e, ScaleBy):
            scale = e.args[0]
            if not self.varies(scale):
                return ScaleBy(scale, parts[1])
            per_column = parts[0] if e.cols == ONE else SampleProduct(parts[0], Ones(ONE, e.cols))
            return Hadamard(MatMul(Ones(e.rows, ONE), per_column), parts[1])
        if isinstance(e, Sum):
            sums = MatMul(Ones(ONE, e.args[0].rows), parts[0])
            return sums if e.args[0].cols == ONE else SampleProduct(sums, Ones(e.args[0].cols, ONE))
        if isinstance(e, MatMul):
            return self._stack_product(e)
        return None

    def _stack_product(self, e: MatMul) -> Expr | None:
        factors = e.args
        j = next(i for i, f in enumerate(factors) if self.varies(f))
        prefix, rest = factors[:j], factors[j:]
        first = rest[0]
        if len(rest) == 1:
            inner = self.stack(first)
        elif not any(self.varies(f) for f in rest[1:]) and (first.cols != ONE or e.cols != ONE):
            # a per-sample matrix (or column) times shared factors, Xᵢ V: each sample's block times V
            columns = self.stack(first)
            inner = None if columns is None else SampleProduct(columns, product(rest[1:], first.cols))
        elif e.cols != ONE:  # a per-sample matrix from per-sample factors (Xᵢᵀ Xᵢ, say)
            inner = self._sample_chain(rest)
        elif isinstance(first, Diag):  # diag(v) c = v ⊙ c
            column = rest[1] if len(rest) == 2 else MatMul(*rest[1:])
            v, c = self.stack(first.args[0]), self.stack(column)
            inner = None if v is None or c is None else Hadamard(v, c)
        elif first.cols == ONE:  # a column times a per-sample scalar: cᵢ (uᵢᵀ wᵢ) = (1 sᵀ) ⊙ C
            scale = rest[1] if len(rest) == 2 else MatMul(*rest[1:])
            inner = self.stack(ScaleBy(scale, first))
        elif first.rows == ONE:  # a per-sample row times a column: uᵢᵀ cᵢ = 1ᵀ (U ⊙ C)
            column = rest[1] if len(rest) == 2 else MatMul(*rest[1:])
            u, c = self.stack(simplify(Transpose(first))), self.stack(column)
            inner = None if u is None or c is None else MatMul(Ones(ONE, first.cols), Hadamard(u, c))
        else:  # a per-sample matrix times per-sample columns (Xᵢ sᵢ, attention's)
            inner = self._sample_chain(rest)
        if inner is None:
            return None
        return MatMul(*prefix, inner) if prefix else inner

    def _sample_chain(self, factors: tuple[Expr, ...]) -> Expr | None:
        """F₁ F₂ … of per-sample and shared factors as one batch, left to right: each sample's block times a
        shared factor (:class:`SampleProduct`) or times its own block of a per-sample one (:class:`SampleMatMul`,
        a batched product)."""
        batch = self.stack(factors[0])
        for f in factors[1:]:
            if batch is None:
                return None
            if not self.varies(f):
                batch = SampleProduct(batch, f)
            else:
                own = self.stack(f)
                batch = None if own is None else SampleMatMul(batch, own)
        return batch

    # --- batch means --------------------------------------------------------------
    def mean(self, e: Expr) -> Expr:
        """(1/B) Σᵢ e(sample i), in closed form where the structure allows."""
        if not self.varies(e):
            return e
        if isinstance(e, Add):
            return Add(*[self.mean(t) for t in e.args])
        if isinstance(e, ScalarMul):
            return ScalarMul(e.coefficient, self.mean(e.operand))
        if isinstance(e, Transpose):
            return Transpose(self.mean(e.args[0]))
        if e.cols == ONE:
            stacked = self.stack(e)
            if stacked is not None:
                return self._averaged(MatMul(stacked, Ones(BATCH, ONE)))
        if isinstance(e, Diag):
            return Diag(self.mean(e.args[0]))
        if isinstance(e, ScaleBy):
            scale, operand = e.args
            if not self.varies(operand):
                return ScaleBy(self.mean(scale), operand)
            if not self.varies(scale):
                return ScaleBy(scale, self.mean(operand))
            pushed = _push_scale(scale, operand)  # sᵢ Mᵢ: let the scale ride on a per-sample vector
            if pushed is not None:
                return self.mean(pushed)
        if isinstance(e, Kron):
            left, right = e.args
            if not self.varies(right):
                return Kron(self.mean(left), right)
            if not self.varies(left):
                return Kron(left, self.mean(right))
            if self.factored:  # K-FAC's factorisation of a mean of Kronecker products
                return Kron(self.mean(left), self.mean(right))
        if isinstance(e, MatMul):
            shared = self._shared_weight(e) if self.factored else None
            if shared is not None:
                return shared
            closed = self._mean_product(e)
            if closed is not None:
                return closed
        if e.rows == ONE and e.cols != ONE:  # a row: the mean of its transpose, where that is simpler
            flipped = simplify(Transpose(e))
            if not isinstance(flipped, Transpose):
                return Transpose(self.mean(flipped))
            rows = self.stack(e)  # else the samples' rows side by side, as columns, summed
            if rows is not None:
                return Transpose(self._averaged(MatMul(SampleTranspose(rows, e.cols), Ones(BATCH, ONE))))
        return self._mean_fallback(e)

    def _shared_weight(self, e: MatMul) -> Expr | None:
        """The block of a weight shared over T positions, E[(Uᵢ ⊗ I) Mᵢ (Uᵢᵀ ⊗ I)] = Σₜₛ E[uₜ uₛᵀ ⊗ Mₜₛ] with
        Uᵢ (d × T) per sample, factored by K-FAC-expand (the positions as more samples, cross-position
        terms dropped) or K-FAC-reduce (the mean position's input, the positions' blocks summed),
        as Eschenhagen et al. (2023) define them and curvlinops computes them (``kfac_math.py``: inputs
        flattened over positions and normalised by T, or averaged; gradients flattened, or summed); None
        for any other product."""
        if len(e.args) != 3 or not all(isinstance(f, Kron) for f in (e.args[0], e.args[2])):
            return None
        (u, identity), middle, (u_t, identity_t) = e.args[0].args, e.args[1], e.args[2].args
        positions = u.cols
        if not (isinstance(identity, Identity) and identity == identity_t and self.varies(u) and positions != ONE
                and simplify(Transpose(u)) == u_t):
            return None
        if self.approximation is Approximation.KRONECKER_FACTORED_REDUCE:
            mean_position = ScalarMul(1 / positions, MatMul(u, Ones(positions, ONE)))
            summed = Kron(Ones(ONE, positions), identity)
            return Kron(self.mean(MatMul(mean_position, Transpose(mean_position))),
                        self.mean(MatMul(summed, middle, Transpose(summed))))
        return Kron(ScalarMul(1 / positions, self.mean(MatMul(u, u_t))), BlockTrace(self.mean(middle), positions))

    def _mean_product(self, e: MatMul) -> Expr | None:
        f = e.args
        varying = [i for i, g in enumerate(f) if self.varies(g)]

        def around(middle: Expr, j: int, k: int) -> Expr:
            parts = (*f[:j], middle, *f[k + 1 :])
            return parts[0] if len(parts) == 1 else MatMul(*parts)

        if len(varying) == 1:
            (j,) = varying
            return around(self.mean(f[j]), j, j)
        for j in varying:  # (…)(A + B)(…) = (…)A(…) + (…)B(…): distribute a varying sum
            if isinstance(f[j], Add):
                distributed = Add(*[self.mean(simplify(MatMul(*f[:j], t, *f[j + 1 :]))) for t in f[j].args])
                # terms without a closed form, each a per-sample program: the whole product as one instead,
                # whose runs beside 𝓗z (attention's J in Jᵀ 𝓗z J, 25 such terms) are made once each there
                return distributed if _fallbacks(distributed) < 2 else self._mean_fallback(e)
        for t in range(varying[0] + 1, varying[-1] + 1):
            # uᵢ wᵢᵀ with uᵢ = F₁…Fₜ a column and wᵢᵀ a row, or Lᵢ Rᵢ with both per-sample matrices
            # (Σᵢ Lᵢ Rᵢ = [L₁ … L_B] [R₁ᵀ … R_Bᵀ]ᵀ, the samples side by side: δZ Uᵀ of a convolution)
            left, right = product(f[:t], f[0].rows), product(f[t:], f[t].rows)
            outer = left.cols == ONE and right.rows == ONE
            if outer or (self.varies(left) and self.varies(right)):
                u, w = self.stack(left), self.stack(simplify(Transpose(right)))
                if u is not None and w is not None:
                    return self._averaged(MatMul(u, Transpose(w)))
        if len(varying) != 2:
            return None
        j, k = varying
        if isinstance(f[j], Diag) and isinstance(f[k], Diag):
            a, b = self.stack(f[j].args[0]), self.stack(f[k].args[0])
            if a is None or b is None:
                return None
            inner = f[j + 1 : k]
            h = Identity(f[j].cols) if not inner else inner[0] if len(inner) == 1 else MatMul(*inner)
            return around(Hadamard(h, self._averaged(MatMul(a, Transpose(b)))), j, k)
        if k == j + 1 and f[j].cols == ONE and f[k].rows == ONE:
            u, w = self.stack(f[j]), self.stack(simplify(Transpose(f[k])))
            if u is None or w is None:
                return None
            return around(self._averaged(MatMul(u, Transpose(w))), j, k)
        return None


def _fallbacks(e: Expr) -> int:
    """The batch means without a closed form in ``e``."""
    return 1 if isinstance(e, BatchMean) else sum(_fallbacks(c) for c in e.children)


def _unvec_operand(e: Expr) -> Expr | None:
    """v for unvec(v) written as the adjoint of vec, (vec(I_c)ᵀ ⊗ I_r)(I_c ⊗ v); else None."""
    if not (isinstance(e, MatMul) and len(e.args) == 2 and all(isinstance(a, Kron) for a in e.args)):
        return None
    (left, identity), (c, v) = e.args[0].args, e.args[1].args
    if isinstance(identity, Identity) and isinstance(c, Identity) and v.cols == ONE \
            and left == Transpose(Vec(Identity(c.rows))):
        return v
    return None


def _repeated(e: Expr) -> Expr | None:
    """The batch of a quantity shared by every sample: v 1_Bᵀ for a vector, and for a matrix that is a
    broadcast column, v 1_cᵀ, v 1_{c·B}ᵀ (a bias over positions); None for any other shared matrix."""
    e = simplify(e)
    if isinstance(e, Ones) and e.cols == ONE:  # 1_n 1_Bᵀ = 1_(n×B): a Hadamard factor that drops out
        return Ones(e.rows, BATCH)
    if e.cols == ONE:
        return MatMul(e, Ones(ONE, BATCH))
    if isinstance(e, MatMul) and isinstance(e.args[-1], Ones) and e.args[-1].rows == ONE:
        return MatMul(*e.args[:-1], Ones(ONE, e.cols * BATCH))
    return None


def _push_scale(s: Expr, m: Expr) -> Expr | None:
    """sᵢ Mᵢ with sᵢ moved onto a vector: s(A + B) = sA + sB, s diag(v) = diag(s v), s (u wᵀ) = (s u) wᵀ,
    s diag(u) M = diag(s u) M (a normalised layer's s² diag(x̂) 𝓗z diag(x̂): then the closed form of a
    mean of diag(a) H diag(b))."""
    if isinstance(m, Add):
        return Add(*[ScaleBy(s, t) for t in m.args])
    if isinstance(m, ScalarMul):
        return ScalarMul(m.coefficient, ScaleBy(s, m.operand))
    if isinstance(m, Diag):
        return Diag(ScaleBy(s, m.args[0]))
    if isinstance(m, MatMul):
        for i, f in enumerate(m.args):
            if f.cols == ONE:
                return MatMul(*m.args[:i], ScaleBy(s, f), *m.args[i + 1 :])
        if isinstance(m.args[0], Diag):
            return MatMul(Diag(ScaleBy(s, m.args[0].args[0])), *m.args[1:])
    return None


def _contains(e: Expr, leaf: Expr) -> bool:
    return any(node == leaf for node in e.walk())


# --- the batch rules of a module ---------------------------------------------------
def batch_forward(d: Derivation) -> Expr:
    """Z: the module's outputs for the batch, (size z × B)."""
    return _require(BatchLowering(d).stack(d.module.output), d, "forward pass")


def batch_gradient(d: Derivation, name: str) -> Expr:
    """δX (size x × B) for an input; Σᵢ δθᵢ for a parameter (δZ carries the mean's 1/B)."""
    return _batch_of_gradient(d, name, d.gradient(name), f"δ{name}")


def tangent_variables(d: Derivation, with_inputs: bool) -> tuple[str, ...]:
    """The variables that move in a directional derivative: all, or the parameters alone (a first
    layer, whose data does not move)."""
    return tuple(v.name for v in (d.module.variables if with_inputs else d.module.params))


def batch_jvp(d: Derivation, with_inputs: bool = True) -> Expr:
    """R{Z} (size z × B): the outputs' tangents, input tangents stacked like the inputs."""
    return _require(BatchLowering(d).stack(d.jvp(tangent_variables(d, with_inputs))), d, "tangent R{z}")


def batch_gradient_tangent(d: Derivation, name: str, with_inputs: bool = True) -> Expr:
    """R{δX} or R{Σᵢ δθᵢ}: :func:`batch_gradient` differentiated along the tangents and R{δZ}."""
    per_sample = d.gradient_tangent(name, tangent_variables(d, with_inputs))
    return _batch_of_gradient(d, name, per_sample, f"R{{δ{name}}}")


def _batch_of_gradient(d: Derivation, name: str, per_sample: Expr, what: str) -> Expr:
    lowering = BatchLowering(d)
    if d.module.symbol(name) in d.module.inputs:
        return _require(lowering.stack(per_sample), d, what)
    mean = simplify(lowering.mean(per_sample))  # B·(Σₜ (1/B)·Tₜ) = Σₜ Tₜ, term by term
    return simplify(Add(*[ScalarMul(BATCH, t) for t in mean.args]) if isinstance(mean, Add)
                    else ScalarMul(BATCH, mean))


def batch_hbp(d: Derivation, name: str, curvature: Curvature | str = Curvature.EXACT,
              approximation: Approximation | str = Approximation.MEAN_OF_SANDWICHES, terminal: bool = False) -> Expr:
    """𝓗̄v over a batch by approximation (6) or (7), structured (see the module docstring).

    ``terminal``: no curvature arrives from above (𝓗z = 0, the module is the loss, whose outputs
    are summed): the Gauss–Newton term E[Jᵀ 𝓗z J] vanishes and only the module's own second-order
    term is left: eq. (4a) where backpropagation starts, with δz = 1/B per sample for the batch mean."""
    curvature, approximation = Curvature.parse(curvature), Approximation.parse(approximation)
    lowering = BatchLowering(d, approximation, across_ranks=True)
    # Σᵢ Σₖ Hzₖ(xᵢ) δzᵢₖ per sample under both approximations: (7) averages the Jacobians of the
    # Gauss–Newton term only, as the authors' code does (bpexts/hbp/nonlinear.py, ``_residuum``:
    # einsum("bi,bi->i", φ″, δz) whatever ``average_input_jac``), which made the paper's CIFAR-10 figures
    concave = cast_concave(simplify(ScalarMul(SAMPLES, lowering.mean(d.second_order(name)))), curvature)
    if terminal:
        return simplify(concave)
    if approximation is not Approximation.SANDWICH_OF_MEANS:
        ggn = lowering.mean(d.gauss_newton(name))
    else:
        jacobian = simplify(lowering.mean(d.jacobian(name)))
        ggn = MatMul(Transpose(jacobian), d.Hz, jacobian)
    return simplify(Add(simplify(ggn), concave))


def _require(e: Expr | None, d: Derivation, what: str) -> Expr:
    if e is None:
        raise McalcError(f"module '{d.module.name}': the {what} has no batch form: mcalc lowers per-sample "
                         "vectors and matrices through products (batched where both factors are per sample), "
                         "transposes, sums, elementwise functions, softmax, unfold and fold, and this rule "
                         "uses an operation on per-sample values outside them (a per-sample inverse or diag, say)")
    return simplify(e)


