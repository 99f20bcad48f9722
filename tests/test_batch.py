"""Batch rules (Section 3.3): lowered rules equal the per-sample rules averaged densely, sample by sample."""
import numpy as np
import pytest
from conftest import ROOT
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from strategies import modules

import mcalc as mc
from mcalc import layers as L
from mcalc.codegen.batch import batch_forward, batch_gradient, batch_hbp
from mcalc.expr import BatchMean
from mcalc.numeric.evaluate import Evaluator, psd_project
from mcalc.numeric.verify import sample_values
from mcalc.user_modules import load_modules

EXAMPLES = load_modules(ROOT / "examples" / "custom_layers.py")


def _batch(module, batch_size, seed):
    """B per-sample points sharing parameters, as the dense list and as batch arrays."""
    per_sample = [s for s in module.symbols if s in module.inputs or (s in module.constants and s.is_vector)]
    samples = [sample_values(module, np.random.default_rng(seed + k)) for k in range(batch_size)]
    shared = {s.name: samples[0][s.name] for s in module.symbols if s not in per_sample}
    for values in samples:
        values.update(shared)
    batch = {s.name: np.stack([values[s.name] for values in samples]) for s in per_sample}
    return samples, shared, batch


def _side_by_side(per_sample):
    """Per-sample values (vectors or matrices) as a batch lays them out: the samples side by side."""
    return np.concatenate([np.asarray(a, dtype=float).reshape(np.shape(a)[0], -1) if np.ndim(a) == 2
                           else np.reshape(a, (-1, 1)) for a in per_sample], axis=1)


def _cast(S, curvature):
    return S if curvature == "exact" else 0 * S if curvature == "ggn" else psd_project(S, curvature[4:])


def check_batch_rules(module, batch_size=4, seed=0):
    d = mc.derive(module)
    forward = batch_forward(d)
    samples, shared, batch = _batch(module, batch_size, seed)
    rng = np.random.default_rng(seed)
    size = np.size(module.forward(samples[0]))
    dZ = rng.normal(size=(batch_size, size)) / batch_size
    a = rng.normal(size=(size, size))
    Hz = a @ a.T / size
    ev = Evaluator.for_batch(module, shared, batch, dZ=dZ, Hz=Hz)
    Z = ev.value(forward)
    np.testing.assert_allclose(Z, _side_by_side([module.forward(v) for v in samples]), atol=1e-12)
    second = lambda name, values, dz: Evaluator.for_module(module, values, dz=dz, seeds=(d.dz,)).value(  # noqa: E731
        d.second_order(name))
    for v in module.variables:
        grads = [d.evaluate_gradient(v.name, values, dZ[i]) for i, values in enumerate(samples)]
        got = ev.value(batch_gradient(d, v.name))
        expected = _side_by_side([np.reshape(g, np.shape(values[v.name]), order="F")  # vec δXᵢ → δXᵢ
                                  for g, values in zip(grads, samples)]) if v in module.inputs \
            else sum(grads).reshape(got.shape, order="F")
        np.testing.assert_allclose(got, expected, atol=1e-12)
        Js = [d.evaluate_jacobian(v.name, values) for values in samples]
        S = sum(second(v.name, values, dZ[i]) for i, values in enumerate(samples))  # Σᵢ, per sample
        J7 = sum(Js) / batch_size
        for c in mc.CURVATURES:
            expected6 = sum(J.T @ Hz @ J for J in Js) / batch_size + _cast(S, c)  # eq. (6)
            expected7 = J7.T @ Hz @ J7 + _cast(S, c)  # eq. (7), second-order term per sample (bpexts)
            np.testing.assert_allclose(ev.value(batch_hbp(d, v.name, c, "6")), expected6, atol=1e-10)
            np.testing.assert_allclose(ev.value(batch_hbp(d, v.name, c, "7")), expected7, atol=1e-10)


@pytest.mark.parametrize("module", list(L.LIBRARY) + EXAMPLES, ids=lambda m: m.name)
def test_batch_rules_equal_per_sample_averages(module):
    check_batch_rules(module)


@pytest.mark.parametrize("module", L.LIBRARY, ids=lambda m: m.name)
def test_library_batch_rules_are_closed_forms(module):
    d = mc.derive(module)
    for v in module.variables:
        for approximation in "67":
            rule = batch_hbp(d, v.name, "pch-abs", approximation)
            assert not any(isinstance(n, BatchMean) for n in rule.walk()), (v.name, approximation, rule)


def test_linear_weight_block_is_the_kronecker_of_the_batch():
    d = mc.derive(L.Linear)
    # E[x xᵀ] ⊗ 𝓗̄z, the batch sum summed over the ranks of data parallelism (B_all = B in one process)
    assert repr(batch_hbp(d, "W")) == "(1/B_all)·(Σ_ranks[[x]_B [x]_Bᵀ] ⊗ 𝓗z)"
    assert repr(batch_hbp(d, "x")) == "Wᵀ 𝓗z W"


def test_activation_batch_rule_fuses_the_diagonal_sandwich():
    d = mc.derive(L.Sigmoid)
    assert repr(batch_hbp(d, "x", "pch-abs")) == (
        "(1/B_all)·(Σ_ranks[sigmoid'([x]_B) sigmoid'([x]_B)ᵀ] ⊙ 𝓗z) "
        "+ diag[abs(Σ_ranks[([δz]_B ⊙ sigmoid''([x]_B)) 1_B])]")  # |·| of the sum over every rank


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(module=modules(), batch_size=st.integers(1, 4), seed=st.integers(0, 1000))
def test_random_modules_in_batches(module, batch_size, seed):
    try:
        check_batch_rules(module, batch_size, seed)
    except mc.McalcError as exc:  # a per-sample inverse, say, has no batch form
        assert "no batch form" in str(exc)
