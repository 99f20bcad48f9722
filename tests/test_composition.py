"""Analytic composition (Supplement C): chaining composite modules is the KFRA / BDA-PCH recursion (S.12)."""
import numpy as np
import torch_reference

import mcalc as mc
from mcalc import layers as L
from mcalc.numeric.verify import sample_values


def _network():
    layers = [L.Linear.renamed("1"), L.SigmoidLinear.renamed("2"), L.SigmoidLinear.renamed("3")]
    return layers, mc.chain("Net", [*layers, L.MSE])


def test_recursion_S12_gives_the_exact_hessian_blocks(rng):
    layers, net = _network()
    values = sample_values(net, rng, {"n": 3, "m": 3})
    # forward through the modules, remembering each module's input
    inputs, z = [], values["x"]
    for m in layers:
        inputs.append(z)
        local = {**{s.name: values[s.name] for s in m.params}, m.inputs[0].name: z}
        z = m.forward(local)
    loss = mc.derive(L.MSE)
    point = {"x": z, "y": values["y"]}
    dz = loss.evaluate_gradient("x", point, np.ones(1))  # δz⁽ℓ⁾
    Hz = loss.evaluate_hessian("x", point)  # 𝓗z⁽ℓ⁾ = 2I  (S.10)
    blocks = {}
    for m, x_in in zip(reversed(layers), reversed(inputs)):  # (S.12a–c), i = ℓ−1, …, 1
        d = mc.derive(m)
        local = {**{s.name: values[s.name] for s in m.params}, m.inputs[0].name: x_in}
        for p in m.params:
            blocks[p.name] = d.evaluate_hbp(p.name, local, dz=dz, Hz=Hz)
        Hz, dz = d.evaluate_hbp("x", local, dz=dz, Hz=Hz), d.evaluate_gradient("x", local, dz)
    # the whole network as one module, derived analytically, and torch autograd agree block by block
    whole = mc.derive(net)
    for p in net.params:
        exact_block = torch_reference.dense_rules(net, p.name, values, np.ones(1), np.zeros((1, 1)))["exact"]
        np.testing.assert_allclose(blocks[p.name], exact_block, atol=1e-10)
        np.testing.assert_allclose(whole.evaluate_hessian(p.name, values), exact_block, atol=1e-10)


def test_S12b_weight_block_is_kronecker_of_the_bias_block():
    d = mc.derive(L.SigmoidLinear)
    x = L.SigmoidLinear.inputs[0]
    # 𝓗 vec W⁽ⁱ⁾ = φ(z⁽ⁱ⁻¹⁾) φ(z⁽ⁱ⁻¹⁾)ᵀ ⊗ 𝓗b⁽ⁱ⁾ with 𝓗b⁽ⁱ⁾ = 𝓗z⁽ⁱ⁾  (S.12a, b)
    assert d.hbp("W") == mc.simplify(mc.kron(mc.sigmoid(x) @ mc.sigmoid(x).T, d.hbp("b")))


def test_chain_rejects_clashing_names_and_wrong_shapes():
    import pytest

    with pytest.raises(mc.DeclarationError, match="clashes"):
        mc.chain("Bad", [L.Linear, L.SigmoidLinear])
    x3 = mc.Vector("x", 3)
    fixed = mc.Module("Fixed", output=mc.tanh(x3), inputs=[x3])
    with pytest.raises(mc.DeclarationError, match="expects input"):
        mc.chain("Bad", [L.Linear, fixed])


def test_chain_unifies_dimensions():
    _, net = _network()
    dims = sorted(str(d) for d in net.dimensions)
    assert dims == ["m", "m2", "m3", "n"], dims  # each layer's width is its own dimension
    assert net.output.is_scalar
