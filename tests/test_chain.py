"""runtime.chain: products of Kronecker factors, diagonals and matrices in the order of least cost."""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from mcalc.runtime.array_ops import commutation
from mcalc.runtime.chain import (
    CommutationFactor,
    DiagonalFactor,
    KronFactor,
    _combine,
    _product,
    _sketch,
    chain_mean,
    chain_product,
    plan,
)
from mcalc.runtime.tensor_network import compile_chain, signature


def _formed(f):
    if isinstance(f, KronFactor):
        return f.dense()
    if isinstance(f, DiagonalFactor):
        return np.eye(f.v.shape[-2]) * f.v
    if isinstance(f, CommutationFactor):
        return commutation(f.m, f.n, np)
    return f


def _left_to_right(factors):
    out = _formed(factors[0])
    for f in factors[1:]:
        out = out @ _formed(f)
    return out


@st.composite
def chains(draw):
    """A chain of 1–6 factors over one stack of samples: matrices, Kronecker products (either factor an
    identity), diagonals and commutation matrices, each shared or per sample, with compatible shapes; the
    first a matrix (a chain has an array to take its type from)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    samples = draw(st.integers(1, 3))
    array = lambda shape, own: rng.normal(size=((samples,) if own else ()) + shape)  # noqa: E731
    rows = draw(st.integers(1, 3)) * draw(st.integers(1, 3))
    factors = []
    for position in range(draw(st.integers(1, 6))):
        kind, own = draw(st.sampled_from(["dense", "kron", "diag", "perm"])), draw(st.booleans())
        if position == 0:
            kind = "dense"
        if kind == "perm":
            m = next((d for d in (3, 2) if rows % d == 0 and draw(st.booleans())), 1)
            factors.append(CommutationFactor(m, rows // m))
            continue
        if kind == "diag":
            factors.append(DiagonalFactor(array((rows, 1), own)))
            continue
        if kind == "kron":
            p = next((d for d in (3, 2, 1) if rows % d == 0 and draw(st.booleans())), 1)
            a_shape, b_shape = (p, draw(st.integers(1, 3))), (rows // p, draw(st.integers(1, 3)))
            identity = draw(st.sampled_from([None, "a", "b"]))
            if identity == "a":
                a_shape = (p, p)
            if identity == "b":
                b_shape = (rows // p, rows // p)
            a = None if identity == "a" else array(a_shape, own)
            b = None if identity == "b" else array(b_shape, own and identity != "b")
            cols = a_shape[1] * b_shape[1]
            factors.append(KronFactor(a, b, (rows, cols)))
        else:
            cols = draw(st.integers(1, 6))
            factors.append(array((rows, cols), own))
        rows = cols
    return factors


def _with_ones(factors, which):
    """The chain with the shared factors of the Kronecker products that ``which`` picks made 1 1ᵀ (as the
    softmax's Jacobian has it) and marked so, as the code generator marks them: the tensor network takes
    each as two sums."""
    shared = lambda x: x is not None and x.ndim == 2  # noqa: E731
    return [KronFactor(*(np.ones_like(x) if shared(x) else x for x in (f.a, f.b)), f.shape,
                       ones=(shared(f.a), shared(f.b))) if isinstance(f, KronFactor) and w else f
            for f, w in zip(factors, which + [False] * len(factors))]


@settings(max_examples=300, deadline=None)
@given(factors=chains(), which=st.lists(st.booleans(), min_size=6, max_size=6))
def test_every_chain_equals_its_product_left_to_right(factors, which):
    factors = _with_ones(factors, which)
    expected = _left_to_right(factors)
    out = chain_product(*factors)
    assert np.broadcast_shapes(out.shape, expected.shape) == expected.shape
    np.testing.assert_allclose(np.broadcast_to(out, expected.shape), expected, rtol=1e-10, atol=1e-10)


@settings(max_examples=300, deadline=None)
@given(factors=chains(), which=st.lists(st.booleans(), min_size=6, max_size=6))
def test_every_chains_mean_is_the_mean_of_its_products(factors, which):
    factors = _with_ones(factors, which)
    expected = _left_to_right(factors)
    expected = expected.mean(axis=0) if expected.ndim > 2 else expected
    np.testing.assert_allclose(chain_mean(*factors), expected, rtol=1e-10, atol=1e-10)


def test_attentions_chain_through_the_scores_costs_its_own_entries():
    """(I_T ⊗ A) diag(vec S) K_{T,T} (I_T ⊗ B) per sample is Σ A_ik S_kt B_tc at the entry (t, i), (k, c): the
    tensor network does T² d² products a sample, where the matrix-chain order, which can only apply or form
    each factor, goes through the T² space of the scores; its mean sums the samples inside the contraction."""
    rng = np.random.default_rng(5)
    samples, T, d = 4, 16, 3
    A, s, B = rng.normal(size=(samples, d, T)), rng.random(size=(samples, T * T, 1)), rng.normal(size=(samples, T, d))
    factors = [KronFactor(None, A, (T * d, T * T)), DiagonalFactor(s), CommutationFactor(T, T),
               KronFactor(None, B, (T * T, T * d))]
    expected = _left_to_right(factors)
    S = s[..., 0].reshape(samples, T, T).swapaxes(1, 2)  # vec S column by column: entry k + T t is S[k, t]
    entries = np.einsum("nik,nkt,ntc->ntikc", A, S, B).reshape(samples, T * d, T * d)
    np.testing.assert_allclose(expected, entries, rtol=1e-10)  # the closed form the structure gives
    np.testing.assert_allclose(chain_product(*factors), expected, rtol=1e-10)
    np.testing.assert_allclose(chain_mean(*factors), expected.mean(axis=0), rtol=1e-10)
    program = compile_chain(signature(tuple(factors)))
    assert program.cost <= 2 * samples * (T * d) ** 2
    assert plan(tuple(_sketch(f) for f in factors))[0] > 10 * program.cost


def test_a_chain_whose_splits_of_a_space_disagree_is_multiplied_in_the_matrix_chain_order():
    """(A ⊗ B) splits its 6 columns as 3 · 2, (C ⊗ D) its 6 rows as 2 · 3: no common refinement, no tensor
    network; the planner multiplies it."""
    rng = np.random.default_rng(6)
    factors = [KronFactor(rng.normal(size=(2, 3)), rng.normal(size=(3, 2)), (6, 6)),
               KronFactor(rng.normal(size=(2, 2)), rng.normal(size=(3, 3)), (6, 6))]
    assert compile_chain(signature(tuple(factors))) is None
    np.testing.assert_allclose(chain_product(*factors), _left_to_right(factors), rtol=1e-10)
    np.testing.assert_allclose(chain_mean(*factors), _left_to_right(factors), rtol=1e-10)


def test_attentions_chain_is_multiplied_from_its_ends_not_from_its_curvature():
    """(X ⊗ K X) diag(s) (I ⊗ Xᵀ Vᵀ) 𝓗z (I ⊗ V X) diag(s) (Xᵀ ⊗ Xᵀ Kᵀ) over 20 positions: from 𝓗z outward
    (the printer's sandwich order) every intermediate is T² × T²; the planned order costs a fraction."""
    rng = np.random.default_rng(0)
    B, d, T, h, m = 8, 8, 20, 4, 8
    X, K, V = rng.normal(size=(B, d, T)), rng.normal(size=(h, d)), rng.normal(size=(m, d))
    s = rng.random(size=(B, T * T, 1))
    Hz = rng.normal(size=(m * T, m * T))
    Xt = X.swapaxes(-1, -2)
    factors = [KronFactor(X, K @ X, (d * h, T * T)), DiagonalFactor(s), KronFactor(None, Xt @ V.T, (T * T, T * m)), Hz,
               KronFactor(None, V @ X, (m * T, T * T)), DiagonalFactor(s), KronFactor(Xt, Xt @ K.T, (T * T, d * h))]
    np.testing.assert_allclose(chain_product(*factors), _left_to_right(factors), rtol=1e-10)
    sketches = [_sketch(f) for f in factors]
    cost, _ = plan(tuple(sketches))
    # the printer's sandwich order: 𝓗z, then a factor on each side in turn, outward
    outward, middle = 0, sketches[3]
    for side, k in [("left", 2), ("right", 4), ("left", 1), ("right", 5), ("left", 0), ("right", 6)]:
        left, right = (sketches[k], middle) if side == "left" else (middle, sketches[k])
        outward += _combine(left, right)[0]
        middle = _product(left, right)
    assert cost < outward / 5


def test_block_diagonal_runs_are_multiplied_block_by_block():
    """(I_T ⊗ A) diag(vec S) (I_T ⊗ 1 1ᵀ) diag(vec S) (I_T ⊗ B), attention's softmax between two per-position
    factors, is block-diagonal all along: its product is T products of blocks, against the dense product,
    with both sides per sample or shared, and then applied to a matrix from either side."""
    rng = np.random.default_rng(4)
    S, T, d = 3, 5, 4
    A, Bs, s = rng.normal(size=(d, T)), rng.normal(size=(S, T, d)), rng.random(size=(S, T * T, 1))
    ones = np.ones((T, T))
    run = [KronFactor(None, A, (T * d, T * T)), DiagonalFactor(s), KronFactor(None, ones, (T * T, T * T)),
           DiagonalFactor(s), KronFactor(None, Bs, (T * T, T * d))]
    M = rng.normal(size=(T * d, 7))
    for factors in (run, [*run, M], [M.T, *run]):
        np.testing.assert_allclose(chain_product(*factors), _left_to_right(factors), rtol=1e-10)
    S, T, d = 64, 20, 16  # at attention's sizes (the planner reads shapes only)
    run = [KronFactor(None, np.empty((d, T)), (T * d, T * T)), DiagonalFactor(np.empty((S, T * T, 1))),
           KronFactor(None, np.empty((T, T)), (T * T, T * T)), DiagonalFactor(np.empty((S, T * T, 1))),
           KronFactor(None, np.empty((S, T, d)), (T * T, T * d))]
    cost, _ = plan(tuple(_sketch(f) for f in run))
    assert cost < S * (T * d) * (T * T) * (T * d) / 10  # the last product of a dense order, alone
