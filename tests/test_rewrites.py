"""Every simplification rewrite is checked by its numeric fingerprint: both sides evaluated on random values."""
import numpy as np
import pytest
import sympy as sp
from conftest import ROOT

import mcalc as mc
from mcalc import layers as L
from mcalc.expr import (
    Add,
    Commutation,
    Hadamard,
    Identity,
    Inverse,
    Kron,
    MatMul,
    Ones,
    PSDProjection,
    RankSum,
    ScalarMul,
    Seed,
    Sum,
    Symbol,
    Transpose,
)
from mcalc.numeric.evaluate import Evaluator
from mcalc.numeric.verify import draw_value
from mcalc.simplification import all_rules, record_rewrites, simplify
from mcalc.simplification.engine import Simplifier, reset_cache
from mcalc.user_modules import load_modules

SIZES = {"n": 3, "m": 2, "r": 4, "k": 5}


def _random_env(exprs, rng):
    binding, env, seeds = {}, {}, {}
    for e in exprs:
        for node in e.walk():
            extents = [*node.shape, *([node.args[0]] if isinstance(node, ScalarMul) else [])]  # (1/n)·s too
            for extent in extents:
                for d in sp.sympify(extent).free_symbols:
                    binding.setdefault(d, SIZES.get(str(d), 3))
    for e in exprs:
        for node in e.walk():
            shape = tuple(int(sp.sympify(d).xreplace(binding)) for d in node.shape)
            if isinstance(node, Symbol) and node.name not in env:
                env[node.name] = draw_value(node, *shape, rng, inverted=True).reshape(shape)
            if isinstance(node, Seed) and node.kind not in seeds:
                a = rng.normal(size=shape)
                seeds[node.kind] = a + a.T if node.kind == "Hz" else a
    return Evaluator(env, binding, seeds)


def _corpus():
    x, y = mc.Vector("x", "n"), mc.Vector("y", "n")
    A, B = mc.Matrix("A", "n", "n"), mc.Matrix("B", "m", "n")
    s = mc.Scalar("s")
    hz = Seed("Hz", sp.Symbol("n", integer=True, positive=True), sp.Symbol("n", integer=True, positive=True))
    n = A.rows
    targeted = [  # identities the library alone does not exercise
        MatMul(Commutation(n, B.rows), Commutation(B.rows, n)), MatMul(Commutation(n, 1), x),
        Inverse(Inverse(A)), Inverse(Identity(n)),
        Kron(Identity(n), Identity(B.rows)), Kron(ScalarMul(2, x), B), Kron(Kron(x, x) * 0, B),
        PSDProjection("abs", ScalarMul(-3, mc.diag(x))), PSDProjection("clip", ScalarMul(2, mc.diag(x))),
        PSDProjection("clip", Kron(x @ x.T, A + A.T)), PSDProjection("abs", mc.kron(A + A.T, B.T @ B)),
        PSDProjection("abs", x @ x.T), PSDProjection("abs", s * (A + A.T)),
        Sum(mc.kron(x, y) * 0 + s * mc.kron(x, y)), mc.vec(B.T @ B * 2), mc.vec(x.T),
        mc.vec(mc.Matrix("Z", "m", "n") * 0),
        mc.sum(2 * B), mc.diag(s * x), mc.diag(0 * x), mc.diag(x * 0 + 1),
        (mc.diag(x) @ hz @ mc.diag(y)), mc.trace(A) * (x + 1), (3 * x) * y, x.T.T,
        mc.sum(x - mc.mean(x) * mc.ones("n")), mc.sum(A @ x + s * mc.ones("n")),  # sum(A x + s·1) = sum(A x) + n s
        mc.unfold(3 * B, 3, padding=1), mc.unfold(B * 0, 2), mc.fold(2 * mc.unfold(B, 3, padding=1), "n", 3, padding=1),
        mc.fold(mc.unfold(B, 2) * 0, "n", 2),
        RankSum(ScalarMul(2, A)) + RankSum(A @ A) + x @ y.T,  # batch means over ranks: one sum of both
    ]
    return targeted


def _codegen_corpus():
    """Rules that the code generator's rule set rewrites: C diag(a)² Cᵀ, as LayerNorm's gain block has it
    (C = x − 1·mean(x) and a = 1/σ per sample)."""
    C, a = mc.Matrix("C", "n", "m"), mc.Vector("a", "m").T
    return [MatMul(Hadamard(MatMul(Ones(C.rows, 1), Hadamard(a, a)), C), Transpose(C))]


def _derivations():
    modules = list(L.LIBRARY) + load_modules(ROOT / "examples" / "custom_layers.py")
    out = []
    for m in modules:
        d = mc.derive(m)
        out += [r.expr for r in d.rules()]
    return out


def test_every_rewrite_holds_numerically_and_every_rule_fires():
    reset_cache()
    rng = np.random.default_rng(0)
    with record_rewrites() as fired:
        rules = _derivations()
        for e in _corpus():
            simplify(e)
        planned = Simplifier(("fusion",))  # the code generator's extra rule set, as it plans a program
        for e in rules + _codegen_corpus():
            planned(simplify(e))
    assert fired
    for rule, before, after in fired:
        ev = _random_env([before, after], rng)
        lhs, rhs = ev.value(before), ev.value(after)
        message = f"{rule.name} ({rule.cite}): {before!r} → {after!r}"
        np.testing.assert_allclose(rhs, lhs, rtol=1e-9, atol=1e-9, err_msg=message)
    unfired = {r.name for r in all_rules()} - {r.name for r, _, _ in fired}
    assert not unfired, f"rules never exercised by the corpus: {sorted(unfired)}"


@pytest.mark.parametrize("rule", all_rules(), ids=lambda r: r.name)
def test_every_rule_cites_its_identity(rule):
    assert "=" in rule.cite or "M&N" in rule.cite or "(S." in rule.cite, rule.cite


def test_planned_broadcasts_keep_their_value():
    """The planner's (A … v) 1ᵀ → (A … v)·1ᵀ and 1 (wᵀ … B) → 1·(wᵀ … B) (the product is associative), and
    c (v 1ᵀ) → (c v) 1ᵀ: both sides on random values, nested inside elementwise work and in a product's
    middle too."""
    from mcalc.codegen.plan import ProgramBuilder
    from mcalc.expr import Hadamard, Ones

    A, X, x, w = mc.Matrix("A", "n", "n"), mc.Matrix("X", "n", "k"), mc.Vector("x", "n"), mc.Vector("w", "n")
    n, k = X.shape
    cases = [
        MatMul(A, x, Ones(1, k)),  # a product's column broadcast over k columns
        MatMul(X, Ones(k, 1), Ones(1, k)),  # row sums broadcast
        MatMul(Ones(n, 1), Ones(1, n), X),  # column sums broadcast
        MatMul(Ones(k, 1), w.T, A),
        Hadamard(X, MatMul(A, x, Ones(1, k))),
        MatMul(A, MatMul(X, Ones(k, 1), Ones(1, k)), Ones(k, 1)),
        ScalarMul(3, MatMul(x, Ones(1, k))),  # c (v 1ᵀ) = (c v) 1ᵀ
        Hadamard(X, ScalarMul(-2, MatMul(Ones(n, 1), w.T, X))),  # c (1 wᵀ X) = 1 (c wᵀ X), inside a product
    ]
    rng = np.random.default_rng(1)
    for e in cases:
        apart = ProgramBuilder()._broadcasts_apart(e)
        assert apart != e
        ev = _random_env([e], rng)
        np.testing.assert_allclose(ev.value(apart), ev.value(e), rtol=1e-12, err_msg=repr(e))


def test_expanded_runs_keep_their_value():
    """A per-sample program's runs beside 𝓗z as sums of chains (:mod:`mcalc.simplification.expansion`): both
    sides on random values, for attention's own blocks (their sums nested in products) and for a sum inside
    a scaled product on both sides of 𝓗z."""
    from mcalc.calculus.derivation import Derivation
    from mcalc.layers.attention import self_attention
    from mcalc.simplification.expansion import expanded, expanded_runs

    A, B, C = mc.Matrix("A", "n", "n"), mc.Matrix("B", "n", "n"), mc.Matrix("C", "n", "n")
    hz = Seed("Hz", A.rows, A.rows)
    cases = [ScalarMul(2, MatMul(A, Add(B, ScalarMul(-3, MatMul(C, B))), hz, Add(B, C), C))]
    d = Derivation(self_attention())
    cases += [d.gauss_newton(name) for name in ("X", "Q")]
    rng = np.random.default_rng(2)
    for e in cases:
        after = expanded_runs(e)
        assert after != e
        ev = _random_env([e, after], rng)
        np.testing.assert_allclose(ev.value(after), ev.value(e), rtol=1e-9, atol=1e-9)
    assert len(expanded(MatMul(A, Add(B, C), Add(B, C)))) == 4  # (a + b)(c + d): four products


def test_attentions_blocks_are_one_per_sample_program_each():
    """A batch mean whose distributed terms would be several per-sample programs is one program of the whole
    product: attention's input block E[Jᵢᵀ 𝓗z Jᵢ], J a sum of five chains, had been 25."""
    from mcalc.calculus.derivation import Derivation
    from mcalc.codegen.batch import batch_hbp
    from mcalc.expr import BatchMean
    from mcalc.layers.attention import self_attention

    d = Derivation(self_attention())
    for name in ("X", "Q", "K"):
        block = batch_hbp(d, name, "ggn", "6")
        assert sum(isinstance(node, BatchMean) for node in block.walk()) == 1, name
