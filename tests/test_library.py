"""Every rule of the built-in library, three ways: finite differences, torch autograd, the paper's closed forms."""
import numpy as np
import pytest
import torch_reference
from conftest import seeds_for

import mcalc as mc
from mcalc import layers as L
from mcalc.calculus.explicit import symbolically_equal
from mcalc.expr import tangent
from mcalc.numeric.verify import sample_values, verify_module


@pytest.mark.parametrize("module", L.LIBRARY, ids=lambda m: m.name)
def test_every_rule_matches_finite_differences(module):
    checks = verify_module(module, seed=7)
    assert checks and all(c.ok for c in checks), [c for c in checks if not c.ok]


@pytest.mark.parametrize("module", L.LIBRARY, ids=lambda m: m.name)
def test_every_rule_matches_torch_autograd(module, rng):
    d = mc.derive(module)
    values = sample_values(module, rng)
    dz, Hz = seeds_for(np.size(module.forward(values)), rng)
    for v in module.variables:
        ref = torch_reference.dense_rules(module, v.name, values, dz, Hz)
        np.testing.assert_allclose(d.evaluate_jacobian(v.name, values), ref["jacobian"], atol=1e-12)
        np.testing.assert_allclose(d.evaluate_gradient(v.name, values, dz), ref["gradient"], atol=1e-12)
        for c in mc.CURVATURES:
            got = d.evaluate_hbp(v.name, values, dz=dz, Hz=Hz, curvature=c)
            np.testing.assert_allclose(got, ref[c], atol=1e-10, err_msg=f"{module.name} {v.name} {c}")


@pytest.mark.parametrize("module", L.LIBRARY, ids=lambda m: m.name)
def test_r_operator_matches_torch_forward_over_reverse(module, rng):
    """R{z} and R{δv} (every variable and δz moving) against torch's jvp of its own gradients."""
    d = mc.derive(module)
    values = sample_values(module, rng)
    size = np.size(module.forward(values))
    dz, Rdz = rng.normal(size=size), rng.normal(size=size)
    tangents = {v.name: rng.normal(size=np.shape(values[v.name])) for v in module.variables}
    ref = torch_reference.dense_tangents(module, values, dz, tangents, Rdz)
    np.testing.assert_allclose(d.evaluate_jvp(values, tangents), ref["R{z}"], atol=1e-12)
    for v in module.variables:
        got = d.evaluate_gradient_tangent(v.name, values, dz=dz, tangents=tangents, Rdz=Rdz)
        np.testing.assert_allclose(got, ref[v.name], atol=1e-10, err_msg=f"R{{δ{v.name}}}")


def test_r_operator_of_linear_is_the_product_rule():
    """Closed forms: R{z} = dW x + W dx + db; R{δx} = dWᵀ δz + Wᵀ R{δz}; R{δW} = R{δz} xᵀ + δz dxᵀ."""
    d = mc.derive(L.Linear)
    dx, dW, db = (tangent(s) for s in (x, W, b))
    assert symbolically_equal(d.jvp(("x", "W", "b")), dW @ x + W @ dx + db)
    assert symbolically_equal(d.gradient_tangent("x", ("x", "W", "b")), dW.T @ d.dz + W.T @ d.Rdz)
    assert symbolically_equal(d.gradient_tangent("W", ("x", "W", "b")), d.Rdz @ x.T + d.dz @ dx.T)
    assert symbolically_equal(d.gradient_tangent("W", ("W", "b")), d.Rdz @ x.T)  # the data does not move


# --- closed forms of the paper ----------------------------------------------------------------
x, W, b = mc.Vector("x", "n"), mc.Matrix("W", "m", "n"), mc.Vector("b", "m")


def test_linear_is_S8():
    d = mc.derive(L.Linear)
    Hz = d.Hz
    assert d.jacobian("x") == W
    assert d.jacobian("W") == mc.kron(x.T, mc.identity("m"))  # Dz(W) = xᵀ ⊗ I_m
    assert d.jacobian("b") == mc.identity("m")
    assert d.hbp("x") == mc.simplify(W.T @ Hz @ W)  # (S.8a)
    assert d.hbp("b") == Hz  # (S.8b)
    assert d.hbp("W") == mc.simplify(mc.kron(x @ x.T, Hz))  # (S.8c)
    for c in mc.CURVATURES:  # linear in every input: all modes coincide
        assert d.hbp("W", c) == d.hbp("W")


def test_table1_matmul_and_bias():
    d = mc.derive(L.MatMul)
    assert d.hbp("x") == mc.simplify(W.T @ d.Hz @ W)
    assert symbolically_equal(d.hbp("W"), mc.kron(x.T, mc.identity("m")).T @ d.Hz @ mc.kron(x.T, mc.identity("m")))
    d = mc.derive(L.Bias)
    assert d.hbp("x") == d.Hz and d.hbp("b") == d.Hz


@pytest.mark.parametrize("module", L.ACTIVATIONS, ids=lambda m: m.name)
def test_activation_is_S9(module):
    d = mc.derive(module)
    xin = module.inputs[0]
    phi = module.output.function
    first, second = phi.derivative(1)(xin), phi.derivative(2)(xin)
    closed = mc.diag(first) @ d.Hz @ mc.diag(first) + mc.diag(second * d.dz)
    assert symbolically_equal(d.hbp("x"), closed)  # (S.9)
    assert symbolically_equal(d.hbp("x", "ggn"), mc.diag(first) @ d.Hz @ mc.diag(first))


def test_sigmoid_S9_entrywise_against_sympy_formula():
    d = mc.derive(L.Sigmoid)
    import sympy as sp

    t = sp.Symbol("t")
    s = 1 / (1 + sp.exp(-t))
    sig = mc.elementwise("sig_by_hand", s, t)
    dsig = mc.elementwise("dsig", sp.diff(s, t), t)
    ddsig = mc.elementwise("ddsig", sp.diff(s, t, 2), t)
    xin = L.Sigmoid.inputs[0]
    closed = mc.diag(dsig(xin)) @ d.Hz @ mc.diag(dsig(xin)) + mc.diag(ddsig(xin) * d.dz)
    assert symbolically_equal(d.hbp("x"), closed, {"n": 2})
    assert sig is not None


def test_mse_is_S10():
    d = mc.derive(L.MSE)
    assert d.hessian("x") == mc.simplify(2 * mc.identity("n"))  # (S.10)
    y = L.MSE.constants[0]
    assert symbolically_equal(d.jacobian("x"), -2 * (y - L.MSE.inputs[0]).T)  # DE(ŷ) = −2(y − ŷ)ᵀ


def test_cross_entropy_closed_form():
    d = mc.derive(L.CrossEntropy)
    xin, y = L.CrossEntropy.inputs[0], L.CrossEntropy.constants[0]
    p = mc.softmax(xin)
    assert d.hessian("x") == mc.simplify(mc.diag(p) - p @ p.T)  # diag(p) − p pᵀ
    assert symbolically_equal(d.gradient("x"), d.dz * (p - y))  # (p − y) δz


def test_sigmoid_linear_composite_is_S11():
    d = mc.derive(L.SigmoidLinear)
    xin = L.SigmoidLinear.inputs[0]
    Wc = L.SigmoidLinear.params[0]
    s1, s2 = mc.sigmoid.derivative(1)(xin), mc.sigmoid.derivative(2)(xin)
    Hz, dz = d.Hz, d.dz
    assert d.hbp("W") == mc.simplify(mc.kron(mc.sigmoid(xin) @ mc.sigmoid(xin).T, Hz))  # (S.11a)
    assert d.hbp("b") == Hz  # (S.11b)
    closed = (Wc @ mc.diag(s1)).T @ Hz @ (Wc @ mc.diag(s1)) + mc.diag(s2 * (Wc.T @ dz))  # (S.11c)
    assert d.hbp("x") == mc.simplify(closed)
    assert d.jacobian("x") == mc.simplify(Wc @ mc.diag(s1))  # Dg(x) = W diag[φ'(x)]


def test_pch_casts_the_concave_diagonal():
    d = mc.derive(L.SigmoidLinear)
    xin, Wc = L.SigmoidLinear.inputs[0], L.SigmoidLinear.params[0]
    s2 = mc.sigmoid.derivative(2)(xin)
    concave = s2 * (Wc.T @ d.dz)
    assert d.hbp("x", "pch-abs") == mc.simplify(d.hbp("x", "ggn") + mc.diag(mc.functions.absolute(concave)))
    assert d.hbp("x", "pch-clip") == mc.simplify(d.hbp("x", "ggn") + mc.diag(mc.relu(concave)))


def test_a_check_that_compares_zero_with_zero_is_drawn_again_or_reported():
    """relu(s)·x with a scalar s: where s < 0 every rule of x is zero, and its checks would test nothing.
    verify draws another point; a unit dead at every point (relu of −N x, N and x positive) is reported."""
    s, x = mc.Scalar("s"), mc.Vector("x", "n")
    gated = mc.Module("Gated", output=mc.relu(s) * mc.tanh(x), inputs=[x], params=[s])
    seed = next(k for k in range(50) if sample_values(gated, np.random.default_rng(k))["s"] < 0)
    checks = verify_module(gated, seed=seed)
    assert checks and all(c.ok for c in checks) and not any(c.vacuous for c in checks)
    N, xp, W = mc.Matrix("N", "n", "n", positive=True), mc.Vector("x", "n", positive=True), mc.Matrix("W", "n", "n")
    dead = mc.Module("Dead", output=W @ mc.relu(-(N @ xp)), inputs=[xp], params=[W], constants=[N])
    checks = verify_module(dead)
    assert {c.rule for c in checks if c.vacuous} >= {"Dz(x)", "δx", "R{z}"}
    assert not any(c.vacuous for c in verify_module(L.Linear))  # Linear's zero second-order term is Zero itself
