"""The Gram matrix of a stride-1 convolution's patches from shifted products of its input
(runtime/patch_gram.py), against syrk of the unfolded patches, and K-FAC's and K-BFGS's factors through it;
the index map of unfold applied to a matrix's rows in place (array_ops.unfold_rows, fold_rows), against P."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcalc.runtime.array_ops import unfold
from mcalc.runtime.patch_gram import patch_gram, plan_shifts, prefer_shifted
from mcalc.train.network import Network
from mcalc.train.optimizers import input_factor, make_optimizer


def unfolded_gram(x, kernel, padding, dilation, size):
    """Σ ã ãᵀ as K-FAC made it before: the patches unfolded, a row of ones under them, a @ aᵀ."""
    patches = unfold(x.reshape(x.shape[0], -1), kernel, (1,) * len(kernel), padding, dilation, size)
    a = np.concatenate([patches, np.ones((1, patches.shape[1]))])
    return a @ a.T


@st.composite
def windows(draw):
    dims = draw(st.sampled_from([1, 2]))
    kernel = tuple(draw(st.integers(1, 4)) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    padding = tuple(draw(st.one_of(st.integers(0, 2), st.tuples(st.integers(0, 2), st.integers(0, 2))))
                    for _ in range(dims))
    # at least one output position along each dimension: some taps may read only padding
    size = tuple(max(draw(st.integers(1, 9)), d * (k - 1) + 1 - (2 * p if isinstance(p, int) else sum(p)))
                 for k, d, p in zip(kernel, dilation, padding))
    channels, batch = draw(st.integers(1, 5)), draw(st.integers(1, 3))
    return channels, batch, kernel, padding, dilation, size


@settings(max_examples=200, deadline=None)
@given(windows(), st.integers(0, 2**32 - 1))
def test_the_shifted_products_are_the_gram_matrix_of_the_patches(window, seed):
    channels, batch, kernel, padding, dilation, size = window
    x = np.random.default_rng(seed).normal(size=(channels, batch, int(np.prod(size))))
    expected = unfolded_gram(x, kernel, padding, dilation, size)
    np.testing.assert_allclose(patch_gram(x, kernel, padding, dilation, size), expected, rtol=1e-11, atol=1e-11)
    if not np.abs(expected[:-1, :-1]).any():  # zeros compared only where every tap reads padding alone
        plan = plan_shifts(kernel, padding, dilation, size)
        windows = [plan.window(j, (0, plan.size[0]), (0, plan.size[1])) for j in range(len(plan.starts))]
        assert all(top >= bottom or left >= right for top, bottom, left, right in windows)


def test_the_shifted_products_serve_where_they_are_cheaper():
    """3C3D's second and third convolutions take them at batch 64; its first (3 channels), a stride-2
    convolution, a three-dimensional one, small ones and any on a GPU's dispatch costs keep syrk."""
    assert prefer_shifted(64, 64, (3, 3), (1, 1), (0, 0), (1, 1), (14, 14))
    assert prefer_shifted(96, 64, (3, 3), (1, 1), (1, 1), (1, 1), (6, 6))
    assert not prefer_shifted(3, 64, (5, 5), (1, 1), (0, 0), (1, 1), (32, 32))
    assert not prefer_shifted(64, 64, (3, 3), (2, 2), (0, 0), (1, 1), (14, 14))
    assert not prefer_shifted(64, 64, (3, 3, 3), (1, 1, 1), (0, 0, 0), (1, 1, 1), (6, 6, 6))
    assert not prefer_shifted(32, 64, (5,), (1,), (0,), (1,), (20,))  # measured 0.50 ms against syrk's 0.42
    assert not prefer_shifted(64, 64, (3, 3), (1, 1), (0, 0), (1, 1), (14, 14), backend="cupy")


@pytest.mark.parametrize("spec", ["24x12x12-conv(24,4,pad=same)-relu-conv(16,3,dil=2,pad=2)-tanh-flatten-5",
                                  "48x80-conv(32,4,pad=same)-relu-conv(16,5,dil=2)-tanh-flatten-5"])
def test_k_fac_and_k_bfgs_factors_are_the_same_either_way(spec, monkeypatch):
    """K-FAC's statistics and a K-BFGS step are those of the unfolded patches' syrk, to round-off, with the
    shifted products serving the convolutions (checked to serve: they are counted)."""
    import mcalc.train.optimizers as optimizers

    net = Network(spec, seed=0)
    rng = np.random.default_rng(1)
    X, y = rng.normal(size=(net.layers[0].input_rows * np.prod(net.layers[0].window[-1]), 32)), rng.integers(0, 5, 32)
    Y = np.eye(5)[y].T
    calls = []
    monkeypatch.setattr(optimizers, "patch_gram", lambda *a: calls.append(1) or patch_gram(*a))

    def kfac_and_kbfgs():
        statistics = make_optimizer("kfac", fisher="exact")._statistics(net, X)
        kbfgs = make_optimizer("kbfgs")
        kbfgs.prepare(net, X)
        _, grads, blocks = net.backward(X, Y, *(kbfgs.curvature_request() or (None, "6")))
        return statistics, kbfgs.step(net, grads, blocks, (X, Y))

    serving = [layer for layer in net.layers if layer.window is not None and prefer_shifted(
        layer.input_rows, X.shape[1], *layer.window)]
    shifted = kfac_and_kbfgs()
    assert serving and len(calls) == 3 * len(serving)  # in kfac's statistics, kbfgs's pass and its step
    monkeypatch.setattr(optimizers, "prefer_shifted", lambda *a: False)
    unfolded = kfac_and_kbfgs()
    for position, (A, G) in unfolded[0].items():
        np.testing.assert_allclose(shifted[0][position][0], A, rtol=1e-10, atol=1e-13)
        np.testing.assert_array_equal(shifted[0][position][1], G)
    for name, update in unfolded[1].items():
        np.testing.assert_allclose(shifted[1][name], update, rtol=1e-8, atol=1e-12)


def test_input_factor_of_a_linear_layer_is_its_inputs_syrk():
    net = Network("6-4-tanh-3", seed=0)
    a = np.random.default_rng(0).normal(size=(6, 5))
    A, mean = input_factor(net.layers[0], a, np, with_mean=True)
    ones = np.vstack([a, np.ones((1, 5))])
    np.testing.assert_allclose(A, ones @ ones.T / 5)
    np.testing.assert_allclose(mean[:, 0], ones.mean(axis=1))


@settings(max_examples=100, deadline=None)
@given(windows(), st.integers(1, 4), st.booleans(), st.integers(0, 2**32 - 1))
def test_unfold_and_fold_of_rows_are_the_index_map_and_its_transpose(window, columns, stacked, seed):
    """unfold_rows(M) = P M and fold_rows(U) = Pᵀ U, M's rows read in place (no layout copy), for P the
    matrix of unfold (vec unfold X = P vec X), built column by column from unfold (itself checked against
    PyTorch's), on a stack of matrices too; any stride."""
    from mcalc.runtime.array_ops import fold_rows, grid, unfold_rows

    channels, _, kernel, padding, dilation, size = window
    rng = np.random.default_rng(seed)
    stride = tuple(int(s) for s in rng.integers(1, 3, len(size)))
    n, patches = int(np.prod(size)), int(np.prod(grid(size, kernel, stride, padding, dilation)))
    unfolded = [unfold(e.reshape(channels, n, order="F"), kernel, stride, padding, dilation, size)
                for e in np.eye(channels * n)]
    P = np.stack([u.reshape(-1, order="F") for u in unfolded], axis=1)
    lead = (2,) if stacked else ()
    M = rng.normal(size=lead + (channels * n, columns))
    U = rng.normal(size=lead + (channels * int(np.prod(kernel)) * patches, columns))
    np.testing.assert_allclose(unfold_rows(M, kernel, stride, padding, dilation, size, channels), P @ M, atol=1e-12)
    np.testing.assert_allclose(fold_rows(U, kernel, stride, padding, dilation, size, channels), P.T @ U, atol=1e-12)
