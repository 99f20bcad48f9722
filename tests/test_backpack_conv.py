"""mcalc's HBP on a Conv2d network side by side with BackPACK 1.7.1 (issue 14), in float64.

BackPACK's KFRA (``HBP`` with the batch-averaged backpropagation strategy) passes the batch average of
Jᵀ 𝓗 J backwards module by module, through the convolutions, ReLUs, max pooling, flatten and Linear
layers: approximation (6) with the Gauss–Newton curvature, which mcalc's HBP computes too. At each
convolution BackPACK factors its weight block as [Σₜₛ of 𝓗̄ at its output (its T × T position blocks
summed), E[Σₜ uₜ uₜᵀ] over its unfolded input], and each Linear weight as [𝓗̄ at its output, E[x xᵀ]]:
both factors are compared with what mcalc's pass holds there, so the test checks every 𝓗̄ mcalc
backpropagates, not only the last.

BackPACK's ``HBP`` (Gauss–Newton, on the network with sigmoids), ``DiagGGNExact``, ``KFAC`` (Monte Carlo Fisher,
for the labels mcalc's kfac draws) and ``KFLR`` (exact Fisher) are compared with mcalc's HBP, Gauss–Newton
diagonal and kfac factors.
"""
import numpy as np
import pytest

from mcalc.train.network import Network

torch = pytest.importorskip("torch", reason="the peers are installed by `make test`")
backpack = pytest.importorskip("backpack", reason="BackPACK is installed by `make test`")

SPEC = "2x7x7-conv(3,3)-relu-conv(4,2)-relu-maxpool(2)-flatten-5"
C_OUT, PIXELS = 4, 4  # the flattened 4 channels × 2 × 2 pixels: mcalc's pixel by pixel, PyTorch's channel by channel
FLATTEN = np.array([p * C_OUT + c for c in range(C_OUT) for p in range(PIXELS)])


def _torch_model(net: Network, activation: str = "ReLU"):
    from torch import nn

    act = getattr(nn, activation)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), act(), nn.Conv2d(3, 4, 2), act(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(16, 5)).double()
    with torch.no_grad():
        for k, m in enumerate([model[0], model[2]], 1):
            m.weight.copy_(torch.tensor(net.params[f"conv{k}.K"].reshape(m.weight.shape)))
            m.bias.copy_(torch.tensor(net.params[f"conv{k}.b"][:, 0]))
        model[6].weight.copy_(torch.tensor(net.params["W1"][:, FLATTEN]))
        model[6].bias.copy_(torch.tensor(net.params["b1"][:, 0]))
    return model


def _backpack_pass(net: Network, X: np.ndarray, labels: np.ndarray, extension, activation: str = "ReLU"):
    """The PyTorch copy of ``net``, extended, after one backward pass of the mean cross-entropy on the
    images of ``X`` (each column vec of its channels × pixels) under BackPACK's ``extension``."""
    from backpack import extend

    B = X.shape[1]
    images = torch.tensor(X.T.reshape(B, 49, 2).transpose(0, 2, 1).reshape(B, 2, 7, 7).copy())
    model, loss_fn = extend(_torch_model(net, activation)), extend(torch.nn.CrossEntropyLoss())
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # BackPACK's max pooling makes its buffer in the default dtype
    try:
        with backpack.backpack(extension):
            loss_fn(model(images), torch.tensor(labels)).backward()
    finally:
        torch.set_default_dtype(default)
    return model


def _assert_kfac_factors_equal(net: Network, expand: dict, reduce: dict, model, field: str) -> None:
    """BackPACK's Kronecker factors [G, A] of every weight (in ``field``) against mcalc's kfac statistics:
    A is T times K-FAC-expand's (its bias row left out), G K-FAC-reduce's; a bias's factor is G."""
    linear = net.layers.index(next(layer for layer in net.layers if layer.module == "Linear"))
    for position, module, T in ((0, model[0], 25), (2, model[2], 16), (linear, model[6], 1)):
        G_theirs, A_theirs = (f.detach().numpy() for f in getattr(module.weight, field))
        A, G = T * expand[position][0][:-1, :-1], reduce[position][1]
        if position == linear:  # the Linear layer after flatten: PyTorch orders its inputs channel by channel
            A = A[np.ix_(FLATTEN, FLATTEN)]
        assert np.abs(G_theirs).max() > 1e-6 and np.abs(A_theirs).max() > 1e-6
        np.testing.assert_allclose(G, G_theirs, rtol=1e-10, atol=1e-12 * np.abs(G_theirs).max(), err_msg=position)
        np.testing.assert_allclose(A, A_theirs, rtol=1e-10, atol=1e-12 * np.abs(A_theirs).max(), err_msg=position)
        np.testing.assert_allclose(getattr(module.bias, field)[0].detach().numpy(), G_theirs, rtol=1e-12)


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_hbp_on_a_conv2d_network_backpropagates_backpacks_kfra_curvature():
    from backpack.extensions import KFRA

    rng = np.random.default_rng(0)
    net = Network(SPEC, seed=3)
    B = 6
    X, labels = rng.normal(size=(2 * 49, B)), rng.integers(0, 5, B)
    model = _backpack_pass(net, X, labels, KFRA())

    curvature = net.output_curvatures(X, np.eye(5)[:, labels], "ggn", "6")  # 𝓗̄ at every layer's output
    _, inputs = net.forward(X)
    positions = {0: 25, 2: 16}  # the convolutions' output positions (5 × 5, 4 × 4)
    for layer_position, module in ((0, model[0]), (2, model[2])):
        out_factor, in_factor = (f.detach().numpy() for f in module.weight.kfra)
        channels, T = out_factor.shape[0], positions[layer_position]
        H = curvature[layer_position].reshape(T, channels, T, channels)  # mcalc's 𝓗̄: position-major
        summed = H.sum(axis=(0, 2))
        assert np.abs(out_factor).max() > 1e-6  # curvature that got there, not zeros
        np.testing.assert_allclose(summed, out_factor, rtol=1e-10, atol=1e-12 * np.abs(out_factor).max())
        patches = net.layers[layer_position].patches(inputs[layer_position])
        np.testing.assert_allclose(patches @ patches.T / B, in_factor, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(module.bias.kfra[0].detach().numpy(), summed, rtol=1e-10,
                                   atol=1e-12 * np.abs(summed).max())
    H_out, x_cov = (f.detach().numpy() for f in model[6].weight.kfra)
    linear = net.layers.index(next(layer for layer in net.layers if layer.module == "Linear"))
    np.testing.assert_allclose(curvature[linear], H_out, rtol=1e-10, atol=1e-14)
    x = inputs[linear]
    np.testing.assert_allclose((x @ x.T / B)[np.ix_(FLATTEN, FLATTEN)], x_cov, rtol=1e-10, atol=1e-14)


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_hbp_on_a_sigmoid_conv2d_network_is_backpacks_hbp():
    """BackPACK's ``HBP('ggn', 'sum', 'average', …)`` (its general HBP extension) on the network with
    sigmoids: at each convolution its output factor is Σₜₛ of mcalc's 𝓗̄ under (6), at the Linear layer 𝓗̄
    itself. Its other curvatures do not run here: their residual terms behind a convolution stop at an
    assertion of BackPACK 1.7.1 (``HBPBase.add_diag_to_mat`` takes a diagonal of one axis, not (C, H, W))."""
    from backpack.extensions import HBP

    rng = np.random.default_rng(4)
    net = Network(SPEC.replace("relu", "sigmoid"), seed=6)
    B = 5
    X, labels = rng.normal(size=(2 * 49, B)), rng.integers(0, 5, B)
    model = _backpack_pass(net, X, labels, HBP("ggn", "sum", "average", "E[J^T E(H) J]"), "Sigmoid")
    curvature_at = net.output_curvatures(X, np.eye(5)[:, labels], "ggn", "6")
    for layer_position, module, T in ((0, model[0], 25), (2, model[2], 16)):
        out_factor = module.weight.hbp[0].detach().numpy()
        channels = out_factor.shape[0]
        summed = curvature_at[layer_position].reshape(T, channels, T, channels).sum(axis=(0, 2))
        assert np.abs(out_factor).max() > 1e-6
        np.testing.assert_allclose(summed, out_factor, rtol=1e-9, atol=1e-12 * np.abs(out_factor).max())
    linear = net.layers.index(next(layer for layer in net.layers if layer.module == "Linear"))
    np.testing.assert_allclose(curvature_at[linear], model[6].weight.hbp[0].detach().numpy(), rtol=1e-10)


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_the_gauss_newton_diagonal_of_a_conv2d_network_is_backpacks():
    """The exact Gauss–Newton matrix's diagonal, mcalc's from its curvature products (one per parameter,
    :meth:`Network.curvature_operator`), BackPACK's from ``DiagGGNExact`` (the classes' square roots
    backpropagated)."""
    from backpack.extensions import DiagGGNExact

    rng = np.random.default_rng(1)
    net = Network(SPEC, seed=4)
    X, labels = rng.normal(size=(2 * 49, 5)), rng.integers(0, 5, 5)
    model = _backpack_pass(net, X, labels, DiagGGNExact())
    operator = net.curvature_operator(X, np.eye(5)[:, labels], "gn")
    size = operator.shape[0]
    diagonal = net.unflat(np.array([operator.matvec(np.eye(size)[:, i])[i] for i in range(size)]))
    theirs = {"conv1.K": model[0].weight, "conv1.b": model[0].bias, "conv2.K": model[2].weight,
              "conv2.b": model[2].bias, "W1": model[6].weight, "b1": model[6].bias}
    for name, parameter in theirs.items():
        ours = diagonal[name][:, FLATTEN] if name == "W1" else diagonal[name]
        expected = parameter.diag_ggn_exact.detach().numpy().reshape(ours.shape)
        assert np.abs(expected).max() > 1e-6, name
        np.testing.assert_allclose(ours, expected, rtol=1e-9, atol=1e-12 * np.abs(expected).max(), err_msg=name)


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_mc_fisher_kfac_factors_of_a_conv2d_network_are_backpacks_kfac_for_the_same_labels():
    """BackPACK's ``KFAC`` (one sampled label per input, its square root backpropagated) against mcalc's
    ``kfac`` with ``fisher='mc'``, BackPACK's sampler made to draw the labels mcalc's draws (``KFAC._statistics``'s
    inverse-CDF sampling from its seeded generator, transcribed here). BackPACK's convolution input factor
    Σₜ uₜuₜᵀ is T times mcalc's K-FAC-expand factor (bias row left out); its output factor sums the positions'
    gradients first, as K-FAC-reduce's does; a Linear layer's are the same in both."""
    from backpack.core.derivatives.crossentropyloss import CrossEntropyLossDerivatives
    from backpack.extensions import KFAC

    from mcalc.runtime.array_ops import softmax
    from mcalc.train.optimizers import make_optimizer

    rng = np.random.default_rng(2)
    net = Network(SPEC, seed=5)
    B = 7
    X, labels = rng.normal(size=(2 * 49, B)), rng.integers(0, 5, B)
    kfac = {approx: make_optimizer("kfac", fisher="mc", kfac_approx=approx, seed=11) for approx in ("expand", "reduce")}
    expand, reduce = (kfac[approx]._statistics(net, X) for approx in ("expand", "reduce"))
    p = softmax(net.forward(X)[0])
    draws = np.random.default_rng(11).random(B)  # the draws of a fresh kfac with seed 11
    sampled = np.minimum((draws[None, :] > np.cumsum(p, axis=0)).sum(axis=0), 4)
    assert len(set(sampled)) > 1 and (sampled != p.argmax(axis=0)).any()  # labels that are samples, not the mode

    class Drawn:  # BackPACK's Categorical, drawing mcalc's labels: [mc_samples = 1, N]
        def sample(self, shape):
            return torch.tensor(sampled)[None, :].expand(*shape, B)

    original = CrossEntropyLossDerivatives._make_distribution
    CrossEntropyLossDerivatives._make_distribution = lambda self, subsampled_input: Drawn()
    try:
        model = _backpack_pass(net, X, labels, KFAC(mc_samples=1))
    finally:
        CrossEntropyLossDerivatives._make_distribution = original

    _assert_kfac_factors_equal(net, expand, reduce, model, "kfac")


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_exact_fisher_kfac_factors_of_a_conv2d_network_are_backpacks_kflr():
    """BackPACK's ``KFLR`` (every class's square root of the loss Hessian backpropagated) against mcalc's
    ``kfac`` with ``fisher='exact'`` (a backward pass per column of the Fisher's C − 1 column root): the input
    factor is T times K-FAC-expand's, the output factor K-FAC-reduce's, as for ``KFAC`` above."""
    from backpack.extensions import KFLR

    from mcalc.train.optimizers import make_optimizer

    rng = np.random.default_rng(3)
    net = Network(SPEC, seed=7)
    B = 6
    X, labels = rng.normal(size=(2 * 49, B)), rng.integers(0, 5, B)
    expand, reduce = (make_optimizer("kfac", fisher="exact", kfac_approx=a)._statistics(net, X)
                      for a in ("expand", "reduce"))
    model = _backpack_pass(net, X, labels, KFLR())
    _assert_kfac_factors_equal(net, expand, reduce, model, "kflr")
