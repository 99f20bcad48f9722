"""Convolutional networks from the model spec (issue 14): 1x40-conv(m,k,…)-relu-…-flatten-10, with PyTorch's
losses, gradients and Gauss–Newton products, trained by every optimiser and from the command line."""
import json

import numpy as np
import pytest

import mcalc as mc
from mcalc.train import data as D
from mcalc.train.model_spec import Activation, Conv, Flatten, Pool, Signal, Width, parse_spec
from mcalc.train.network import Network
from mcalc.train.optimizers import make_optimizer
from mcalc.train.trainer import train

SPEC = "2x9-conv(3,3,pad=1)-tanh-conv(4,3,stride=2)-relu-flatten-5"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MCALC_CACHE", str(tmp_path / "cache"))  # each convolution's code, generated afresh


def test_the_spec_of_a_convolutional_network():
    assert parse_spec("1x40-conv(32,5,pad=2)-relu-avgpool(2)-conv(8,3,stride=2,dil=2)-maxpool(2)-flatten-10") == [
        Signal(1, (40,)), Conv(32, 5, padding=2), Activation("ReLU"), Pool("avg", 2), Conv(8, 3, stride=2, dilation=2),
        Pool("max", 2), Flatten(), Width(10)]
    for bad, message in [("40-conv(8,5)-10", "a convolution needs a signal"),
                         ("1x40-conv(8)-flatten-10", r"'conv\(8\)' needs 2 numbers"),
                         ("1x40-maxpool(2,dil=2)-flatten-10", "unknown option 'dil'"),
                         ("1x40-maxpool(2,pad=2)-flatten-10", "padding at most half the window"),
                         ("1x40-conv(8,5,pad=x)-flatten-10", "'pad=x' in 'conv\\(8,5,pad=x\\)' is not a whole number"),
                         ("1x40-conv(8,5,pad=-1)-flatten-10", r"'pad=-1' in 'conv\(8,5,pad=-1\)' is not a whole"),
                         ("1x40-conv(8,5,stride=0)-flatten-10", "needs positive filters, kernel, stride and dil"),
                         ("64--10", "an empty token"), ("64-10-", "an empty token"),
                         ("1x40-conv(8,5-flatten-10", "unbalanced parentheses"),
                         ("1x40-conv(8,5))-flatten-10", "unbalanced parentheses"),
                         ("1x40-conv(8,5,step=2)-flatten-10", "unknown option 'step'"),
                         ("1x8x8-conv(8,(3,2))-flatten-10", r"'conv\(8,\(3,2\)\)' gives a size per dimension"),
                         ("1x8x8-conv(8,3,stride=(1,2))-flatten-10", "one number serves every dimension"),
                         ("1x40-flatten-relu-10", "must follow a width, a convolution")]:
        with pytest.raises(mc.McalcError, match=message):
            parse_spec(bad)
    with pytest.raises(mc.McalcError, match=r"a width follows a signal of 8 × 40; flatten it first"):
        Network("1x40-conv(8,5,pad=2)-10")
    with pytest.raises(mc.McalcError, match=r"conv leaves no positions of its input of 1 × 4"):
        Network("1x4-conv(8,5)-flatten-10")
    with pytest.raises(mc.McalcError, match=r"pool leaves no positions of its input of 2 × 3 × 1"):
        Network("1x3x1-conv(2,1)-maxpool(2)-flatten-10")
    with pytest.raises(mc.McalcError, match=r"conv needs a signal or an image, but follows a vector of 9"):
        Network("1x3x3-flatten-conv(2,1)-10")


def _torch_logits(x, K1, b1, K2, b2, W, b):
    """The same network in PyTorch, by its functional convolutions: flatten position by position (mcalc's
    vec of a channels × positions matrix)."""
    import torch.nn.functional as F

    h = F.relu(F.conv1d(F.conv1d(x, K1.reshape(3, 2, 3), b1, padding=1).tanh(), K2.reshape(4, 3, 3), b2, stride=2))
    return F.linear(h.transpose(1, 2).reshape(len(x), -1), W, b)


NAMES = ["conv1.K", "conv1.b", "conv2.K", "conv2.b", "W1", "b1"]


def _batch(B=6, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(18, B))  # each column the vec of a 2 × 9 signal: position by position
    labels = rng.integers(0, 5, B)
    return X, labels, np.eye(5)[:, labels]


def test_a_convolutional_network_has_pytorchs_loss_gradients_and_gauss_newton_products():
    import torch

    net = Network(SPEC, seed=1)
    assert net.shapes == [(2, 9), (3, 9), (4, 4), (16, 1), (5, 1)] and net.widths == [18, 27, 16, 5]
    assert net.params["conv1.K"].shape == (3, 6) and net.params["conv2.K"].shape == (4, 9)
    X, labels, Y = _batch()
    x = torch.tensor(X.T.reshape(-1, 9, 2).transpose(0, 2, 1).copy())
    params = [torch.tensor(net.params[n].reshape(-1) if n.endswith(".b") or n == "b1" else net.params[n],
                           requires_grad=True) for n in NAMES]
    loss = torch.nn.functional.cross_entropy(_torch_logits(x, *params), torch.tensor(labels))
    loss.backward()
    value, grads, _ = net.backward(X, Y)
    assert value == pytest.approx(loss.item(), rel=1e-12)
    for name, p in zip(NAMES, params):
        np.testing.assert_allclose(grads[name], p.grad.numpy().reshape(grads[name].shape), rtol=1e-10, atol=1e-13)
    # the Gauss–Newton product Jᵀ 𝓗L J v against torch's Jacobian-vector products of the logits
    rng = np.random.default_rng(3)
    V = {k: rng.normal(size=v.shape) for k, v in net.params.items()}
    got = net.curvature_product(X, Y, "gn")(V)
    primals = tuple(p.detach() for p in params)
    tangents = tuple(torch.tensor(V[n]).reshape(p.shape) for n, p in zip(NAMES, params))
    logits = lambda *values: _torch_logits(x, *values)  # noqa: E731
    z, Jv = torch.autograd.functional.jvp(logits, primals, tangents)
    probabilities = torch.softmax(z, 1)  # 𝓗L of the batch-mean cross-entropy: (diag p − p pᵀ)/B per sample
    HJv = (probabilities * Jv - probabilities * (probabilities * Jv).sum(1, keepdim=True)) / len(x)
    _, JtHJv = torch.autograd.functional.vjp(logits, primals, HJv)
    assert max(float(t.abs().max()) for t in JtHJv) > 1e-4
    for name, expected in zip(NAMES, JtHJv):
        np.testing.assert_allclose(got[name], expected.numpy().reshape(got[name].shape), rtol=1e-9, atol=1e-12,
                                   err_msg=name)


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "hbp-newton", "kfac", "kbfgs", "hf-gn", "hf-newton"])
def test_every_optimizer_trains_a_convolutional_network(optimizer):
    """Every optimiser at its defaults on the synthetic data as one-channel signals (six epochs: hf-newton's
    Newton steps swing the training loss on this ReLU network, 1.7–2.4 over the first four, 1.29 at the
    fifth; the README's robustness section says why)."""
    data = D.load_dataset("synthetic", seed=0)
    net = Network(f"1x{data.features}-conv(4,3,pad=1)-relu-flatten-{data.classes}", seed=0)
    result = train(net, data, make_optimizer(optimizer), epochs=6, batch_size=64, seed=0)
    history = result["history"]  # 5 classes: chance is 0.2, and a loss of log 5 at the start
    assert history[-1]["test_accuracy"] > 0.4 and min(h["train_loss"] for h in history) < np.log(data.classes)


def test_kbfgs_factors_a_convolution_over_its_patches_and_positions():
    """K-BFGS's first step on a convolution, transcribed by hand: Ā over the zero-padded patches of the
    training signals (a loop over positions), H_a = (Ā + √λ I)⁻¹, H_g = I, the momentum 0.1 (∇ + τθ) of
    [K b]; then the pair that updates H_g: the changes of the pre-activations and of the per-sample
    gradients at them, averaged over positions and samples (KF-QN-CNN's), s scaled by 1 − 0.9."""
    from mcalc.train.optimizers import KBFGS

    rng = np.random.default_rng(0)
    net = Network("2x7-conv(3,3,pad=1)-tanh-flatten-4", seed=0)
    X, X_train = rng.normal(size=(14, 5)), rng.normal(size=(14, 20))
    Y = np.eye(4)[:, rng.integers(0, 4, 5)]
    # a sample's column is vec of its (channels × positions) signal; padded: (channels, positions + 2, samples)
    signals = np.pad(X_train.reshape(7, 2, -1).transpose(1, 0, 2), ((0, 0), (1, 1), (0, 0)))
    patches = [np.append(signals[:, t:t + 3, i].reshape(-1), 1.0) for i in range(20) for t in range(7)]
    A = sum(np.outer(p, p) for p in patches) / len(patches)  # E[Σₜ ãₜ ãₜᵀ] / T, channel-major taps
    optimizer = KBFGS(lr=0.5, damping=0.3)
    optimizer.prepare(net, X_train)
    np.testing.assert_allclose(optimizer.A[0], A, atol=1e-12)
    _, grads, _ = net.backward(X, Y)
    theta = {name: value.copy() for name, value in net.params.items()}
    _, inputs_before = net.forward(X)
    updates = optimizer.step(net, grads, {}, (X, Y))
    K, b = net.layers[0].params["K"], net.layers[0].params["b"]
    gradient = 0.1 * (np.hstack([grads[K], grads[b]]) + 1e-5 * np.hstack([theta[K], theta[b]]))
    expected = -0.5 * gradient @ np.linalg.inv(A + np.sqrt(0.3) * np.eye(len(A)))
    np.testing.assert_allclose(np.hstack([updates[K], updates[b]]), expected, atol=1e-12)
    _, inputs_after = net.forward(X, net.params_plus(updates))
    change = (inputs_before[1] - inputs_after[1]).reshape(7, 3, 5)  # (positions, channels, samples)
    s, _ = optimizer.pairs[0]
    np.testing.assert_allclose(s[:, 0], 0.1 * change.mean(axis=(0, 2)), atol=1e-12)


def test_a_convolutional_network_trains_from_the_command_line(tmp_path):
    from mcalc import cli

    out = tmp_path / "cnn.json"
    assert cli.main(["train", "--data", "mnist1d", "--model", "1x40-conv(8,5,pad=2)-relu-flatten-10",
                     "--optimizer", "sgd", "--epochs", "2", "--json", str(out)]) == 0
    history = json.loads(out.read_text())["history"]
    assert history[-1]["test_accuracy"] > 0.3 and history[-1]["train_loss"] < history[0]["train_loss"]


@pytest.mark.parametrize("pool", ["avg", "max"])
def test_overlapping_padded_pooling_is_pytorchs(pool):
    """{pool}pool(3,stride=2,pad=1) over images: overlapping windows, a padding that average pooling counts
    (PyTorch's default) and max pooling never takes (PyTorch pads it with −∞; the inputs here are
    negative, so a zero would win), against avg_pool2d and max_pool2d with their gradients."""
    import torch
    import torch.nn.functional as F

    net = Network(f"1x5x6-{pool}pool(3,stride=2,pad=1)-flatten-4", seed=0)
    assert net.shapes == [(1, 30), (1, 9), (9, 1), (4, 1)]
    rng = np.random.default_rng(0)
    X, labels = -np.abs(rng.normal(size=(30, 3))) - 0.1, rng.integers(0, 4, 3)
    x = torch.tensor(X.T.reshape(3, 1, 5, 6).copy(), requires_grad=True)
    W, b = (torch.tensor(net.params[n], requires_grad=True) for n in ("W1", "b1"))
    pooled = (F.avg_pool2d if pool == "avg" else F.max_pool2d)(x, 3, stride=2, padding=1)
    loss = F.cross_entropy(F.linear(pooled.reshape(3, -1), W, b[:, 0]), torch.tensor(labels))
    loss.backward()
    value, grads, _ = net.backward(X, np.eye(4)[:, labels])
    assert value == pytest.approx(loss.item(), rel=1e-12)
    np.testing.assert_allclose(grads["W1"], W.grad.numpy(), rtol=1e-10, atol=1e-13)


def test_same_padding_is_tensorflows_as_deepobs_pads():
    """pad=same (TensorFlow's, as DeepOBS' 3C3D pads with ZeroPad2d): ⌈L/s⌉ outputs, an odd total padding's
    extra zero after; here 7 × 6 → 4 × 3 (padding 1 and 1, then 0 and 1) → 2 × 2 (padding 0 and 1, 1 and 1
    split), against F.pad, conv2d and max_pool2d, with the gradients."""
    import torch
    import torch.nn.functional as F

    net = Network("1x7x6-conv(2,3,stride=2,pad=same)-relu-maxpool(3,stride=2,pad=same)-flatten-3", seed=0)
    assert net.shapes == [(1, 42), (2, 12), (2, 4), (8, 1), (3, 1)]
    assert net.layers[0].window[2] == (1, (0, 1))  # rows: 2 split evenly; columns: 1, after
    rng = np.random.default_rng(2)
    X, labels = rng.normal(size=(42, 4)), rng.integers(0, 3, 4)
    x = torch.tensor(X.T.reshape(4, 1, 7, 6).copy())
    K, b, W, c = (torch.tensor(net.params[n], requires_grad=True) for n in ("conv1.K", "conv1.b", "W1", "b1"))
    h = F.relu(F.conv2d(F.pad(x, (0, 1, 1, 1)), K.reshape(2, 1, 3, 3), b[:, 0], stride=2))
    h = F.max_pool2d(F.pad(h, (1, 1, 0, 1)), 3, stride=2)  # ZeroPad2d, then MaxPool2d: after a ReLU the same
    loss = F.cross_entropy(F.linear(h.permute(0, 2, 3, 1).reshape(4, -1), W, c[:, 0]), torch.tensor(labels))
    loss.backward()
    value, grads, _ = net.backward(X, np.eye(3)[:, labels])
    assert value == pytest.approx(loss.item(), rel=1e-12)
    for name, p in (("conv1.K", K), ("conv1.b", b), ("W1", W)):
        assert np.abs(p.grad.numpy()).max() > 1e-4
        np.testing.assert_allclose(grads[name], p.grad.numpy(), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("pool", ["avg", "max"])
def test_an_image_network_has_pytorchs_loss_gradients_and_gauss_newton_products(pool):
    """2x9x8-conv(3,3,stride=2,pad=1,dil=2)-tanh-{pool}pool(2)-conv(4,2)-relu-flatten-5: Conv2d, AvgPool2d and
    MaxPool2d over images whose pixels are a sample's columns row by row, against PyTorch's conv2d,
    avg_pool2d and max_pool2d: the loss, every gradient and the Gauss–Newton product."""
    import torch
    import torch.nn.functional as F

    net = Network(f"2x9x8-conv(3,3,stride=2,pad=1,dil=2)-tanh-{pool}pool(2)-conv(4,2,pad=1)-relu-flatten-5", seed=4)
    # 9 × 8 → 4 × 3 (stride 2, dilation 2) → 2 × 1 (pooling) → 3 × 2 (a 2 × 2 kernel, padding 1)
    assert net.shapes == [(2, 72), (3, 12), (3, 2), (4, 6), (24, 1), (5, 1)]
    names = ["conv1.K", "conv1.b", "conv2.K", "conv2.b", "W1", "b1"]
    pooling = F.avg_pool2d if pool == "avg" else F.max_pool2d

    def logits(x, K1, b1, K2, b2, W, b):
        h = pooling(F.conv2d(x, K1.reshape(3, 2, 3, 3), b1, stride=2, padding=1, dilation=2).tanh(), 2)
        h = F.relu(F.conv2d(h, K2.reshape(4, 3, 2, 2), b2, padding=1))
        return F.linear(h.permute(0, 2, 3, 1).reshape(len(x), -1), W, b)  # pixel by pixel, channels within

    rng = np.random.default_rng(1)
    X = rng.normal(size=(144, 6))  # each column the vec of a 2 × 72 image: pixel by pixel
    labels = rng.integers(0, 5, 6)
    x = torch.tensor(X.T.reshape(6, 72, 2).transpose(0, 2, 1).reshape(6, 2, 9, 8).copy())
    params = [torch.tensor(net.params[n].reshape(-1) if net.params[n].shape[1] == 1 else net.params[n],
                           requires_grad=True) for n in names]
    loss = F.cross_entropy(logits(x, *params), torch.tensor(labels))
    loss.backward()
    value, grads, _ = net.backward(X, np.eye(5)[:, labels])
    assert value == pytest.approx(loss.item(), rel=1e-12)
    for name, p in zip(names, params):
        assert np.abs(p.grad.numpy()).max() > 1e-4, name
        np.testing.assert_allclose(grads[name], p.grad.numpy().reshape(grads[name].shape), rtol=1e-10, atol=1e-13)
    V = {k: rng.normal(size=v.shape) for k, v in net.params.items()}
    got = net.curvature_product(X, np.eye(5)[:, labels], "gn")(V)
    primals = tuple(p.detach() for p in params)
    tangents = tuple(torch.tensor(V[n]).reshape(p.shape) for n, p in zip(names, params))
    z, Jv = torch.autograd.functional.jvp(lambda *values: logits(x, *values), primals, tangents)
    probabilities = torch.softmax(z, 1)
    HJv = (probabilities * Jv - probabilities * (probabilities * Jv).sum(1, keepdim=True)) / len(x)
    _, JtHJv = torch.autograd.functional.vjp(lambda *values: logits(x, *values), primals, HJv)
    for name, expected in zip(names, JtHJv):
        np.testing.assert_allclose(got[name], expected.numpy().reshape(got[name].shape), rtol=1e-9, atol=1e-12,
                                   err_msg=name)


def test_digits_train_as_images():
    """Digits as 1 × 8 × 8 images (each sample's 64 features are its pixels row by row): a small CNN with
    hbp-newton at its defaults learns them."""
    data = D.load_dataset("digits", seed=0)
    net = Network("1x8x8-conv(6,3,pad=1)-relu-maxpool(2)-flatten-10", seed=0)
    assert net.shapes == [(1, 64), (6, 64), (6, 16), (96, 1), (10, 1)]
    history = train(net, data, make_optimizer("hbp-newton"), epochs=2, batch_size=64, seed=0)["history"]
    assert history[-1]["test_accuracy"] > 0.85, history[-1]


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_kfac_factors_a_convolution_as_kfc_equal_to_curvlinops(kfac_approx):
    """kfac's factors of a convolution (exact Fisher): Ā = E[Σₜ ãₜ ãₜᵀ]/T over the patches with their bias row
    and G = E[Σₜ gₜ gₜᵀ] (KFC's, K-FAC-expand), or the positions summed out first (K-FAC-reduce), against
    curvlinops' K-FAC of the same kind (type-2 Fisher) of the same network in PyTorch, a Conv2d over 1 × L
    images, in float64: Ā ⊗ G equal to its [weight, bias] block up to the batch size (curvlinops' loss is
    the sum, mcalc's the mean)."""
    import curvlinops  # installed by `make test` (the Makefile's PEERS)
    import torch

    net = Network("1x7-conv(3,3,pad=1)-tanh-flatten-4", seed=0)
    rng = np.random.default_rng(0)
    B, m, c, k, L = 5, 3, 1, 3, 7
    X = rng.normal(size=(L, B))
    kfac = make_optimizer("kfac", fisher="exact", kfac_approx=kfac_approx)
    kfac.prepare(net, X)
    assert kfac.block_params == []  # the convolution is factored, not stepped through HBP blocks
    A, G = kfac._statistics(net, X)[0]

    class PositionMajor(torch.nn.Module):  # mcalc's flatten: position by position, the channels within
        def forward(self, x):
            return x[:, :, 0, :].transpose(1, 2).reshape(len(x), -1)

    model = torch.nn.Sequential(torch.nn.Conv2d(c, m, (1, k), padding=(0, 1)), torch.nn.Tanh(), PositionMajor(),
                                torch.nn.Linear(m * L, 4)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor(net.params["conv1.K"].reshape(m, c, 1, k)))
        model[0].bias.copy_(torch.tensor(net.params["conv1.b"][:, 0]))
        model[3].weight.copy_(torch.tensor(net.params["W1"]))
        model[3].bias.copy_(torch.tensor(net.params["b1"][:, 0]))
    images = torch.tensor(X.T)[:, None, None, :]
    operator = curvlinops.KFACLinearOperator(
        model, torch.nn.CrossEntropyLoss(reduction="sum"), list(model.parameters()),
        [(images, torch.zeros(B, dtype=torch.long))], fisher_type="type-2", kfac_approx=kfac_approx,
        separate_weight_and_bias=False, check_deterministic=False)  # [K b] jointly, as kfac-jax and KFC
    n = m * c * k + m
    reference = (operator.to_scipy() @ np.eye(operator.shape[1]))[:n, :n] / B
    # curvlinops' order: the weight row-major (o, j), then the bias (o); mcalc's: vec [K b], column-major
    order = np.array([j * m + o for o in range(m) for j in range(c * k)] + [c * k * m + o for o in range(m)])
    assert np.abs(reference).max() > 1e-3
    np.testing.assert_allclose(np.kron(A, G)[np.ix_(order, order)], reference, rtol=1e-10, atol=1e-12)


def test_the_cost_model_factors_only_what_would_be_formed_sample_by_sample():
    """approximation='auto' (hbp-newton's default): (6) for every module whose generated code forms it in
    closed form, 6-kfac for a convolution's, whose (6) weight block is a mean of per-sample Kronecker
    products; the blocks are those of the rule it names."""
    from mcalc.modes import Approximation, Curvature

    net = Network(SPEC, seed=0)
    rules = {layer.module: net.batch_rule(layer, Curvature.GGN, Approximation.AUTO) for layer in net.layers}
    assert rules == {"Conv1d_k3s1p1d1": "6-kfac", "Tanh": "6", "Conv1d_k3s2p0d1": "6-kfac", "ReLU": "6", "Linear": "6"}
    assert ("ggn", "6") in net.code["Conv1d_k3s1p1d1"].HBP_PER_SAMPLE and not net.code["Linear"].HBP_PER_SAMPLE
    X, _, Y = _batch()
    auto = net.backward(X, Y, "ggn", "auto")[2]
    factored, exact = net.backward(X, Y, "ggn", "6-kfac")[2], net.backward(X, Y, "ggn", "6")[2]
    for name in net.params:
        np.testing.assert_allclose(auto[name].to_dense(), factored[name].to_dense(), rtol=1e-12)
    assert np.abs(exact["conv1.K"].to_dense() - factored["conv1.K"].to_dense()).max() > 1e-4  # they differ there


@pytest.mark.parametrize("pool", ["avg", "max"])
def test_pooling_is_pytorchs_and_verifies(pool):
    """avgpool(k), (1/k) (I_c ⊗ 1_kᵀ) unfold(X, k, stride=k), and maxpool(k), the selection (I_c ⊗ 1_kᵀ)
    (mask ⊙ unfold(X)) by each window's first maximum: against finite differences (every rule, the
    generated code) and, in a network, PyTorch's avg_pool1d and max_pool1d with their gradients."""
    import torch
    import torch.nn.functional as F

    from mcalc.layers.convolution import avg_pooling, max_pooling
    from mcalc.numeric.verify import verify_module
    from mcalc.numeric.verify_backend import verify_backend

    declare = avg_pooling if pool == "avg" else max_pooling
    for checks in (verify_module(declare((2,))), verify_backend(declare((3,)), "numpy")):
        assert checks and all(c.ok for c in checks), [c for c in checks if not c.ok]
    net = Network(f"2x9-conv(3,3,pad=1)-tanh-{pool}pool(2)-flatten-5", seed=2)
    assert net.shapes == [(2, 9), (3, 9), (3, 4), (12, 1), (5, 1)]
    X, labels, Y = _batch()
    x = torch.tensor(X.T.reshape(-1, 9, 2).transpose(0, 2, 1).copy())
    K, b, W, c = (torch.tensor(net.params[n], requires_grad=True) for n in ("conv1.K", "conv1.b", "W1", "b1"))
    h = (F.avg_pool1d if pool == "avg" else F.max_pool1d)(F.conv1d(x, K.reshape(3, 2, 3), b[:, 0], padding=1).tanh(), 2)
    loss = F.cross_entropy(F.linear(h.transpose(1, 2).reshape(len(x), -1), W, c[:, 0]), torch.tensor(labels))
    loss.backward()
    value, grads, _ = net.backward(X, Y)
    assert value == pytest.approx(loss.item(), rel=1e-12)
    np.testing.assert_allclose(grads["conv1.K"], K.grad.numpy(), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(grads["W1"], W.grad.numpy(), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("pool", ["avg", "max"])
def test_a_poolings_adjoint_folds_its_taps_without_repeating_them(pool):
    """A pooling's δX is the fold of (δZ ⊗ 1_taps) ⊙ mask (max) or of δZ ⊗ 1_taps (average): the generated
    code folds δZ tap by tap (array_ops.fold_repeated), never making the taps-times larger repeat, and
    gives what the fold of the repeat gives, over overlapping, strided, padded windows of images."""
    import inspect

    from mcalc.codegen.store import load_code
    from mcalc.layers.convolution import avg_pooling, max_pooling
    from mcalc.runtime.array_ops import _selected_inputs, fold, fold_repeated, unfold, window_argmax

    module = (avg_pooling if pool == "avg" else max_pooling)((3, 3), (2, 2), ((0, 1), (1, 1)), (7, 8))
    source = inspect.getsource(load_code(module, "numpy").gradients.__globals__["_gradients_all"])
    assert "_fold_repeated(" in source and "repeat(" not in source.replace("_fold_repeated(", "")
    rng = np.random.default_rng(3)
    geometry = ((3, 3), (2, 2), ((0, 1), (1, 1)), (1, 1), (7, 8))
    X = rng.normal(size=(2, 5 * 56))  # 2 channels, 5 images of 7 × 8
    U = unfold(X, *geometry)
    mask = window_argmax(X, *geometry) if pool == "max" else None
    dZ = rng.normal(size=(2, U.shape[1]))
    repeated = np.repeat(dZ, 9, axis=0) * (mask if mask is not None else 1)
    expected = fold(repeated, *geometry)
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(fold_repeated(dZ, mask, *geometry), expected, rtol=1e-14, atol=1e-14)
    if mask is not None:  # window_argmax's own mask is scattered by the inputs it selected; a copy, tap by tap
        assert _selected_inputs(mask) is not None and _selected_inputs(mask.copy()) is None
        assert not mask.flags.writeable  # the selection stays the mask's own
        np.testing.assert_allclose(fold_repeated(dZ, mask.copy(), *geometry), expected, rtol=1e-14, atol=1e-14)


def test_max_poolings_output_and_tangent_gather_the_inputs_its_windows_selected():
    """Max pooling's Z = (I ⊗ 1ᵀ)(M ⊙ unfold X) and R{Z} (unfold V in place of X) read each window's selected
    input (array_ops.select_taps), M read from X's windows: the generated forward and jvp never unfold X or
    V, and the gather gives what
    the mask applied to the patches gives (a copy of the mask, not window_argmax's own, is so applied)."""
    import inspect

    from mcalc.codegen.store import load_code
    from mcalc.layers.convolution import max_pooling
    from mcalc.runtime.array_ops import select_taps, unfold, window_argmax

    geometry = ((3, 3), (2, 2), ((0, 1), (1, 1)), (1, 1), (7, 8))
    functions = load_code(max_pooling(*geometry[:3], geometry[4]), "numpy").forward.__globals__
    for name in ("forward", "_jvp_all"):
        source = inspect.getsource(functions[name])
        assert "_select_taps(" in source and "_window_argmax(" in source and "_unfold(" not in source
    rng = np.random.default_rng(5)
    X, V = rng.normal(size=(2, 5 * 56)), rng.normal(size=(2, 5 * 56))
    mask = window_argmax(X, *geometry)
    for Y in (X, V):
        expected = (mask * unfold(Y, *geometry)).reshape(2, 9, -1).sum(axis=1)
        assert np.abs(expected).max() > 0.1
        np.testing.assert_array_equal(select_taps(Y, mask, *geometry), expected)
        np.testing.assert_array_equal(select_taps(Y, mask.copy(), *geometry), expected)


@pytest.mark.parametrize("spec", ["2x5-avgpool(2,stride=1)-flatten-3", "2x4x6-maxpool(2)-conv(2,1)-tanh-flatten-3"])
def test_a_network_that_pools_before_its_first_parameters_has_its_curvature_products(spec):
    """Nothing moves below the first parameters: Gauss–Newton and Hessian products skip a pooling there (its
    rgradients, with no tangent, raised, and its gradients read the loss's R{δ} of another shape); the
    Hessian product is the central difference of the gradients."""
    net = Network(spec, seed=0)
    rng = np.random.default_rng(1)
    X, Y = rng.normal(size=(net.shapes[0][0] * net.shapes[0][1], 3)), np.eye(3)[:, [0, 2, 1]]
    V = {name: rng.normal(size=value.shape) for name, value in net.params.items()}
    assert all(np.isfinite(v).all() for v in net.curvature_product(X, Y, "gn")(V).values())
    product, params, h = net.curvature_product(X, Y, "hessian")(V), net.params, 1e-6
    gradients = []
    for sign in (1, -1):
        net.params = {k: p + sign * h * V[k] for k, p in params.items()}
        gradients.append(net.backward(X, Y)[1])
    for name in params:
        expected = (gradients[0][name] - gradients[1][name]) / (2 * h)
        assert np.abs(expected).max() > 1e-3
        np.testing.assert_allclose(product[name], expected, rtol=1e-5, atol=1e-8)


def test_max_pooling_selects_each_windows_first_maximum():
    """window_argmax marks the first of a window's equal maxima (as PyTorch's max pooling routes δ), never
    a tap in the padding, even where every input of the window is negative (ReLU'd images tie at 0)."""
    from mcalc.runtime.array_ops import unfold, window_argmax

    geometry = ((3, 3), (2, 2), ((1, 1), (0, 1)), (1, 1), (7, 8))
    rng = np.random.default_rng(4)
    for X in (np.maximum(np.round(rng.normal(size=(2, 3 * 56)), 1), 0), -np.abs(rng.normal(size=(2, 3 * 56)))):
        U = unfold(X, *geometry)
        reads = unfold(np.ones((1, 56)), *geometry) > 0  # (taps, T): the taps inside the image
        windows = np.where(np.tile(reads, (1, 3)), U.reshape(2, 9, -1), -np.inf)
        expected = np.arange(9)[:, None] == windows.argmax(axis=1)[:, None, :]
        np.testing.assert_array_equal(window_argmax(X, *geometry).reshape(2, 9, -1), expected)


def test_max_pooling_selects_the_inputs_pytorch_selects():
    """Over random images, windows, strides, paddings and dilations, with ties (ReLU'd, rounded inputs) and
    without: the output window_argmax's selection gathers, and the input position each window selected, are
    PyTorch's max_pool2d output and its return_indices."""
    import torch
    import torch.nn.functional as F

    from mcalc.runtime.array_ops import _selected_inputs, select_taps, window_argmax

    rng = np.random.default_rng(8)
    checked = 0
    while checked < 60:
        c, n, H, W, kh, kw, sh, sw, dh, dw = (int(v) for v in rng.integers([1, 1, 3, 3, 1, 1, 1, 1, 1, 1],
                                                                            [4, 4, 10, 10, 4, 4, 4, 4, 3, 3]))
        ph, pw = int(rng.integers(0, kh // 2 + 1)), int(rng.integers(0, kw // 2 + 1))
        if H + 2 * ph - dh * (kh - 1) < 1 or W + 2 * pw - dw * (kw - 1) < 1:
            continue
        x = rng.normal(size=(n, c, H, W))
        x = np.maximum(np.round(x, 1), 0) if checked % 2 else x
        out, indices = F.max_pool2d(torch.tensor(x), (kh, kw), (sh, sw), (ph, pw), (dh, dw), return_indices=True)
        X = x.transpose(1, 0, 2, 3).reshape(c, -1)
        geometry = ((kh, kw), (sh, sw), (ph, pw), (dh, dw), (H, W))
        mask = window_argmax(X, *geometry)
        np.testing.assert_array_equal(select_taps(X, mask, *geometry), out.numpy().transpose(1, 0, 2, 3).reshape(c, -1))
        images = (np.arange(c)[:, None, None] * n + np.arange(n)[None, :, None]) * H * W  # each image's first entry
        np.testing.assert_array_equal(_selected_inputs(mask).reshape(c, n, -1) - images,
                                      indices.numpy().transpose(1, 0, 2, 3).reshape(c, n, -1))
        checked += 1


def test_adjoints_keep_a_signals_layout_between_convolutions():
    """With ``matrices``, the adjoints between convolutions and poolings stay per-sample matrices, the
    activations between them run on that layout, and every adjoint is the one given as columns."""
    from mcalc.runtime.array_ops import columns_of_matrices

    net = Network("2x12-conv(3,3,pad=1)-relu-maxpool(2)-conv(4,3)-tanh-flatten-5", seed=1)
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(24, 7)), np.eye(5)[:, rng.integers(0, 5, 7)]
    Z, inputs = net.forward(X)
    dZ = net.output_gradient(Z, Y)
    caches = [{} for _ in net.layers]
    as_matrices = net.adjoints(inputs, dZ, caches, matrices=True)
    as_columns = net.adjoints(inputs, dZ)
    # conv1, relu and the pooling; conv2's, columns through tanh from the flatten, made its matrices once
    assert {p for p, a in as_matrices.items() if a.ndim == 3} == {0, 1, 2, 3}
    for position, adjoint in as_columns.items():
        assert adjoint.ndim == 2 and np.abs(adjoint).max() > 1e-6
        np.testing.assert_allclose(columns_of_matrices(as_matrices[position]), adjoint, rtol=1e-13, atol=1e-15)
    again = net.adjoints(inputs, 2 * dZ, caches, matrices=True)  # the caches hold the layout's inputs
    np.testing.assert_allclose(columns_of_matrices(again[0]), 2 * as_columns[0], rtol=1e-13, atol=1e-15)


def test_a_float32_network_stays_float32():
    """Every array of a float32 CNN's passes is float32: the forward pass, gradients, adjoints, Gauss–Newton
    products and K-FAC's statistics (ReLU′, a numpy.select of constants, and the one-hot targets of the
    exact Fisher had turned the adjoints float64, and every GEMM after them twice as slow)."""
    net = Network("2x12-conv(3,3,pad=1)-relu-maxpool(2)-conv(4,3)-tanh-flatten-5", seed=1, dtype=np.float32)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(24, 7)).astype(np.float32)
    Y = np.eye(5, dtype=np.float32)[:, rng.integers(0, 5, 7)]
    Z, inputs = net.forward(X)
    _, grads, _ = net.backward(X, Y)
    adjoints = net.adjoints(inputs, Z, matrices=True)
    product = net.curvature_product(X, Y, "gn")(grads)
    arrays = [Z, *inputs[1:], *grads.values(), *adjoints.values(), *product.values()]
    for fisher in ("exact", "mc"):
        arrays += [f for pair in make_optimizer("kfac", fisher=fisher)._statistics(net, X).values() for f in pair]
    assert len(arrays) > 20 and {a.dtype for a in arrays} == {np.dtype(np.float32)}


def test_kfac_statistics_change_a_batchs_layout_once(monkeypatch):
    """K-FAC's exact Fisher runs a backward pass per class: the layers' inputs as per-sample matrices (a
    pooling's, a convolution's, a signal's activation's) are made once for the batch, in the forward pass
    or the first class's pass, and kept in the layers' caches, never made again for the next class."""
    from collections import Counter

    import mcalc.train.network as network_module

    made, kept = Counter(), []  # kept alive: no two arrays share an id
    original = network_module.matrices_of_columns

    def counted(columns, rows):
        made[id(columns)] += 1
        kept.append(columns)
        return original(columns, rows)

    monkeypatch.setattr(network_module, "matrices_of_columns", counted)
    net = Network("2x12-conv(3,3,pad=1)-relu-maxpool(2)-conv(4,3)-tanh-flatten-5", seed=1)
    X = np.random.default_rng(0).normal(size=(24, 7))
    make_optimizer("kfac", fisher="exact")._statistics(net, X)
    assert made and max(made.values()) == 1  # the data's, for conv1; the signal stays matrices after it


def test_k_fac_reads_a_convolutions_patches_from_its_forward_pass():
    """A convolution's generated forward pass keeps its input's patches under PATCHES_KEY in the layer's
    cache, and K-FAC's factor inputs read them there instead of unfolding the input again."""
    from mcalc.runtime.array_ops import side_by_side, unfold
    from mcalc.runtime.generated_code import PATCHES_KEY
    from mcalc.train.optimizers import factor_inputs

    net = Network("2x12-conv(3,3,pad=1)-relu-maxpool(2)-conv(4,3)-tanh-flatten-5", seed=1)
    X = np.random.default_rng(0).normal(size=(24, 7))
    caches = [{} for _ in net.layers]
    _, inputs = net.forward(X, caches=caches, matrices=True)
    for position in (0, 3):  # the two convolutions
        layer, cache = net.layers[position], caches[position]
        assert layer.patches(inputs[position], cache) is cache[PATCHES_KEY]
        fresh = unfold(side_by_side(layer.takes(inputs[position])), *layer.window)
        np.testing.assert_array_equal(cache[PATCHES_KEY], fresh)
        np.testing.assert_array_equal(factor_inputs(layer, inputs[position], np, cache=cache)[:-1], fresh)


def test_a_forward_pass_keeps_a_signal_as_matrices_between_its_layers(monkeypatch):
    """With ``matrices`` the forward pass hands a signal from layer to layer as per-sample matrices, through
    its activations: the same outputs as the columns' pass, every layer's input equal to the columns' once
    made columns, and no layout copy between the first convolution and the Linear layer after the flatten
    (the columns' pass makes two at each boundary inside the signal: to columns and back)."""
    import mcalc.train.network as network_module
    from mcalc.runtime.array_ops import columns_of_matrices

    copies = []
    for name in ("matrices_of_columns", "columns_of_matrices"):
        original = getattr(network_module, name)
        monkeypatch.setattr(network_module, name, lambda a, *rest, _f=original, _n=name: copies.append(_n) or
                            _f(a, *rest))
    net = Network("2x12-conv(3,3,pad=1)-relu-maxpool(2)-conv(4,3)-tanh-flatten-5", seed=1)
    X = np.random.default_rng(0).normal(size=(24, 7))
    Z, inputs = net.forward(X)
    by_columns = len(copies)
    copies.clear()
    Z_kept, kept = net.forward(X, matrices=True)
    np.testing.assert_array_equal(Z_kept, Z)
    assert [a.ndim for a in kept] == [2, 3, 3, 3, 3, 2]  # conv1's data and the Linear layer's input: columns
    # the data's for conv1, the signal's for the Linear layer: 2 copies, where the columns' pass made them at
    # every boundary of the signal's layers
    assert copies == ["matrices_of_columns", "columns_of_matrices"] and by_columns == 6
    for ours, theirs in zip(kept, inputs):
        np.testing.assert_array_equal(columns_of_matrices(ours), theirs)


@pytest.mark.parametrize("pool", ["avg", "max"])
def test_poolings_verify_on_the_cuda_emulator(pool):
    """The CuPy backend's pooling code, its δX folded tap by tap on CuPy arrays (the emulator's), against
    finite differences over overlapping, padded windows of images."""
    from mcalc.layers.convolution import avg_pooling, max_pooling
    from mcalc.numeric.verify_backend import verify_backend
    from mcalc.runtime import emulator

    if emulator.unavailable_reason():
        pytest.skip(emulator.unavailable_reason())
    module = (avg_pooling if pool == "avg" else max_pooling)((3, 3), (2, 2), ((0, 1), (0, 1)), (6, 7))
    checks = verify_backend(module, "cupy-emulated")
    assert checks and all(c.ok for c in checks), [c for c in checks if not c.ok]
    assert sum(c.error > 0 for c in checks) > len(checks) // 2  # real comparisons, not zeros with zeros


def test_a_piecewise_linear_cnn_has_one_curvature():
    """Convolutions, ReLUs, a max pooling and Linear layers have no second-order module terms (almost
    everywhere), so HBP's exact, GGN and PCH-abs blocks are one matrix (the README's 3C3D section)."""
    net = Network("2x8x8-conv(4,3)-relu-maxpool(2,stride=1)-conv(3,2)-relu-flatten-6-relu-5", seed=0)
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(128, 6)), np.eye(5)[rng.integers(0, 5, 6)].T
    blocks = {curvature: net.backward(X, Y, curvature, "6")[2] for curvature in ("exact", "ggn", "pch-abs")}
    for name, block in blocks["ggn"].items():
        ggn = block.to_dense()
        assert np.abs(ggn).max() > 0, name
        for curvature in ("exact", "pch-abs"):
            np.testing.assert_array_equal(blocks[curvature][name].to_dense(), ggn)
