"""Eq. (8) per block: eigenbasis solves against dense solves, factor averages, the basis correction,
the cost model's choice, and the training loop skipping the curvature pass between renewals."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mcalc as mc
from mcalc.runtime.blocks import CurvatureBlock, GramFactor
from mcalc.train import data as D
from mcalc.train.block_solvers import (
    COSTS,
    DampedBlockSolver,
    Decompositions,
    SharedAverage,
    cg_flops,
    eigen_flops,
)
from mcalc.train.distributed import DataParallel
from mcalc.train.network import Network
from mcalc.train.optimizers import HBPNewton, make_optimizer
from mcalc.train.trainer import train


def _psd(rng, n, rank=None):
    a = rng.normal(size=(n, rank or n))
    return a @ a.T / (rank or n)


def _damped_dense_solve(block, g, alpha):
    C = block.to_dense()
    return np.linalg.solve(alpha * np.eye(len(C)) + (1 - alpha) * C, g.reshape(-1, order="F")).reshape(
        g.shape, order="F")


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 6), m=st.integers(1, 6), batch=st.integers(1, 8), gram=st.booleans(),
       alpha=st.floats(0.01, 1.0), seed=st.integers(0, 2**16))
def test_kronecker_eigenbasis_solves_the_damped_system(n, m, batch, gram, alpha, seed):
    """[α I + (1 − α)(A ⊗ B)]⁻¹ vec G through the factors' eigenbases equals the dense solve."""
    rng = np.random.default_rng(seed)
    a = GramFactor(rng.normal(size=(n, batch))) if gram else _psd(rng, n)
    block = CurvatureBlock(kron=[(a, _psd(rng, m))])
    g = rng.normal(size=(m, n))
    np.testing.assert_allclose(block.eigenbasis().solve_damped(g, alpha, 1 - alpha),
                               _damped_dense_solve(block, g, alpha), rtol=1e-8, atol=1e-10)


def test_dense_eigenbasis_and_its_spectrum():
    rng = np.random.default_rng(1)
    block = CurvatureBlock(dense=_psd(rng, 6))
    basis = block.eigenbasis()
    np.testing.assert_allclose(np.sort(basis.spectrum), np.linalg.eigvalsh(block.dense), atol=1e-12)
    g = rng.normal(size=(3, 2))  # a parameter of 6 entries: the dense block acts on its vec
    np.testing.assert_allclose(basis.solve_damped(g, 0.1, 0.9), _damped_dense_solve(block, g, 0.1), atol=1e-10)
    with pytest.raises(mc.McalcError, match="one Kronecker product or one dense matrix"):
        CurvatureBlock(kron=[(block.dense, block.dense)], dense=np.eye(36)).eigenbasis()


def test_shared_factors_are_averaged_and_decomposed_once():
    rng = np.random.default_rng(2)
    A1, B1, A2, B2 = _psd(rng, 3), _psd(rng, 4), _psd(rng, 3), _psd(rng, 4)
    weight = CurvatureBlock(kron=[(A1, B1)])
    bias = CurvatureBlock(dense=B1)  # as a linear layer's blocks under (6): the bias block is B
    first = SharedAverage(0.8)
    w_avg, b_avg = first(None, weight), first(None, bias)
    assert b_avg.dense is w_avg.kron[0][1]
    second = SharedAverage(0.8)
    w_avg, b_avg = second(w_avg, CurvatureBlock(kron=[(A2, B2)])), second(b_avg, CurvatureBlock(dense=B2))
    np.testing.assert_allclose(w_avg.kron[0][0], 0.8 * A1 + 0.2 * A2)
    np.testing.assert_allclose(w_avg.kron[0][1], 0.8 * B1 + 0.2 * B2)
    assert b_avg.dense is w_avg.kron[0][1]
    solver = DampedBlockSolver(basis_tolerance=0.0)  # one decomposition per distinct factor, shared
    pairs = solver._decompose([("W", [(f, None) for f in w_avg.factors()]),
                               ("b", [(f, None) for f in b_avg.factors()])], DataParallel())
    assert solver.decompositions == 2 and pairs["b"][0] is pairs["W"][1]


def test_a_basis_that_still_diagonalises_the_factor_only_gets_new_eigenvalues():
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    old = (np.arange(1.0, 6.0), q)
    decompose = Decompositions(tolerance=0.2)
    lam, basis = decompose(q @ np.diag([2.0, 1, 5, 3, 4]) @ q.T, old)  # same eigenvectors, new values
    assert decompose.corrected == 1 and basis is q
    np.testing.assert_allclose(lam, [2.0, 1, 5, 3, 4], atol=1e-12)
    rotated = _psd(rng, 5)  # eigenvectors unrelated to q: decomposed anew
    lam, basis = decompose(rotated, old)
    assert decompose.full == 1
    np.testing.assert_allclose(basis @ np.diag(lam) @ basis.T, rotated, atol=1e-12)


def _linear_blocks(rng, n=3, m=4):
    B = _psd(rng, m)
    return {"W": CurvatureBlock(kron=[(_psd(rng, n), B)]), "b": CurvatureBlock(dense=B)}


def test_eigen_solver_renews_averaged_bases_every_refresh_steps():
    """Steps between renewals reuse the bases without blocks; a renewal solves with the averaged factors."""
    rng = np.random.default_rng(4)
    # CG to convergence at the first renewal: its gain, tr [α I + (1 − α) C]⁻¹, floors no eigenvalue
    solver = DampedBlockSolver(method="eigen", refresh=3, decay=0.8, basis_tolerance=0.0, tolerance=1e-12,
                               max_iterations=100)
    grads = {"W": rng.normal(size=(4, 3)), "b": rng.normal(size=(4, 1))}
    first, second = _linear_blocks(rng), _linear_blocks(rng)
    needs = []
    for step in range(4):
        needs.append(solver.needs_curvature())
        blocks = first if step == 0 else second if step == 3 else {}
        out = solver.solve([(k, g, blocks.get(k)) for k, g in grads.items()], alpha=0.05)
        if step < 3:  # the first renewal: the blocks themselves
            for k, g in grads.items():
                np.testing.assert_allclose(out[k], -_damped_dense_solve(first[k], g, 0.05), atol=1e-10)
    assert needs == [True, False, False, True]
    (A1, B1), (A2, B2) = first["W"].kron[0], second["W"].kron[0]
    averaged = {"W": CurvatureBlock(kron=[(0.8 * A1 + 0.2 * A2, 0.8 * B1 + 0.2 * B2)]),
                "b": CurvatureBlock(dense=0.8 * B1 + 0.2 * B2)}
    for k, g in grads.items():
        np.testing.assert_allclose(out[k], -_damped_dense_solve(averaged[k], g, 0.05), atol=1e-10)
    assert solver.decompositions == 4  # A, B (shared with b) at each renewal


def test_blocks_without_a_positive_damped_spectrum_are_solved_by_cg():
    rng = np.random.default_rng(5)
    indefinite = CurvatureBlock(dense=np.diag([-3.0, 1.0, 2.0]))  # α + (1 − α)(−3) < 0
    solver = DampedBlockSolver(method="eigen", tolerance=1e-12, max_iterations=100)
    g = rng.normal(size=(3, 1))
    out = solver.solve([("b", g, indefinite)], alpha=0.02)
    assert solver.states["b"].basis is None and solver.needs_curvature()
    np.testing.assert_allclose(out["b"], -_damped_dense_solve(indefinite, g, 0.02), atol=1e-8)


def test_cost_model_counts_shared_factors_once_and_prefers_cg_for_a_huge_factor():
    rng = np.random.default_rng(6)
    costs = COSTS["numpy"]
    blocks = _linear_blocks(rng, n=64, m=128)
    decomposed: set[int] = set()
    weight = eigen_flops(blocks["W"], 5, costs, decomposed)
    shared = eigen_flops(blocks["b"], 5, costs, decomposed)
    assert shared < eigen_flops(blocks["b"], 5, costs, set())  # its factor was counted with W
    assert weight + shared < cg_flops(blocks["W"], 4, costs) + cg_flops(blocks["b"], 2, costs)
    huge = CurvatureBlock(kron=[(GramFactor(rng.normal(size=(3072, 8))), _psd(rng, 4))])
    assert eigen_flops(huge, 5, costs, set()) > cg_flops(huge, 10, costs)


def test_auto_measures_cg_then_picks_eigenbases_on_digits_and_skips_curvature_passes():
    """auto: CG until a kept basis has been measured against CG at a renewal; then, where it stayed close
    (digits, sigmoid), eigenbases serve whole periods without curvature passes."""
    net = Network("64-128-sigmoid-10", seed=0)
    optimizer = make_optimizer("hbp-newton", solver="auto")
    passes = []
    backward = net.backward

    def counting(X, Y, curvature=None, approximation="6", parameters=None):
        passes.append(curvature is not None)
        return backward(X, Y, curvature, approximation, parameters)

    net.backward = counting
    train(net, D.digits(), optimizer, epochs=2, batch_size=64)
    assert passes[:6] == [True] * 6  # the first period by CG: no basis measured yet
    skipped = "".join("x" if p else "." for p in passes).split("x")
    assert "...." in skipped  # a whole period (refresh = 5) served by eigenbases
    assert all(len(run) <= 4 for run in skipped)  # every renewal has its curvature pass


@pytest.mark.parametrize("split", [1, 2])
def test_eigen_newton_step_equals_the_dense_solve_of_eq_8(split):
    net = Network("4-5-sigmoid-3", seed=0)
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(4, 6)), np.eye(3)[:, rng.integers(3, size=6)]
    optimizer = HBPNewton(solver="eigen", split=split, cg_tolerance=1e-12, cg_iterations=500)
    _, grads, blocks = net.backward(X, Y, optimizer.curvature)
    updates = optimizer.step(net, grads, blocks)
    for name, g in grads.items():
        for rows, sub in zip(np.array_split(np.arange(g.shape[0]), split), blocks[name].split_rows(g.shape[0], split)):
            np.testing.assert_allclose(updates[name][rows], -0.1 * _damped_dense_solve(sub, g[rows], 0.02),
                                       atol=1e-10)


def test_a_step_without_the_curvature_it_needs_is_refused():
    rng = np.random.default_rng(7)
    with pytest.raises(mc.McalcError, match="needs the curvature pass"):
        DampedBlockSolver(method="cg").solve([("W", rng.normal(size=(4, 3)), None)], alpha=0.02)


def test_bad_solver_options_are_refused():
    with pytest.raises(mc.McalcError, match="unknown solver 'lu'"):
        HBPNewton(solver="lu")
    with pytest.raises(mc.McalcError, match="refresh"):
        HBPNewton(refresh=0)
    with pytest.raises(mc.McalcError, match="decay"):
        HBPNewton(decay=1.0)


def test_cg_hands_back_the_blocks_products_with_its_directions():
    """C Δ from CG's residual, (b − r − α Δ)/(1 − α), equals a matvec of the block at the direction CG
    returns (the reduction ratio's model reads it instead of one more matvec); none at α = 1, where the
    system does not involve C. (Shared out over ranks: tests/test_distributed.py.)"""
    rng = np.random.default_rng(4)
    blocks = {"W": CurvatureBlock(kron=[(_psd(rng, 5), _psd(rng, 4))]), "b": CurvatureBlock(dense=_psd(rng, 4))}
    grads = {"W": rng.normal(size=(4, 5)), "b": rng.normal(size=(4, 1))}
    parts = [(k, g, blocks[k]) for k, g in grads.items()]
    products: dict = {}
    directions = DampedBlockSolver(max_iterations=3).solve(parts, 0.1, None, products)
    assert set(products) == {"W", "b"}
    for key, block in blocks.items():
        curved = block.matvec(directions[key].reshape(-1, order="F"))
        assert np.linalg.norm(curved) > 0.1  # not zero against zero
        np.testing.assert_allclose(products[key], curved, rtol=1e-10, atol=1e-12)
    products.clear()
    DampedBlockSolver().solve(parts, 1.0, None, products)
    assert products == {}
