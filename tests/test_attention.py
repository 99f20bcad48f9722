"""Single-head attention (issue 14): softmax of a matrix column by column, products of two per-sample
matrices lowered to batched products, against finite differences, torch autograd and PyTorch's
scaled_dot_product_attention."""
import numpy as np
import pytest
import torch_reference
from conftest import seeds_for

import mcalc as mc
from mcalc.codegen.generate import render
from mcalc.codegen.store import load_code
from mcalc.layers.attention import attention_pooling, self_attention
from mcalc.numeric.verify import sample_values, verify_module
from mcalc.numeric.verify_backend import verify_backend
from mcalc.runtime import emulator

MODULES = [self_attention(), attention_pooling()]
SIZES = {"d": 3, "T": 4, "h": 2, "m": 3}


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.name)
def test_rules_against_finite_differences_and_torch_autograd(module):
    checks = verify_module(module, seed=1)
    assert checks and all(c.ok for c in checks), [c for c in checks if not c.ok]
    rng = np.random.default_rng(2)
    values = sample_values(module, rng, SIZES)
    d = mc.derive(module)
    dz, Hz = seeds_for(int(np.size(module.forward(values))), rng)
    for v in module.variables:
        reference = torch_reference.dense_rules(module, v.name, values, dz, Hz)
        assert np.abs(reference["jacobian"]).max() > 1e-3, v.name
        linear = v.name == "V"  # z is linear in the values' weights: no curvature of their own
        assert linear == (np.abs(reference["second-order"]).max() < 1e-12), v.name
        np.testing.assert_allclose(d.evaluate_jacobian(v.name, values), reference["jacobian"], atol=1e-10)
        for c in mc.CURVATURES:
            np.testing.assert_allclose(d.evaluate_hbp(v.name, values, dz=dz, Hz=Hz, curvature=c), reference[c],
                                       atol=1e-10, err_msg=f"{v.name} {c}")


@pytest.mark.parametrize("backend", ["numpy", "cupy-emulated"])
def test_generated_code_matches_finite_differences_without_a_loop_over_the_batch(backend, tmp_path, monkeypatch):
    if backend == "cupy-emulated" and emulator.unavailable_reason():
        pytest.skip(emulator.unavailable_reason())
    monkeypatch.setenv("MCALC_CACHE", str(tmp_path))
    for module in MODULES:
        checks = verify_backend(module, backend)
        assert checks and all(c.ok for c in checks), [c for c in checks if not c.ok]
        assert sum(c.error > 0 for c in checks) > len(checks) // 2  # real comparisons, not zeros with zeros
        if backend == "numpy":
            source = render(module, "numpy")
            assert "for i in range" not in source and "_sample_matmul(" in source


def test_generated_self_attention_is_pytorchs_scaled_dot_product_attention(tmp_path, monkeypatch):
    """Z = V X softmax((K X)ᵀ (Q X)/√h), tokens as columns, against PyTorch's attention with tokens as rows,
    and its gradients against autograd's."""
    import torch
    import torch.nn.functional as F

    monkeypatch.setenv("MCALC_CACHE", str(tmp_path))
    code = load_code(self_attention(), "numpy")
    rng = np.random.default_rng(0)
    d, T, h, m, B = 5, 6, 3, 4, 7
    P = {"Q": rng.normal(size=(h, d)), "K": rng.normal(size=(h, d)), "V": rng.normal(size=(m, d))}
    X = rng.normal(size=(d, B, T))
    Z = code.forward(P, {"X": X})["Z"]
    x = torch.tensor(X.transpose(1, 2, 0).copy(), requires_grad=True)  # (B, T, d): tokens as rows
    weights = {k: torch.tensor(v, requires_grad=True) for k, v in P.items()}
    expected = F.scaled_dot_product_attention(x @ weights["Q"].T, x @ weights["K"].T, x @ weights["V"].T)
    np.testing.assert_allclose(Z, expected.detach().numpy().transpose(2, 0, 1), rtol=1e-12)
    dZ = rng.normal(size=Z.shape)
    expected.backward(torch.tensor(dZ.transpose(1, 2, 0).copy()))
    grads = code.gradients(P, {"X": X, "dz": dZ})
    np.testing.assert_allclose(grads["X"], x.grad.numpy().transpose(2, 0, 1), rtol=1e-10)
    for name in P:
        np.testing.assert_allclose(grads[name], weights[name].grad.numpy(), rtol=1e-10)


def test_an_attention_network_from_the_model_spec_has_pytorchs_gradients_and_trains(tmp_path, monkeypatch):
    """1x9-conv(4,3,pad=1)-tanh-attention(3)-relu-flatten-5: attention's parameters attention1.Q/K/V, its
    loss and gradients against PyTorch's, and hbp-newton at its defaults trains it."""
    import torch
    import torch.nn.functional as F

    from mcalc.train import data as D
    from mcalc.train.network import Network
    from mcalc.train.optimizers import make_optimizer
    from mcalc.train.trainer import train

    monkeypatch.setenv("MCALC_CACHE", str(tmp_path))
    net = Network("1x9-conv(4,3,pad=1)-tanh-attention(3)-relu-flatten-5", seed=0)
    assert net.shapes == [(1, 9), (4, 9), (4, 9), (36, 1), (5, 1)]
    assert net.params["attention1.Q"].shape == (3, 4) and net.params["attention1.V"].shape == (4, 4)
    rng = np.random.default_rng(1)
    X, labels = rng.normal(size=(9, 6)), rng.integers(0, 5, 6)
    names = ["conv1.K", "conv1.b", "attention1.Q", "attention1.K", "attention1.V", "W1", "b1"]
    p = {n: torch.tensor(net.params[n], requires_grad=True) for n in names}
    h = F.conv1d(torch.tensor(X.T[:, None, :]), p["conv1.K"].reshape(4, 1, 3), p["conv1.b"][:, 0], padding=1).tanh()
    tokens = h.transpose(1, 2)  # (B, T, channels)
    a = F.scaled_dot_product_attention(tokens @ p["attention1.Q"].T, tokens @ p["attention1.K"].T,
                                       tokens @ p["attention1.V"].T).relu()
    loss = F.cross_entropy(F.linear(a.reshape(6, -1), p["W1"], p["b1"][:, 0]), torch.tensor(labels))
    loss.backward()
    value, grads, _ = net.backward(X, np.eye(5)[:, labels])
    assert value == pytest.approx(loss.item(), rel=1e-12)
    for name in names:
        assert np.abs(p[name].grad.numpy()).max() > 1e-4, name
        np.testing.assert_allclose(grads[name], p[name].grad.numpy(), rtol=1e-9, atol=1e-13, err_msg=name)
    data = D.load_dataset("synthetic", seed=0)
    # pooled to 10 positions first: attention's curvature grows with the square of the positions
    net = Network(f"1x{data.features}-conv(4,3,pad=1)-tanh-avgpool(2)-attention(4)-relu-flatten-{data.classes}",
                  seed=0)
    history = train(net, data, make_optimizer("hbp-newton"), epochs=1, batch_size=64, seed=0)["history"]
    assert history[-1]["test_accuracy"] > 0.4 and history[-1]["train_loss"] < np.log(data.classes)


def test_attentions_per_sample_programs_average_chain_by_chain(tmp_path, monkeypatch):
    """The module's own second-order terms, sums of scaled and transposed chains through the T² space of the
    scores, are averaged chain by chain (runtime chain_mean: the samples' index summed inside each
    contraction, no stack of per-sample blocks): every HBP block equals that of the same code generated
    with each mean taken of its stack."""
    from mcalc.codegen import render as render_module

    module = self_attention()
    monkeypatch.setenv("MCALC_CACHE", str(tmp_path / "means"))
    averaged = load_code(module, "numpy")
    assert "_chain_mean(" in render(module, "numpy")
    monkeypatch.setattr(render_module, "mean_steps", lambda program: set())
    monkeypatch.setenv("MCALC_CACHE", str(tmp_path / "stacks"))
    stacked = load_code(module, "numpy")
    assert "_chain_mean(" not in render(module, "numpy")
    rng = np.random.default_rng(3)
    d, T, h, m, B = 3, 5, 2, 3, 6
    P = {"Q": rng.normal(size=(h, d)), "K": rng.normal(size=(h, d)), "V": rng.normal(size=(m, d))}
    S = {"X": rng.normal(size=(d, B, T)), "dz": rng.normal(size=(m, B, T))}
    Hz = rng.normal(size=(m * T, m * T))
    Hz = Hz @ Hz.T
    for mode in averaged.HBP:
        ours, theirs = averaged.HBP[mode](P, S, Hz), stacked.HBP[mode](P, S, Hz)
        assert ours.keys() == theirs.keys()
        for name in ours:
            expected = theirs[name].to_dense()
            assert np.abs(expected).max() > 1e-3, (mode, name)
            np.testing.assert_allclose(ours[name].to_dense(), expected, rtol=1e-10, atol=1e-12 * np.abs(expected).max(),
                                       err_msg=f"{mode} {name}")
