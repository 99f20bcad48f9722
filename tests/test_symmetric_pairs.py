"""Transposed pairs in a symmetric block (S + X + Xᵀ, X computed once), and runs of factors that products
share (computed once): the same values, fewer flops."""
import numpy as np
import pytest
from conftest import ROOT
from test_batch import _batch

import mcalc as mc
from mcalc import layers as L
from mcalc.codegen.batch import batch_hbp
from mcalc.expr import Add, MatMul, Seed, Transpose
from mcalc.modes import APPROXIMATIONS, CURVATURES
from mcalc.numeric.evaluate import Evaluator
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
