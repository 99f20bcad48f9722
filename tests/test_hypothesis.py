"""Property tests: random shapes and points, and random modules of random operations."""
import numpy as np
import torch_reference
from conftest import seeds_for
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from strategies import modules

import mcalc as mc
from mcalc import layers as L
from mcalc.numeric.verify import sample_values, verify_module

# Each example derives and checks a whole module: shrinking a failure would take minutes, so it is off;
# the failing module is printed as generated.
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                    phases=[Phase.explicit, Phase.reuse, Phase.generate])


@SETTINGS
@given(m=st.integers(1, 5), n=st.integers(1, 5), seed=st.integers(0, 2**31 - 1),
       module=st.sampled_from([L.Linear, L.SigmoidLinear, L.MatMul]))
def test_random_shapes_and_points(m, n, seed, module):
    rng = np.random.default_rng(seed)
    values = sample_values(module, rng, {"m": m, "n": n})
    d = mc.derive(module)
    dz, Hz = seeds_for(m, rng)
    for v in module.variables:
        ref = torch_reference.dense_rules(module, v.name, values, dz, Hz)
        for c in mc.CURVATURES:
            np.testing.assert_allclose(d.evaluate_hbp(v.name, values, dz=dz, Hz=Hz, curvature=c), ref[c], atol=1e-10)


@SETTINGS
@given(module=modules(), seed=st.integers(0, 1000))
def test_random_modules_match_finite_differences(module, seed):
    checks = verify_module(module, seed=seed)
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]


@SETTINGS
@given(module=modules(), seed=st.integers(0, 1000))
def test_random_modules_match_torch_autograd(module, seed):
    rng = np.random.default_rng(seed)
    values = sample_values(module, rng)
    d = mc.derive(module)
    dz, Hz = seeds_for(np.size(module.forward(values)), rng)
    for v in module.variables:
        ref = torch_reference.dense_rules(module, v.name, values, dz, Hz)
        np.testing.assert_allclose(d.evaluate_jacobian(v.name, values), ref["jacobian"], rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(d.evaluate_hbp(v.name, values, dz=dz, Hz=Hz), ref["exact"], rtol=1e-8, atol=1e-8)
