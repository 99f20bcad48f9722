"""Solving eq. (8) block by block: truncated CG on the current block, or the eigenbases of its
(averaged) factors kept over several steps, whichever a cost model says is cheaper.

For a block C = A ⊗ B the damped system [α I + β C] Δ = −δ is solved exactly in the eigenbases of
A and B (:class:`~mcalc.runtime.blocks.Eigenbasis`). Decomposing costs n³ + m³ once; each later
solve is four matrix products. Reusing a decomposition for ``refresh`` steps also lets the training
loop skip the curvature pass on the steps in between (as K-FAC reuses its inverses).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import McalcError
from ..runtime.backends import DISPATCH_FLOPS
from ..runtime.blocks import CurvatureBlock, Eigenbasis, GramFactor, dense_factor, factor_eigh, namespace
from .distributed import DataParallel
from .safeguards import is_linalg_error


@dataclass
class CGSolution:
    """CG's iterate, its residual b − A x (as CG updates it), its iteration count, and its step sizes αⱼ and
    ratios βⱼ = rᵀr (new) / rᵀr (old), from which :attr:`gain` follows."""

    x: Any
    residual: Any
    iterations: int
    steps: list[float]
    ratios: list[float]

    @property
    def gain(self) -> float:
        """CG's largest gain: Σⱼ 1/θⱼ over the Ritz values θⱼ of the Krylov space it searched (0 when it
        took no step); computed on the host when asked, since only eigen solves need it."""
        return lanczos_gain(self.steps, self.ratios)


def conjugate_gradient(matvec: Any, b: Any, tolerance: float, max_iterations: int) -> CGSolution:
    """Solve A x = b for symmetric positive definite A; stop when ‖r‖ ≤ tolerance·‖b‖ (eq. (8)'s ε_CG).

    After k steps x = q(A) b with q(μ) = (1 − Πⱼ(1 − μ/θⱼ))/μ, the θⱼ the eigenvalues of the Lanczos
    matrix T_k that CG's coefficients make (Saad 2003, Section 6.7.3): no direction of b is amplified
    by more than q(0) = Σⱼ 1/θⱼ = tr T_k⁻¹, the solution's ``gain``, however small its eigenvalue.
    """
    x = b * 0
    r = b.copy()
    p = r.copy()
    rr = float(r @ r)
    target = tolerance**2 * rr
    steps: list[float] = []
    ratios: list[float] = []
    for iteration in range(1, max_iterations + 1):
        if rr <= target:
            return CGSolution(x, r, iteration - 1, steps, ratios)
        Ap = matvec(p)
        alpha = rr / float(p @ Ap)
        x += alpha * p  # in place: x, r and p are CG's own arrays
        r -= alpha * Ap
        rr_new = float(r @ r)
        p *= rr_new / rr
        p += r
        steps.append(alpha)
        ratios.append(rr_new / rr)
        rr = rr_new
    return CGSolution(x, r, max_iterations, steps, ratios)


def lanczos_gain(steps: list[float], ratios: list[float]) -> float:
    """tr T_k⁻¹ for the Lanczos matrix of k CG steps with step sizes αⱼ and ratios βⱼ:
    T_jj = 1/αⱼ + βⱼ₋₁/αⱼ₋₁, T_j,j+1 = √βⱼ/αⱼ (Saad 2003, eq. (6.103)); host floats, on the CPU."""
    k = len(steps)
    if k == 0:
        return 0.0
    T = np.zeros((k, k))
    for j in range(k):
        T[j, j] = 1 / steps[j] + (ratios[j - 1] / steps[j - 1] if j else 0.0)
        if j + 1 < k:
            T[j, j + 1] = T[j + 1, j] = np.sqrt(ratios[j]) / steps[j]
    return float(np.sum(1 / np.linalg.eigvalsh(T)))


@dataclass(frozen=True)
class SolveCosts:
    """What the cost model charges, in flops of a matrix product on the backend.

    ``eigh``, ``eigh_fixed``: a symmetric eigen-decomposition of an n × n matrix costs
    ``eigh_fixed`` + ``eigh``·n³ (on a GPU the fixed part, the solver's own launches and
    synchronisations, outweighs the cubic one up to n ≈ 400).
    ``dispatch``: one array operation's fixed cost (Python, dispatch, launch), which
    dominates CG on small blocks.
    """

    eigh: float
    dispatch: float
    eigh_fixed: float = 0.0


COSTS = {  # the dispatch costs: runtime.backends.DISPATCH_FLOPS
    # Measured on the 2-core CPU of the README (NumPy, OpenBLAS): numpy.linalg.eigh of
    # n = 64…512 took as long as 17–58 n³ flops of that machine's GEMM.
    "numpy": SolveCosts(eigh=25.0, dispatch=DISPATCH_FLOPS["numpy"]),
    # Measured on an H100 (benchmarks/solve_costs.py, benchmarks/results/solve_costs_h100.json;
    # float32 GEMM 24 TFLOP/s): cupy.linalg.eigh took 0.9 ms at n = 64 and 11.4 ms at n = 1024,
    # fitted as 2e10 + 230 n³ flops.
    "cupy": SolveCosts(eigh=230.0, dispatch=DISPATCH_FLOPS["cupy"], eigh_fixed=2e10),
}

_CG_OPERATIONS = 14  # per CG iteration: the block's matvec (~6) and CG's axpys and dot products (~8)
_EIGEN_OPERATIONS = 6  # per eigenbasis solve: four products, a division, reshapes


def _factor_shapes(block: CurvatureBlock) -> tuple[int, int, int | None]:
    """(n, m, batch): C = A ⊗ B with A n × n (batch columns when A is an implicit GramFactor), B m × m;
    a dense block of size N is (1, N, None)."""
    if not block.kron:
        return 1, block.dense.shape[0], None
    a, b = block.kron[0]
    return a.shape[0], b.shape[0], a.p.shape[1] if isinstance(a, GramFactor) else None


def _matvec_flops(block: CurvatureBlock) -> float:
    """C v as vec(B V Aᵀ) (S.1), A applied through its batch matrix when it is a GramFactor."""
    n, m, batch = _factor_shapes(block)
    if not block.kron:
        return 2.0 * m * m
    return 2.0 * m * m * n + (4.0 * m * n * batch if batch else 2.0 * m * n * n)


def formation_flops(block: CurvatureBlock, costs: SolveCosts) -> float:
    """About what the curvature pass spent on the block: products of its factors' sizes
    (Wᵀ 𝓗 W is two of them), as many as one matvec, and ~10 array operations."""
    return _matvec_flops(block) + 10 * costs.dispatch


def cg_flops(block: CurvatureBlock, iterations: float, costs: SolveCosts) -> float:
    """One step by CG: the block formed, then ``iterations`` matvecs and CG's vector updates."""
    n, m, _ = _factor_shapes(block)
    per_iteration = _matvec_flops(block) + 10.0 * m * n + _CG_OPERATIONS * costs.dispatch
    return formation_flops(block, costs) + iterations * per_iteration


def eigen_flops(block: CurvatureBlock, refresh: int, costs: SolveCosts, decomposed: set[int]) -> float:
    """One step by the eigenbasis: forming and decomposing the block shared by ``refresh`` steps,
    then four products. A factor whose id is in ``decomposed`` is shared with a block counted
    before (:class:`Decompositions`) and costs nothing; the ids of this block's factors are added."""
    n, m, _ = _factor_shapes(block)
    decompose = 0.0
    for factor in block.factors():
        if id(factor) not in decomposed:
            decomposed.add(id(factor))
            size = factor.shape[0]
            forming = 2.0 * size * size * factor.p.shape[1] if isinstance(factor, GramFactor) else 0.0
            decompose += forming + costs.eigh_fixed + costs.eigh * size**3
    apply = 4.0 * m * m if not block.kron else 4.0 * m * n * (m + n)
    return (formation_flops(block, costs) + decompose) / refresh + apply + _EIGEN_OPERATIONS * costs.dispatch


class Decompositions:
    """The eigen-decompositions of one renewal's factors (the solver asks once per distinct factor:
    blocks that share one, a linear layer's bias block and the B factor of its weight block under (6),
    share its decomposition), counting the full ones and the corrected ones.

    A factor whose previous eigenvectors Q still nearly diagonalise it (the off-diagonal part of
    Qᵀ F Q at most ``tolerance`` of the whole, in Frobenius norm) keeps Q and takes diag(Qᵀ F Q)
    as its eigenvalues: the best ones for that basis (George et al. 2018), two products instead
    of an eigh. The others are decomposed anew.
    """

    def __init__(self, tolerance: float) -> None:
        self.tolerance = tolerance
        self.full = self.corrected = 0

    def __call__(self, factor: Any, previous: tuple[Any, Any] | None) -> tuple[Any, Any]:
        result = None
        if previous is not None and previous[1].shape[0] == factor.shape[0]:
            q = previous[1]
            rotated = q.T @ dense_factor(factor) @ q
            lam = rotated.diagonal().copy()
            whole, diagonal = float((rotated * rotated).sum()), float(lam @ lam)
            if whole - diagonal <= self.tolerance**2 * whole:
                result = (lam, q)
                self.corrected += 1
        if result is None:
            result = factor_eigh(factor)
            self.full += 1
        return result


class SharedAverage:
    """Running averages of blocks' factors, F ← d F + (1 − d) F_new, one renewal at a time.

    A factor that two blocks share (the same array, with the same average so far) is
    averaged once and stays shared, so :class:`Decompositions` still sees one matrix.
    """

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.done: dict[tuple[int, int], Any] = {}

    def __call__(self, average: CurvatureBlock | None, block: CurvatureBlock) -> CurvatureBlock:
        new = block.factors()
        old = None if average is None else average.factors()
        if old is not None and [f.shape for f in old] != [f.shape for f in new]:
            old = None
        out = []
        for i, factor in enumerate(new):
            key = (id(factor), id(old[i]) if old else 0)
            if key not in self.done:
                # the average owns its arrays: a block's may be written again after the step (a CUDA graph's are)
                self.done[key] = _owned(factor) if old is None else \
                    self.decay * old[i] + (1 - self.decay) * dense_factor(factor)
            out.append(self.done[key])
        return CurvatureBlock(dense=out[0]) if not block.kron else CurvatureBlock(kron=[(out[0], out[1])])


def _owned(factor: Any) -> Any:
    """A factor as a matrix of its own (a :class:`GramFactor` formed, an array copied)."""
    return factor.dense() if isinstance(factor, GramFactor) else factor.copy()


@dataclass
class BlockSolveState:
    """What one (sub-)block keeps between steps: its recent CG iteration counts, the largest gain of
    its last CG solve, the running average of its factors and that average's eigenbasis."""

    iterations: list[int] = field(default_factory=list)
    gain: float = 0.0
    average: CurvatureBlock | None = None
    basis: Eigenbasis | None = None

    def eigen_solve(self, g: Any, alpha: float) -> Any:
        """Δ = −[α I + (1 − α) C]⁻¹ δ in the stored eigenbasis, no direction amplified by more than the
        block's last CG solve could (its ``gain``, :func:`conjugate_gradient`)."""
        floor = 1 / self.gain if self.gain > 0 else 0.0
        return -self.basis.solve_damped(g, alpha, 1 - alpha, floor)

    def mean_iterations(self) -> float:
        return sum(self.iterations) / len(self.iterations)


@dataclass
class DampedBlockSolver:
    """Δ = −[α I + (1 − α) C]⁻¹ δ for every (sub-)block of eq. (8).

    ``method``:

    - ``'cg'``: the paper's truncated CG on the current block, every step.
    - ``'eigen'``: every ``refresh`` steps the blocks are computed, folded into running
      averages of their factors (decay ``decay`` per renewal) and decomposed (or only given
      new eigenvalues, see :class:`Decompositions`, ``basis_tolerance``); every step
      solves exactly in those eigenbases, and the steps in between need no curvature pass.
      The average matters: a single mini-batch's curvature kept for several steps fits
      that batch (measured on digits with tanh: steps that stall well below CG's accuracy),
      while averaged factors train as well as fresh CG (as K-FAC averages its factors).
    - ``'auto'``: every renewal is a CG step, which measures how many iterations each block
      needs; eigenbases serve the steps up to the next renewal only when they are both cheaper
      and as safe as CG. Cheaper: the flops of the two ways (:data:`COSTS`), summed over the
      network; the estimate counts the curvature passes the eigenbases save and each shared
      factor once, but every renewal as a full decomposition, so it leans to CG. Safe: the bases
      made at the last renewal (made whenever they are cheaper, also while CG serves), kept over
      the ``refresh`` steps since, give directions for the renewal's gradients within
      ``safe_deviation`` of CG's on the fresh blocks (relative, over the network). A basis kept
      over several steps goes stale as the weights move; measured over three epochs, the stale
      bases deviated from CG by 0.46–2.9 (mostly above 0.6) on MNIST-1D with two ReLU layers, where
      such bases diverged, and by 0.24–0.43 (once 0.78) on digits with sigmoid.

    Every eigen solve is damped so that no direction is amplified by more than the block's last CG
    solve could (the sum of the inverse Ritz values of its Krylov space): an exact solve with
    α = 0.02 would amplify a near-null direction 50×, where truncated CG leaves it alone.
    A block whose damped spectrum is not positive (exact curvature), or whose structure an
    eigenbasis does not cover, is solved by CG on its current block.
    """

    method: str = "cg"
    refresh: int = 5
    decay: float = 0.8
    tolerance: float = 0.1
    max_iterations: int = 50
    basis_tolerance: float = 0.2
    safe_deviation: float = 0.5
    steps: int = 0
    using_eigen: bool = False
    decompositions: int = 0
    corrections: int = 0
    states: dict[Any, BlockSolveState] = field(default_factory=dict)

    def needs_curvature(self) -> bool:
        """Whether the next step needs the current curvature blocks."""
        return not self.using_eigen or self.steps % self.refresh == 0 or any(
            s.basis is None for s in self.states.values())

    def solve(self, parts: list[tuple[Any, Any, CurvatureBlock | None]], alpha: float,
              parallel: DataParallel | None = None, products: dict[Any, Any] | None = None) -> dict[Any, Any]:
        """Directions for ``[(key, gradient, block or None)]``, one call per training step. With ``parallel``
        over several ranks each CG solve and each eigen-decomposition runs on one rank, the costliest first
        to the least loaded (as KAISA shares K-FAC's inverses out), and its result is all-reduced: every
        rank ends the step with the directions and the state of one process. ``products``, when given, is
        filled with C Δ (column-stacking vec) of every block CG solved, from CG's residual: the block
        model of the reduction ratio needs it, and a matvec of the block would cost what a CG iteration
        does."""
        parallel = parallel or DataParallel()
        out: dict[Any, Any] = {}
        if parts[0][2] is not None and self.steps % self.refresh == 0:
            self._renew(parts, alpha, out, parallel, products)
        jobs = []
        for key, g, block in parts:
            if key in out:
                continue
            state = self.states.get(key)
            if self.using_eigen and state is not None and state.basis is not None:
                out[key] = state.eigen_solve(g, alpha)
            elif block is None:
                raise McalcError(f"no curvature block for {key} and no eigenbasis to reuse: this step needs "
                                 "the curvature pass (ask needs_curvature())")
            else:
                jobs.append((key, g, block))
        out.update(self._cg(jobs, alpha, parallel, products))
        self.steps += 1
        return out

    def _renew(self, parts: list[tuple[Any, Any, CurvatureBlock | None]], alpha: float, out: dict[Any, Any],
               parallel: DataParallel, products: dict[Any, Any] | None) -> None:
        """Choose the way for the next steps and, where eigenbases are cheaper, average and decompose the
        blocks (under ``auto`` also while CG serves, to measure how stale a kept basis gets)."""
        previous, jobs = {}, []
        for key, g, block in parts:
            state = self.states.setdefault(key, BlockSolveState())
            # the basis made at the last renewal, with the gain it was floored by
            previous[key] = None if state.basis is None else BlockSolveState(gain=state.gain, basis=state.basis)
            state.basis = None
            if self.method != "eigen" or not state.iterations:  # eigen: one CG solve measures the gain
                jobs.append((key, g, block))
        out.update(self._cg(jobs, alpha, parallel, products))
        cheaper = self.method == "eigen" or (self.method == "auto" and self._eigen_is_cheaper(parts))
        average, kept = SharedAverage(self.decay), []
        for key, _, block in parts:
            state = self.states[key]
            if not (cheaper and block.single_term):
                state.average = None
                continue
            state.average = average(state.average, block)
            old = previous[key].basis.pairs if previous[key] is not None else [None] * len(block.factors())
            kept.append((key, list(zip(state.average.factors(), old))))
        for key, pairs in self._decompose(kept, parallel).items():
            state = self.states[key]
            if pairs is None:  # a decomposition failed: CG solves it
                state.average = None
                continue
            basis = Eigenbasis(pairs)
            if alpha + (1 - alpha) * float(basis.spectrum.min()) > 0:
                state.basis = basis
        self.using_eigen = self.method == "eigen" or (cheaper and self._eigen_is_safe(parts, previous, alpha, out))

    def _decompose(self, blocks: list[tuple[Any, list[tuple[Any, tuple[Any, Any] | None]]]],
                   parallel: DataParallel) -> dict[Any, list[tuple[Any, Any]] | None]:
        """The eigenpairs of every block's averaged factors (each distinct factor once, by
        :class:`Decompositions`, on the rank its n³ assigns it), given ``[(key, [(factor, previous
        pairs)])]``; None for a block one of whose factors would not decompose."""
        factors: dict[int, tuple[Any, tuple[Any, Any] | None, Any]] = {}  # by identity: factor, previous, a key
        for key, pairs in blocks:
            for factor, old in pairs:
                factors.setdefault(id(factor), (factor, old, key))
        entries, decompose = list(factors.values()), Decompositions(self.basis_tolerance)

        def zeros(job: int, how: float) -> dict[str, Any]:
            factor = entries[job][0]
            xp, n = namespace(factor), factor.shape[0]
            return {"lam": xp.zeros(n, dtype=factor.dtype), "q": xp.zeros((n, n), dtype=factor.dtype), "how": how}

        def decomposed(job: int) -> dict[str, Any]:  # how: 1 decomposed, 2 corrected, 3 failed
            factor, old, key = entries[job]
            full = decompose.full
            try:
                lam, q = decompose(factor, old)
            except Exception as exc:
                if not is_linalg_error(exc):
                    raise
                warnings.warn(f"the eigen-decomposition of {key}'s factors failed ({exc}); CG solves it",
                              RuntimeWarning, stacklevel=4)
                return zeros(job, 3.0)
            return {"lam": lam, "q": q, "how": 1.0 if decompose.full > full else 2.0}

        costs = [float(f.shape[0]) ** 3 for f, _, _ in entries]
        shared = parallel.share(costs, decomposed, lambda job: zeros(job, 0.0))
        result: dict[int, tuple[Any, Any] | None] = {}
        for identity, done in zip(factors, shared):
            how = round(done["how"])
            self.decompositions += how == 1
            self.corrections += how == 2
            result[identity] = None if how == 3 else (done["lam"], done["q"])
        return {key: None if any(result[id(f)] is None for f, _ in pairs) else [result[id(f)] for f, _ in pairs]
                for key, pairs in blocks}

    def _eigen_is_safe(self, parts: list[tuple[Any, Any, CurvatureBlock | None]],
                       previous: dict[Any, BlockSolveState | None], alpha: float, cg: dict[Any, Any]) -> bool:
        """Whether the bases made at the last renewal, kept over ``refresh`` steps, still give directions
        within ``safe_deviation`` of CG's ``cg`` on this renewal's fresh blocks, over the network (never
        before one such measurement)."""
        deviation = total = 0.0
        for key, g, _ in parts:
            state = previous[key]
            if state is None:
                return False
            difference = state.eigen_solve(g, alpha) - cg[key]
            deviation += float((difference * difference).sum())
            total += float((cg[key] * cg[key]).sum())
        return total > 0 and deviation <= self.safe_deviation**2 * total

    def _eigen_is_cheaper(self, parts: list[tuple[Any, Any, CurvatureBlock | None]]) -> bool:
        eligible = [(key, block) for key, _, block in parts if block.single_term]
        if not eligible:
            return False
        costs = COSTS["cupy" if namespace(parts[0][1]).__name__ == "cupy" else "numpy"]
        decomposed: set[int] = set()
        by_cg = sum(cg_flops(block, self.states[key].mean_iterations(), costs) for key, block in eligible)
        by_eigen = sum(eigen_flops(block, self.refresh, costs, decomposed) for _, block in eligible)
        return by_eigen < by_cg

    def _cg(self, jobs: list[tuple[Any, Any, CurvatureBlock]], alpha: float, parallel: DataParallel,
            products: dict[Any, Any] | None = None) -> dict[Any, Any]:
        """Truncated CG on each ``(key, gradient, block)``, on the rank its expected cost assigns it; the
        directions, iteration counts and gains all-reduced to every rank's states, and, into ``products``,
        C Δ = (b − r − α Δ)/(1 − α) from the residual r of [α I + (1 − α) C] Δ = b (none at α = 1)."""
        with_products = products is not None and alpha < 1
        states = [self.states.setdefault(key, BlockSolveState()) for key, _, _ in jobs]
        costs = [_matvec_flops(block) * (state.mean_iterations() if state.iterations else self.max_iterations)
                 for (_, _, block), state in zip(jobs, states)]

        def solved(job: int) -> dict[str, Any]:
            _, g, block = jobs[job]
            def matvec(v: Any) -> Any:  # [α I + (1 − α) C] v
                out = block.matvec(v)  # a new array: scaled in place
                out *= 1 - alpha
                out += alpha * v
                return out

            b = -g.reshape(-1, order="F")
            solution = conjugate_gradient(matvec, b, self.tolerance, self.max_iterations)
            done = {"x": solution.x.reshape(g.shape, order="F"), "n": float(solution.iterations),
                    "gain": solution.gain if self.method != "cg" else 0.0}  # only eigen solves are floored by it
            if with_products:
                done["Cx"] = (b - solution.residual - alpha * solution.x) / (1 - alpha)
            return done

        def nothing(job: int) -> dict[str, Any]:  # another rank's job: zeros of its results' shapes
            g = jobs[job][1]
            return {"x": g * 0, "n": 0.0, "gain": 0.0, **({"Cx": g.reshape(-1) * 0} if with_products else {})}

        out = {}
        shared = parallel.share(costs, solved, nothing)
        for (key, _, _), state, done in zip(jobs, states, shared):
            state.iterations.append(round(done["n"]))
            del state.iterations[:-10]  # the recent ones: how hard the blocks are now
            if self.method != "cg":
                state.gain = done["gain"]
            out[key] = done["x"]
            if with_products:
                products[key] = done["Cx"]
        return out
