"""The Python API for people coming from PyTorch: networks from given weights and nn.Sequential models and back,
the curvature at every layer's output, curvature as SciPy LinearOperators, and clear errors."""
import numpy as np
import pytest
import torch
from scipy.sparse.linalg import LinearOperator, cg, eigsh

import mcalc as mc
from mcalc.train.network import Network
from mcalc.train.pytorch import from_torch, to_torch


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3), torch.nn.Softplus(),
                               torch.nn.Linear(3, 3)).double()


def _batch(seed=1, batch=7):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(batch, 5))
    labels = rng.integers(3, size=batch)
    return X, labels, np.eye(3)[:, labels]


def test_a_torch_model_and_its_network_compute_the_same_function_and_loss():
    model = _model()
    net = from_torch(model)
    assert net.spec == "5-4-tanh-3-softplus-3"
    X, labels, Y = _batch()
    Z, _ = net.forward(X.T)
    np.testing.assert_allclose(Z, model(torch.tensor(X)).detach().numpy().T, atol=1e-12)
    expected = torch.nn.functional.cross_entropy(model(torch.tensor(X)), torch.tensor(labels)).item()
    assert net.loss(X.T, Y) == pytest.approx(expected, rel=1e-12)  # the batch mean, as CrossEntropyLoss's
    back = to_torch(net)
    np.testing.assert_allclose(back(torch.tensor(X)).detach().numpy(), model(torch.tensor(X)).detach().numpy(),
                               atol=1e-12)


def test_gradients_match_torch_and_the_square_loss_is_the_per_sample_sum():
    model = _model(2)
    net = from_torch(model, loss="mse")
    X, _, Y = _batch(3)
    _, grads, _ = net.backward(X.T, Y)
    output = model(torch.tensor(X))
    # mcalc's square loss is (1/B) Σᵢ (zᵢ − yᵢ)ᵀ(zᵢ − yᵢ): D times PyTorch's MSELoss (the mean over B·D entries)
    loss = 3 * torch.nn.functional.mse_loss(output, torch.tensor(Y.T))
    assert net.loss(X.T, Y) == pytest.approx(loss.item(), rel=1e-12)
    loss.backward()
    torch_grads = [p.grad.numpy() for p in model.parameters()]
    np.testing.assert_allclose(net.flat(grads), np.concatenate([g.reshape(-1) for g in torch_grads]), atol=1e-12)


def test_given_weights_are_checked():
    net = Network("3-2-relu-2", seed=0)
    good = {"W1": np.ones((2, 3)), "b1": np.zeros(2), "W2": np.ones((2, 2)), "b2": np.zeros((2, 1))}
    net.load_weights(good)  # a PyTorch-layout bias (2,) is taken as the column (2, 1)
    assert net.params["b1"].shape == (2, 1)
    with pytest.raises(mc.McalcError, match=r"weight W1 of '3-2-relu-2' must be \(2, 3\), not \(3, 2\)"):
        Network("3-2-relu-2", weights={**good, "W1": np.ones((3, 2))})
    with pytest.raises(mc.McalcError, match=r"missing \['b2'\]; unexpected \['c2'\]"):
        net.load_weights({**{k: v for k, v in good.items() if k != "b2"}, "c2": np.zeros(2)})
    with pytest.raises(mc.McalcError, match=r"b1 .* must be \(2, 1\) or \(2,\), not \(7,\)"):
        net.load_weights({**good, "b1": np.zeros(7)})  # e.g. a bias of the batch size: refused, not broadcast


def test_unsupported_models_and_modes_get_clear_errors():
    with pytest.raises(mc.McalcError, match="Dropout is not supported"):
        from_torch(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(), torch.nn.Linear(2, 2)))
    with pytest.raises(mc.McalcError, match="start and end with a Linear"):
        from_torch(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()))
    with pytest.raises(mc.McalcError, match=r"layer 2: Linear without a bias \(bias=False\)"):
        from_torch(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 2, bias=False)))
    with pytest.raises(mc.McalcError, match="Linear layers and activations only, not Conv1d_k3s1p0d1"):
        to_torch(Network("1x8-conv(2,3)-flatten-3"))
    net = from_torch(_model())
    X, _, Y = _batch()
    with pytest.raises(mc.McalcError, match=r"unknown curvature 'hessian'; choose one of 'exact', 'ggn', 'pch-abs'"):
        net.backward(X.T, Y, "hessian")
    with pytest.raises(mc.McalcError, match=r"unknown approximation 6; choose one of '6', '7'"):
        net.backward(X.T, Y, "ggn", 6)


def test_output_curvatures_are_what_each_layer_receives():
    """The loss's Hessian at the last output (E[diag p − p pᵀ] for cross-entropy); a Linear layer passes
    Wᵀ 𝓗 W to its input under (6) (S.8a)."""
    net = from_torch(_model())
    X, _, Y = _batch()
    H = net.output_curvatures(X.T, Y, "ggn")
    assert len(H) == len(net.layers)
    Z, _ = net.forward(X.T)
    P = np.exp(Z - Z.max(0)) / np.exp(Z - Z.max(0)).sum(0)
    np.testing.assert_allclose(H[-1], np.mean([np.diag(p) - np.outer(p, p) for p in P.T], axis=0), atol=1e-12)
    W3 = net.params["W3"]
    np.testing.assert_allclose(H[-2], W3.T @ H[-1] @ W3, atol=1e-12)


def test_curvature_operators_work_with_scipy_and_match_torch():
    """The whole network's Hessian as a LinearOperator against torch's dense Hessian; eigsh and cg on it and on a
    block's operator."""
    model = _model(4)
    net = from_torch(model)
    X, labels, Y = _batch(5)
    operator = net.curvature_operator(X.T, Y, "hessian")
    params = [p.detach().clone() for p in model.parameters()]
    shapes = [p.shape for p in params]

    def loss_of(flat):
        pieces, start = [], 0
        for shape in shapes:
            n = int(np.prod(shape))
            pieces.append(flat[start:start + n].reshape(shape))
            start += n
        return torch.func.functional_call(model, dict(zip([n for n, _ in model.named_parameters()], pieces)),
                                          (torch.tensor(X),))

    theta = torch.cat([p.reshape(-1) for p in params])
    hessian = torch.autograd.functional.hessian(
        lambda t: torch.nn.functional.cross_entropy(loss_of(t), torch.tensor(labels)), theta).numpy()
    dense = operator @ np.eye(operator.shape[0])
    np.testing.assert_allclose(dense, hessian, atol=1e-10)
    assert np.abs(hessian).max() > 1e-2  # not a comparison of zeros
    top = eigsh(net.curvature_operator(X.T, Y, "gn"), k=1, which="LA", return_eigenvectors=False)[0]
    gn = net.curvature_operator(X.T, Y, "gn") @ np.eye(operator.shape[0])
    assert top == pytest.approx(np.linalg.eigvalsh(gn).max(), rel=1e-8)
    _, _, blocks = net.backward(X.T, Y, "ggn")
    block = blocks["W1"].as_linear_operator()
    np.testing.assert_allclose(block @ np.eye(block.shape[0]), blocks["W1"].to_dense(), atol=1e-12)
    rhs = np.random.default_rng(0).normal(size=block.shape[0])
    damped = LinearOperator(block.shape, matvec=lambda v: block @ v + 0.1 * v, dtype=float)
    solution, info = cg(damped, rhs, rtol=1e-12, maxiter=500)
    assert info == 0
    np.testing.assert_allclose(blocks["W1"].to_dense() @ solution + 0.1 * solution, rhs, atol=1e-8)


def test_rebinding_parameters_is_checked():
    net = Network("3-2-relu-2", seed=0)
    X, Y = np.ones((3, 2)), np.eye(2)
    with pytest.raises(mc.McalcError, match=r"parameters of '3-2-relu-2' must be"):
        net.params = {**net.params, "b1": np.zeros((2, 2))}  # a bias of the batch's size would broadcast
    with pytest.raises(mc.McalcError, match="must be"):
        net.params = {k: v for k, v in net.params.items() if k != "W2"}
    net.params = {k: v * 2 for k, v in net.params.items()}  # the same names and shapes: taken
    assert np.isfinite(net.loss(X, Y))
