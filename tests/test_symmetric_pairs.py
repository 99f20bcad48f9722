"""Transposed pairs in a symmetric block (S + X + Xᵀ, X computed once), runs of factors that products
share (computed once), and numbers placed on the operands of fewest entries: the same values, less work."""
import numpy as np
import pytest
import sympy as sp
from conftest import ROOT
from test_batch import _batch

import mcalc as mc
from mcalc import layers as L
from mcalc.codegen.batch import batch_hbp
from mcalc.expr import Add, Diag, Hadamard, MatMul, Ones, ScalarMul, Seed, Transpose
from mcalc.modes import APPROXIMATIONS, CURVATURES
from mcalc.numeric.evaluate import Evaluator
from mcalc.simplification.scale_placement import entries, place_scales
from mcalc.simplification.shared_runs import share_runs
from mcalc.simplification.symmetric import flops, pair_transposes
from mcalc.user_modules import load_modules

USER = {m.name: m for m in load_modules(ROOT / "examples" / "layernorm_gelu.py")}
MODULES = [L.Softmax, L.Sigmoid, L.Linear, USER["Residual"], USER["LayerNorm"]]


def _evaluator(module, seed=0):
    _, shared, batch = _batch(module, 4, seed)
    rng = np.random.default_rng(seed)
    size = np.size(module.forward({**shared, **{k: v[0] for k, v in batch.items()}}))
    a = rng.normal(size=(size, size))
    return Evaluator.for_batch(module, shared, batch, dZ=rng.normal(size=(4, size)) / 4, Hz=a @ a.T / size)


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.name)
def test_paired_blocks_equal_the_blocks_on_random_values(module):
    """Every block of every mode, rewritten or not, evaluates to the block itself."""
    d, ev = mc.derive(module), _evaluator(module)
    for curvature in CURVATURES:
        for approximation in APPROXIMATIONS:
            for v in module.variables:
                block = batch_hbp(d, v.name, curvature, approximation)
                expected = ev.value(block)
                assert np.abs(expected).max() > 1e-6  # not a comparison of zeros
                np.testing.assert_allclose(ev.value(pair_transposes(block)), expected, rtol=1e-10, atol=1e-12,
                                           err_msg=f"{module.name} {v.name} {curvature} ({approximation})")


def test_a_residual_blocks_input_block_computes_its_cross_term_once():
    """𝓗z (I + Ā) + Āᵀ 𝓗z + …: the pair 𝓗z Ā and its transpose becomes X + Xᵀ, X one product chain."""
    block = batch_hbp(mc.derive(USER["Residual"]), "x", "ggn", "6-kfac")
    paired = pair_transposes(block)
    assert isinstance(paired, Add) and isinstance(paired.args[-1], Transpose)
    assert paired.args[-1].args[0] == paired.args[-2]
    # the sandwich W₁ᵀ (…) W₁ folded into the pair: 𝓗z + Y + Yᵀ, Y = (½ W₁ᵀ (…) + X′) W₁
    assert len(paired.args) == 3 and isinstance(paired.args[0], Seed)
    assert isinstance(paired.args[1], MatMul) and paired.args[1].args[-1].name == "W1"
    assert flops(paired) < 0.75 * flops(block)  # 0.80 with the pair alone
    np.testing.assert_allclose(*[_evaluator(USER["Residual"], 1).value(e) for e in (paired, block)], rtol=1e-10)


def test_a_block_without_pairs_is_left_as_it_is():
    block = batch_hbp(mc.derive(L.Sigmoid), "x", "ggn", "6")
    assert pair_transposes(block) is block


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.name)
def test_shared_runs_keep_every_blocks_value(module):
    """Every mode's blocks of a module, planned together with the runs their products share nested
    (:func:`share_runs`), evaluate to the blocks themselves, at no more flops."""
    d, ev = mc.derive(module), _evaluator(module, 2)
    for curvature in CURVATURES:
        for approximation in APPROXIMATIONS:
            blocks = [pair_transposes(batch_hbp(d, v.name, curvature, approximation)) for v in module.variables]
            shared = share_runs(blocks)
            assert flops(*shared) <= flops(*blocks)
            for before, after in zip(blocks, shared):
                np.testing.assert_allclose(ev.value(after), ev.value(before), rtol=1e-10, atol=1e-12)


def test_a_residual_blocks_products_compute_hz_w2_once():
    """The residual block's parameter blocks hold W₂ᵀ 𝓗z W₂ and its input block 𝓗z W₂ diag(E[φ′]) W₁: planned
    together, 𝓗z W₂ is one product that both read, and the blocks cost fewer flops."""
    d = mc.derive(USER["Residual"])
    blocks = [pair_transposes(batch_hbp(d, v.name, "ggn", "6-kfac")) for v in USER["Residual"].variables]
    shared = share_runs(blocks)
    products = {n for b in shared for n in b.walk() if isinstance(n, MatMul)}
    hz_w2 = [p for p in products if len(p.args) == 2 and isinstance(p.args[0], Seed) and p.args[1].name == "W2"]
    assert len(hz_w2) == 1
    readers = {p for p in products if hz_w2[0] in p.args}
    assert len(readers) >= 2
    assert flops(*shared) < flops(*blocks)


def _entries_scaled(roots):
    """The entries that the numbers c of c·X in ``roots`` scale, with every dimension 64."""
    sizes = [sp.sympify(entries(n.args[1])) for r in roots for n in set(r.walk()) if isinstance(n, ScalarMul)]
    return sum(float(size.xreplace({s: 64 for s in size.free_symbols})) for size in sizes)


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.name)
def test_placed_scales_keep_every_blocks_value(module):
    """Every mode's blocks with their numbers moved to the operands of fewest entries
    (:func:`place_scales`) evaluate to the blocks themselves, and never scale more entries."""
    d, ev = mc.derive(module), _evaluator(module, 3)
    varies = lambda node: any(isinstance(n, Seed) for n in node.walk())  # noqa: E731
    for curvature in CURVATURES:
        for approximation in APPROXIMATIONS:
            blocks = share_runs([pair_transposes(batch_hbp(d, v.name, curvature, approximation))
                                 for v in module.variables])
            placed = place_scales(blocks, varies)
            assert _entries_scaled(placed) <= _entries_scaled(blocks)
            for before, after in zip(blocks, placed):
                np.testing.assert_allclose(ev.value(after), ev.value(before), rtol=1e-10, atol=1e-12)


def test_a_residual_blocks_cross_term_scales_a_vector_not_a_matrix():
    """(1/B)·(𝓗z W₂ diag(d̄)) in the residual block's input block scales d̄ (h entries), not the n × h
    product; W₁ᵀ (½/B) M against (½/B) W₁ᵀ M is h·h against n·h, which no size decides, and stays."""
    d = mc.derive(USER["Residual"])
    blocks = share_runs([pair_transposes(batch_hbp(d, v.name, "ggn", "6-kfac")) for v in USER["Residual"].variables])
    placed = place_scales(blocks, lambda node: any(isinstance(n, Seed) for n in node.walk()))
    diagonals = {n for b in placed for n in b.walk() if isinstance(n, Diag)}
    assert any(isinstance(n.args[0], ScalarMul) for n in diagonals)
    assert not any(isinstance(n.args[0], ScalarMul) for b in blocks for n in b.walk() if isinstance(n, Diag))
    assert _entries_scaled(placed) < _entries_scaled(blocks)


def test_a_scale_stays_on_a_product_that_another_block_reads():
    """c·(A ⊙ 1 wᵀ) scales w alone, unless A ⊙ 1 wᵀ is read elsewhere too: computed once, c scales it there."""
    n = sp.Symbol("n", integer=True, positive=True)
    A, w = MatMul(Seed("Hz", n, n), mc.Matrix("W", "n", "m")), mc.Vector("w", "m").T
    product = Hadamard(A, MatMul(Ones(n, 1), w))
    roots = [ScalarMul(sp.Rational(1, 2), product), product]
    assert place_scales(roots, lambda node: True) == roots
    alone = place_scales(roots[:1], lambda node: True)[0]
    assert alone == Hadamard(A, ScalarMul(sp.Rational(1, 2), MatMul(Ones(n, 1), w)))
