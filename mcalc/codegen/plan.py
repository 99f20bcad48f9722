"""Kernel plans: a module's batch rules as straight-line programs.

A program is a list of steps ``tK = op(children)`` in dependency order, with
common subexpressions computed once across every rule of the function. A
backend decides what runs where from the steps' nodes: matrix products go to
BLAS / cuBLAS, and the CUDA backend fuses elementwise steps and the row sums
they feed into kernels (:mod:`mcalc.codegen.cuda`).

Curvature blocks are never expanded: a rule Σⱼ cⱼ (Aⱼ ⊗ Bⱼ) + M is planned as
its factors Aⱼ, Bⱼ and the dense remainder M (see :class:`BlockPlan`).
"""
from __future__ import annotations

import keyword
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple, TypeVar

import sympy as sp

from ..calculus.derivation import Derivation
from ..errors import McalcError
from ..expr import (
    BATCH,
    ONE,
    Add,
    BatchMean,
    Diag,
    Expr,
    Fold,
    Gram,
    Hadamard,
    Identity,
    Kron,
    MatMul,
    Ones,
    RankSum,
    ScalarMul,
    ScaleBy,
    Seed,
    Stacked,
    Symbol,
    Transpose,
    Unfold,
    UnfoldMatrix,
    UnfoldSpec,
    WindowArgmax,
    Zero,
    is_broadcast,
    tangent_of,
)
from ..modes import APPROXIMATIONS, CURVATURES, Approximation, Curvature
from ..runtime.generated_code import PATCHES_KEY
from ..simplification import simplify
from ..simplification.expansion import expanded_runs
from ..simplification.fusion import for_codegen
from ..simplification.scale_placement import place_scales
from ..simplification.shared_runs import share_runs
from ..simplification.symmetric import pair_transposes
from .batch import (
    batch_forward,
    batch_gradient,
    batch_gradient_tangent,
    batch_hbp,
    batch_jvp,
)

_IDENT = re.compile(r"[^0-9A-Za-z_]")


def sanitise(name: str) -> str:
    """A user's name as a safe identifier for generated code."""
    clean = _IDENT.sub("_", name)
    if not clean or clean[0].isdigit() or keyword.iskeyword(clean):
        clean = "_" + clean
    return clean


# --- what a program refers to: data, printed by the backends' printers ---------------------------
@dataclass(frozen=True)
class Argument:
    """A value a generated function reads from its arguments: ``P[key]`` (the parameters), ``S[key]``
    (the batch), ``V[key]`` (the directions of a curvature product), or an argument of its own without
    a key (``Hz``, the curvature arriving from above)."""

    table: str
    key: str | None = None


@dataclass(frozen=True)
class Column:
    """A batch argument as a stack of its samples, as a per-sample rule run over the batch reads it."""

    of: Argument


class InPlace:
    """The reference of a constant (ones, an identity, zeros): printed where it is read, never a step."""

    def __repr__(self) -> str:
        return "IN_PLACE"


IN_PLACE = InPlace()
Reference = str | Argument | Column | InPlace  # a str is a step's target: a temporary of the function


@dataclass(frozen=True)
class BatchColumns:
    """The batch size B: the columns of δZ, else of any per-sample argument, else 1 (a module of
    parameters alone)."""


@dataclass(frozen=True)
class SampleCount:
    """B_all, the samples a batch mean is over: B in one process, every rank's shard together when
    the runtime sums over the ranks of data parallelism (:mod:`mcalc.runtime.rank_sum`)."""


@dataclass(frozen=True)
class Axis:
    """A dimension read off an argument: its extent along ``axis``."""

    argument: Argument
    axis: int


DimensionSource = BatchColumns | SampleCount | Axis


@dataclass
class Step:
    """``target = node(children)``."""

    target: str
    node: Expr


@dataclass
class BlockPlan:
    """A curvature block Σⱼ sⱼ (Aⱼ ⊗ Bⱼ) + M: the references of the factors and of the dense part; a
    scale sⱼ is a (1 × 1) array's reference or a number (a SymPy expression such as 1/B)."""

    kron: list[tuple[Reference | sp.Expr, Reference, Reference]] = field(default_factory=list)  # (s, A, B)
    dense: Reference | None = None
    order: sp.Expr = ONE  # the block's side (the variable's size): a block with no parts is zero


@dataclass
class Program:
    """Steps computing a set of named results."""

    steps: list[Step] = field(default_factory=list)
    results: dict[str, Reference | BlockPlan] = field(default_factory=dict)
    fallbacks: list[tuple[str, Program, tuple[Expr, ...]]] = field(default_factory=list)
    names: dict[Expr, Reference] = field(default_factory=dict)  # how each node is referred to
    # results that are per-sample matrices (rows × cols each), computed side by side (rows, cols·B) and
    # returned as the batch arguments are passed, (rows, B, cols): their rows
    sample_rows: dict[str, sp.Expr] = field(default_factory=dict)

    def result_names(self) -> list[Reference]:
        """The references the results read: a result, or a block's array scales, factors and dense part."""
        return [name for result in self.results.values()
                for name in ([result] if not isinstance(result, BlockPlan) else
                             [part for triple in result.kron for part in triple] + [result.dense])
                if name is not None and not isinstance(name, (sp.Expr, InPlace))]

    def readers(self) -> dict[Reference, list[Expr]]:
        """The nodes of the steps that read each reference, once per read (diag(v) in a product or sum
        reads v)."""
        out: dict[Reference, list[Expr]] = {}
        for s in self.steps:
            for child in s.node.children:
                for read in read_by(s.node, child):
                    name = self.names.get(read)
                    if name is not None and name is not IN_PLACE:
                        out.setdefault(name, []).append(s.node)
        return out

    def use_counts(self) -> dict[Reference, int]:
        """How often each reference is read: once per step that reads it, twice for a result, which is also
        read outside."""
        uses = {name: len(nodes) for name, nodes in self.readers().items()}
        for name in self.result_names():
            uses[name] = uses.get(name, 0) + 2
        return uses

    def overwritable(self, invariant: set[str]) -> set[str]:
        """Steps whose array a later step may write into: read once, and not a loop invariant that
        a cache keeps for later calls."""
        uses = self.use_counts()
        return {s.target for s in self.steps if uses.get(s.target) == 1 and s.target not in invariant}


class ProgramBuilder:
    """Builds a :class:`Program`, naming every distinct node once (common subexpressions)."""

    def __init__(self, prefix: str = "t") -> None:
        self.program = Program()
        self.names = self.program.names
        self.prefix = prefix
        self._separated: dict[Expr, Expr] = {}

    def leaf_name(self, node: Expr) -> Argument | None:
        if isinstance(node, Stacked):  # a per-sample matrix is a step: its samples side by side
            return batch_reference(node.args[0]) if node.args[0].cols == ONE else None
        if isinstance(node, Symbol):
            return Argument("P", node.name)
        if isinstance(node, Seed):
            return seed_reference(node)
        return None

    def _broadcasts_apart(self, node: Expr) -> Expr:
        """``node`` with every product that broadcasts a column, (A … v) 1ᵀ, written as the column (A … v)
        times 1ᵀ (and 1 (wᵀ … B) alike): the column is then a step of its own, which a kernel reads in
        place at row r, instead of an n × B array made by broadcasting and copied to be read."""
        if node not in self._separated:
            kids = node.children
            out = node.rebuild([self._broadcasts_apart(c) for c in kids]) if kids else node
            if isinstance(out, ScalarMul) and is_broadcast(out.args[1]):  # c (v 1ᵀ) = (c v) 1ᵀ: c scales v alone
                c, (left, right) = out.args[0], out.args[1].args
                # c (1 w 1ᵀ) = (c (1 w)) 1ᵀ = (1 (c w)) 1ᵀ: the scaled part split again
                scaled = ((self._broadcasts_apart(ScalarMul(c, left)), right) if isinstance(right, Ones) else
                          (left, self._broadcasts_apart(ScalarMul(c, right))))
                out = MatMul(*scaled)
            if isinstance(out, MatMul) and len(out.args) > 2:
                first, last = out.args[0], out.args[-1]
                # the rest split again: 1 (… v) 1ᵀ broadcasts both ways, and each name must be of a split node
                if isinstance(last, Ones) and last.rows == ONE:
                    out = MatMul(self._broadcasts_apart(MatMul(*out.args[:-1])), last)
                elif isinstance(first, Ones) and first.cols == ONE:
                    out = MatMul(first, self._broadcasts_apart(MatMul(*out.args[1:])))
            self._separated[node] = self._separated[out] = out
        return self._separated[node]

    def ref(self, node: Expr) -> Reference:
        node = self._broadcasts_apart(for_codegen(node))
        if node in self.names:
            return self.names[node]
        leaf = self.leaf_name(node)
        if leaf is not None:
            self.names[node] = leaf
            return leaf
        if isinstance(node, (Ones, Identity, Zero)):
            self.names[node] = IN_PLACE
            return IN_PLACE
        if isinstance(node, BatchMean):
            return self._fallback(node)
        flipped = self._named_transpose(node)
        computed = node if flipped is None else Transpose(flipped)  # Mᵀ where M is a step already: a view
        if computed in self.names:
            self.names[node] = self.names[computed]
            return self.names[node]
        for child in computed.children:
            for read in read_by(computed, child):
                self.ref(read)
        target = f"{self.prefix}{len(self.program.steps)}"
        self.program.steps.append(Step(target, computed))
        self.names[node] = self.names[computed] = target
        return target

    def _named_transpose(self, node: Expr) -> Expr | None:
        """M for a node equal to Mᵀ where M is a step already (xᵀ − (1/n) xᵀ 1 1ᵀ, say, beside the
        centred x − (1/n) 1 1ᵀ x): the node is then read as a view of M's array, not computed again."""
        if isinstance(node, (Transpose, Symbol, Seed)) or node.is_scalar or node.symmetric or is_broadcast(node):
            return None  # a broadcast v 1ᵀ is read through v, which must be a step of its own
        flipped = self._broadcasts_apart(simplify(Transpose(node)))
        if flipped == node or not isinstance(self.names.get(flipped), str):
            return None
        return flipped

    def named_result(self, name: str, node: Expr, sample: Expr | None = None) -> None:
        """The result ``name``: ``node``; with ``sample``, the batch of that per-sample vector or matrix
        (a matrix is returned as the batch arguments are passed)."""
        self.program.results[name] = self.result(node)
        if sample is not None and sample.cols != ONE:
            self.program.sample_rows[name] = sample.rows

    def result(self, node: Expr) -> Reference:
        """The reference of a value the function returns: a constant one (an identity block, say) is
        computed by a step of its own, since a result needs a name."""
        reference = self.ref(node)
        if reference is not IN_PLACE:
            return reference
        target = f"{self.prefix}{len(self.program.steps)}"
        self.program.steps.append(Step(target, self._broadcasts_apart(node)))
        return target

    def _fallback(self, node: BatchMean) -> str:
        operand, leaves = node.args
        operand = expanded_runs(operand)  # no sum inside a chain of structured factors: its terms apply them
        inner = ProgramBuilder(prefix=f"f{len(self.program.fallbacks)}_")
        for leaf in leaves:  # per-sample columns inside the loop
            inner.names[leaf] = Column(batch_reference(leaf))
        if isinstance(operand, Kron):  # E[Aᵢ ⊗ Bᵢ] as one product over the samples (runtime kron_mean)
            inner.program.results["left"] = inner.result(operand.args[0])
            inner.program.results["right"] = inner.result(operand.args[1])
        else:
            inner.program.results["value"] = inner.result(operand)
        name = f"_mean{len(self.program.fallbacks)}"
        self.program.fallbacks.append((name, inner.program, leaves))
        target = f"{self.prefix}{len(self.program.steps)}"
        self.program.steps.append(Step(target, node))
        self.names[node] = target
        return target

    def blocks(self, rules: dict[str, Expr]) -> dict[str, BlockPlan]:
        """Plan curvature blocks together: each one's Kronecker terms as factors, the rest dense, and the
        runs of factors their products share computed once (:func:`.shared_runs.share_runs`)."""
        terms = {name: BlockTerms.of(rule) for name, rule in rules.items()}
        nodes = [node for t in terms.values() for node in t.nodes()]
        shared = iter(place_scales(share_runs(nodes), _reads_seeds(CHANGING_SEEDS["hbp"])))
        return {name: self._named(t.with_nodes([next(shared) for _ in t.nodes()])) for name, t in terms.items()}

    def _named(self, terms: BlockTerms) -> BlockPlan:
        plan = BlockPlan(order=terms.order)
        for scale, left, right in terms.kron:
            plan.kron.append((self.result(scale) if isinstance(scale, Expr) else scale, self.result(left),
                              self.result(right)))
        if terms.dense is not None:
            plan.dense = self.result(terms.dense)
        return plan


@dataclass
class BlockTerms:
    """A curvature block before its steps are named: Σⱼ sⱼ (Aⱼ ⊗ Bⱼ) + M, each scale sⱼ a number (a
    SymPy expression such as 1/B) or a (1 × 1) array's expression, and M (symmetric) or None."""

    order: sp.Expr
    kron: list[tuple[sp.Expr | Expr, Expr, Expr]]
    dense: Expr | None

    @classmethod
    def of(cls, rule: Expr) -> BlockTerms:
        kron, dense = [], []
        for term in rule.args if isinstance(rule, Add) else (rule,):
            factors = _kron_factors(term)
            if factors is None:
                dense.append(term)
                continue
            coefficient, scale, left, right = factors
            left, right = _implicit_gram(left), _implicit_gram(right)
            if scale is None:  # a number (1/B) rides on a Gram factor's product, where it costs nothing
                if (folded := _scaled_gram(left, coefficient)) is not None:
                    left, coefficient = folded, ONE
                elif (folded := _scaled_gram(right, coefficient)) is not None:
                    right, coefficient = folded, ONE
            # A number (1/B) stays a number: an array scale would cost a kernel and its own dtype.
            kron.append((simplify(ScalarMul(coefficient, scale)) if scale is not None else coefficient, left, right))
        remainder = dense[0] if len(dense) == 1 else Add(*dense) if dense else None
        if remainder is None or isinstance(remainder, Zero):  # a zero block has no dense part
            return cls(rule.rows, kron, None)
        return cls(rule.rows, kron, pair_transposes(remainder))  # a block is symmetric

    def nodes(self) -> list[Expr]:
        """Every expression it holds, in order: array scales, factors, the dense part."""
        out = [e for term in self.kron for e in term if isinstance(e, Expr)]
        return out + ([self.dense] if self.dense is not None else [])

    def with_nodes(self, nodes: list[Expr]) -> BlockTerms:
        """The same block over new expressions, in the order of :meth:`nodes`."""
        it = iter(nodes)
        kron = [tuple(next(it) if isinstance(e, Expr) else e for e in term) for term in self.kron]
        return BlockTerms(self.order, kron, next(it) if self.dense is not None else None)


def seed_reference(seed: Seed) -> Argument:
    """Where generated code reads a seed: 𝓗z is an argument, δZ is S['dz'], and the R-operator's
    directions are in V (a variable's tangent under its name, R{δZ} under 'dz')."""
    variable = tangent_of(seed)
    if variable is not None:
        return Argument("V", variable)
    return {"Hz": Argument("Hz"), "dz": Argument("S", "dz"), "Rdz": Argument("V", "dz")}[seed.kind]


def batch_reference(leaf: Expr) -> Argument:
    """Where generated code reads the batch of a per-sample leaf (an input, a label, δz, a tangent)."""
    return seed_reference(leaf) if isinstance(leaf, Seed) else Argument("S", leaf.name)


def read_by(parent: Expr, child: Expr) -> tuple[Expr, ...]:
    """What of ``child`` the printer reads when it writes ``parent``: a diagonal through its vector, a
    Kronecker factor of a product through its factors (identities need nothing), never formed; a
    batch argument reads no step."""
    if isinstance(parent, Stacked):
        return ()
    if isinstance(parent, Fold) and (repeated := repeated_patches(parent)) is not None:
        return tuple(a for a in repeated if a is not None)  # folded tap by tap (runtime fold_repeated)
    if isinstance(parent, MatMul) and (selected := selected_taps(parent)) is not None:
        return selected  # each window's selected input read (runtime select_taps), the patches never made
    if isinstance(parent, WindowArgmax):
        return (window_inputs(parent)[0],)  # the maxima read from the input's windows (runtime window_argmax)
    if isinstance(parent, (Add, MatMul)):
        core = child.operand if isinstance(child, ScalarMul) and isinstance(parent, Add) else child
        if isinstance(core, Diag):
            return (core.args[0],)
        if isinstance(core, Identity) and isinstance(parent, Add):
            return (core,)
        if isinstance(core, Kron) and isinstance(parent, MatMul):
            return tuple(f for f in core.args if not isinstance(f, Identity))
        if isinstance(parent, MatMul) and isinstance(core.args[0] if isinstance(core, Transpose) else core,
                                                     UnfoldMatrix):
            return ()  # an index map, applied by unfold and fold
    return (child,)


def repeated_patches(fold: Expr) -> tuple[Expr, Expr | None] | None:
    """(v, M) for the fold of patches (v ⊗ 1_taps) ⊙ M, (v, None) for that of v ⊗ 1_taps (max and average
    pooling's δX from their δZ, one value per window read at each of its taps); else None."""
    patches, spec, _ = fold.args
    factors = patches.args if isinstance(patches, Hadamard) and len(patches.args) == 2 else (patches,)
    for i, f in enumerate(factors):
        if (isinstance(f, Kron) and isinstance(f.args[1], Ones) and f.args[1].cols == ONE
                and f.args[1].rows == spec.taps):
            return f.args[0], (factors[1 - i] if len(factors) == 2 else None)
    return None


def selected_taps(product: Expr) -> tuple[Expr, Expr] | None:
    """(Y, M) for (I ⊗ 1_tapsᵀ)(M ⊙ unfold(Y)), M a :class:`WindowArgmax` of the same windows: the input each
    window selected, max pooling's output (Y = X) and its tangent (Y = V); else None."""
    if not (isinstance(product, MatMul) and len(product.args) == 2):
        return None
    left, patches = product.args
    if not (isinstance(left, Kron) and isinstance(left.args[0], Identity) and isinstance(left.args[1], Ones)
            and left.args[1].rows == ONE and isinstance(patches, Hadamard) and len(patches.args) == 2):
        return None
    for mask, unfolded in (patches.args, reversed(patches.args)):
        if (isinstance(mask, WindowArgmax) and isinstance(unfolded, Unfold) and unfolded.args[1:] == mask.args[1:]
                and left.args[1].cols == mask.args[1].taps):
            return unfolded.args[0], mask
    return None


def window_inputs(mask: WindowArgmax) -> tuple[Expr, UnfoldSpec, sp.Tuple]:
    """(X, spec, size) of a window mask M(unfold X): the input whose windows the mask is read from. mcalc
    makes a mask of patches only so (:func:`mcalc.symbols.max_pooling`)."""
    patches, spec, size = mask.args
    if not (isinstance(patches, Unfold) and patches.args[1:] == (spec, size)):
        raise McalcError(f"a window mask reads the windows of an input; {patches} is no unfold of one under {spec}")
    return patches.args[0], spec, size


def _implicit_gram(factor: Expr) -> Expr:
    """A thin Gram matrix P Pᵀ (P with B columns, or one) as a :class:`Gram` factor, formed or kept
    implicit at run time: X Xᵀ in (6), the rank-one (X 1)(X 1)ᵀ in (7); summed over ranks, the sum of
    every rank's Gram matrix (formed on more than one rank)."""
    if isinstance(factor, RankSum):
        return RankSum(_implicit_gram(factor.args[0]))
    if not isinstance(factor, MatMul) or len(factor.args) % 2:
        return factor
    half = len(factor.args) // 2
    left, right = factor.args[:half], factor.args[half:]
    if any(simplify(Transpose(a)) != b for a, b in zip(left, reversed(right))):
        return factor
    p = left[0] if half == 1 else MatMul(*left)
    return Gram(p) if p.cols in (BATCH, sp.Integer(1)) else factor


def _scaled_gram(factor: Expr, coefficient: sp.Expr) -> Expr | None:
    """c·P Pᵀ for a Gram factor P Pᵀ (or a sum of them over the ranks, c being the same on every rank),
    so that the product forming it scales it (cuBLAS's alpha); None for any other factor or c = 1."""
    if coefficient == 1:
        return None
    if isinstance(factor, RankSum) and BATCH not in sp.sympify(coefficient).free_symbols:
        inner = _scaled_gram(factor.args[0], coefficient)
        return None if inner is None else RankSum(inner)
    if isinstance(factor, Gram) and factor.scale == 1:
        return Gram(factor.args[0], coefficient)
    return None


def _kron_factors(term: Expr) -> tuple[sp.Expr, Expr | None, Expr, Expr] | None:
    """c·s·(A ⊗ B) as (the number c, the (1×1) array scale s or None, A, B).

    Which factor absorbs the scale is decided at run time, from the sizes: the
    smaller one (a cost model the generated ``_kron`` applies).
    """
    coefficient, scales = sp.Integer(1), []
    while isinstance(term, (ScalarMul, ScaleBy)):
        if isinstance(term, ScalarMul):
            coefficient *= term.args[0]
        else:
            scales.append(term.args[0])
        term = term.args[1]
    if not isinstance(term, Kron):
        return None
    scale = None if not scales else scales[0] if len(scales) == 1 else MatMul(*scales)
    return coefficient, scale, term.args[0], term.args[1]


# --- the functions a module's generated code provides ----------------------------------
K = TypeVar("K")


class HBPKey(NamedTuple):
    """What one HBP function of a module computes."""

    curvature: Curvature
    approximation: Approximation
    with_inputs: bool  # the inputs' blocks too, or the parameters' alone

    @property
    def function_name(self) -> str:
        inputs = "all" if self.with_inputs else "params"
        return f"_hbp_{self.curvature.identifier}_{self.approximation.identifier}_{inputs}"


def distinct_programs(programs: dict[K, Program]) -> tuple[dict[K, Program], dict[K, K]]:
    """The programs that differ, each under the first key that has it, and every key's alias to it: the
    modes that coincide for a module (for Linear, whose output is linear in its inputs and
    parameters, every curvature mode is the Gauss–Newton one) are generated once."""
    kept: dict[K, Program] = {}
    aliases: dict[K, K] = {}
    for key, program in programs.items():
        aliases[key] = next((k for k, p in kept.items() if p == program), key)
        kept.setdefault(aliases[key], program)
    return kept, aliases


@dataclass
class ModulePlan:
    """Every program of one module: forward, gradients, the R-operator's tangents, and HBP per
    curvature and approximation."""

    name: str
    derivation: Derivation
    forward: Program
    gradients: dict[str, Program]  # of every variable ('all'), the parameters alone, or the inputs alone
    jvp: dict[bool, Program]  # R{Z}; parameters alone only where the module has parameters
    rgradients: dict[bool, Program]  # R{δv} of every variable (Pearlmutter's R-backprop)
    hbp: dict[HBPKey, Program]  # the distinct programs, each under the first key that has it
    hbp_aliases: dict[HBPKey, HBPKey]  # every key → the key its program is kept under
    loss_hessian: dict[Approximation, Program]  # HBP's start, 𝓗z = 0 (a module with one output), distinct
    loss_aliases: dict[Approximation, Approximation]  # every approximation → the one its program is kept under
    dims: dict[str, DimensionSource]  # dimension name → where to read it off the arguments
    per_sample: list[str]
    params: list[str]

    def families(self) -> dict[str, dict]:
        """The keyed programs, by the function family the templates print them as."""
        return {"gradients": self.gradients, "jvp": self.jvp, "rgradients": self.rgradients, "hbp": self.hbp,
                "loss_hessian": self.loss_hessian}

    def keyed_programs(self) -> list[tuple[str, Program]]:
        """Every program with the name of its family, the forward pass first."""
        return [("forward", self.forward), *[(family, p) for family, programs in self.families().items()
                                             for p in programs.values()]]

    def programs(self) -> list[Program]:
        return [p for _, p in self.keyed_programs()]


def plan_module(d: Derivation) -> ModulePlan:
    m = d.module
    forward = ProgramBuilder()
    forward.named_result("Z", batch_forward(d), m.output)
    # A first layer's input needs no gradient or curvature: a second program skips that work. A pass of
    # adjoints alone (K-FAC's per-class statistics) needs no parameter gradients: a third.
    wanted = {True: m.variables, False: m.params}
    gradients: dict[str, Program] = {}
    jvp: dict[bool, Program] = {}
    rgradients: dict[bool, Program] = {}
    kept = {"all": m.variables, "params": m.params, **({"inputs": m.inputs} if m.params else {})}
    for key, variables in kept.items():
        builder = ProgramBuilder()
        for v in variables:
            builder.named_result(v.name, batch_gradient(d, v.name), v if v in m.inputs else None)
        gradients[key] = builder.program
    for with_inputs, variables in wanted.items():
        if not variables:
            continue  # nothing moves: a module without parameters has no parameters-only tangent
        builder = ProgramBuilder()
        builder.named_result("Z", batch_jvp(d, with_inputs), m.output)
        jvp[with_inputs] = builder.program
        builder = ProgramBuilder()
        for v in variables:
            builder.named_result(v.name, batch_gradient_tangent(d, v.name, with_inputs), v if v in m.inputs else None)
        rgradients[with_inputs] = builder.program
    def blocks(variables: tuple, curvature: Curvature, approximation: Approximation, terminal: bool = False) -> Program:
        builder = ProgramBuilder()
        builder.program.results.update(builder.blocks(
            {v.name: batch_hbp(d, v.name, curvature, approximation, terminal) for v in variables}))
        return builder.program

    hbp, hbp_aliases = distinct_programs({
        HBPKey(curvature, approximation, with_inputs): blocks(variables, curvature, approximation)
        for curvature in CURVATURES for approximation in APPROXIMATIONS for with_inputs, variables in wanted.items()})
    # a loss (one number per sample) starts HBP: nothing arrives from above
    loss_hessian, loss_aliases = distinct_programs(
        {approximation: blocks(m.variables, Curvature.EXACT, approximation, terminal=True)
         for approximation in APPROXIMATIONS} if m.output.rows == ONE else {})
    per_sample = [s.name for s in (*m.inputs, *[c for c in m.constants if c.is_vector])]
    shared = [s.name for s in m.params + tuple(c for c in m.constants if not c.is_vector)]
    return ModulePlan(m.name, d, forward.program, gradients, jvp, rgradients, hbp, hbp_aliases, loss_hessian,
                      loss_aliases,
                      _dimension_sources(d, per_sample), per_sample, shared)


# --- memoising: what a module's calls on one batch share ----------------------------------------
# The functions of a module run on one batch several times: forward, gradients and HBP once each in
# a backward pass, and inside a CG loop gradients, jvp or rgradients again and again with only some
# arguments changing: δZ for `gradients` (it carries R{δZ} in a Gauss–Newton product), the
# directions V for `jvp` and `rgradients`. A step that depends on none of its function's changing
# arguments (an activation and its derivatives, softmax, their batch forms) is computed once per
# cache the caller passes, one per batch, and kept there under a key of its node that every function
# of the module shares: the forward pass computes tanh(W x + b) once for the gradients and the
# curvature after it (loop-invariant code motion and common subexpressions across functions).
def _moves_with_direction(seed: Seed) -> bool:
    return tangent_of(seed) is not None or seed.kind == "Rdz"


CHANGING_SEEDS = {
    "forward": lambda seed: False,
    "gradients": lambda seed: seed.kind == "dz",
    "jvp": _moves_with_direction,
    "rgradients": _moves_with_direction,
    "hbp": lambda seed: seed.kind in ("Hz", "dz"),  # called once a batch: only its steps that others share
    "loss_hessian": lambda seed: seed.kind == "dz",
}
LOOPED = {"gradients", "jvp", "rgradients"}  # the families a CG loop calls again on one batch


def _reads_seeds(changing: Callable[[Seed], bool]) -> Callable[[Expr], bool]:
    """Whether a node reads a seed that ``changing`` says changes between calls (remembered per node)."""
    memo: dict[Expr, bool] = {}

    def varies(node: Expr) -> bool:
        if node not in memo:
            memo[node] = (isinstance(node, Seed) and changing(node)) or any(varies(c) for c in node.children)
        return memo[node]

    return varies


def invariant_steps(program: Program, family: str) -> set[str]:
    """The targets of the steps of ``program`` that do not depend on the family's changing seeds."""
    varies = _reads_seeds(CHANGING_SEEDS[family])
    return {step.target for step in program.steps if not varies(step.node)}


def memo_keys(plan: ModulePlan) -> dict[Expr, str]:
    """The cache key of every node a module's functions keep: an invariant step of a looped family
    (reused by the next call of the loop) or one that is invariant in two programs or more (computed
    by the first of them that runs). The patches of a per-sample input, unfold(X), are kept under
    :data:`PATCHES_KEY`, where a network's K-FAC reads a convolution's patches that the forward pass made."""
    invariant: list[tuple[str, list[Expr]]] = []
    programs_with: dict[Expr, int] = {}
    for family, program in plan.keyed_programs():
        kept = invariant_steps(program, family)
        nodes = list(dict.fromkeys(s.node for s in program.steps if s.target in kept))
        invariant.append((family, nodes))
        for node in nodes:
            programs_with[node] = programs_with.get(node, 0) + 1
    keys: dict[Expr, str] = {}
    for family, nodes in invariant:
        for node in nodes:
            if isinstance(node, Transpose):
                continue  # a view, free to make again
            if family in LOOPED or programs_with[node] > 1:
                patches = isinstance(node, Unfold) and isinstance(node.args[0], Stacked) and \
                    isinstance(node.args[0].args[0], Symbol) and PATCHES_KEY not in keys.values()
                keys.setdefault(node, PATCHES_KEY if patches else f"m{len(keys)}")
    return keys


def memoised_steps(program: Program, family: str, keys: dict[Expr, str]) -> set[str]:
    """The targets of the steps of ``program`` that a cache keeps, under ``keys`` (:func:`memo_keys`)."""
    return {s.target for s in program.steps if s.node in keys} & invariant_steps(program, family)


def _dimension_sources(d: Derivation, per_sample: list[str]) -> dict[str, DimensionSource]:
    sources: dict[str, DimensionSource] = {"B": BatchColumns(), "B_all": SampleCount()}
    for s in d.module.symbols:
        where = Argument("S" if s.name in per_sample else "P", s.name)
        # a batch argument is (rows, B) or (rows, B, cols), a parameter as declared
        axes = enumerate(s.shape) if s.name not in per_sample else ((0, s.rows), (2, s.cols))
        for axis, extent in axes:
            if extent.is_Symbol and str(extent) not in sources:
                sources[str(extent)] = Axis(where, axis)
    return sources

