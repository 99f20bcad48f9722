"""The calculus tables (differentials, Jacobians, adjoints, second differentials) cover the same
operations, and every node of the IR is classified, so a new operation cannot miss a table."""
from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch_reference
from conftest import seeds_for

import mcalc as mc
from mcalc import expr as E
from mcalc.calculus.adjoint import VJP_RULES
from mcalc.calculus.differential import DIFFERENTIAL_RULES
from mcalc.calculus.jacobian import JVP_RULES
from mcalc.calculus.second_order import LOCAL_RULES
from mcalc.numeric.verify import sample_values, verify_module

# what a declaration can apply to its variables, and which of those are linear (no second differential)
OPERATIONS = {E.MatMul, E.Add, E.ScalarMul, E.ScaleBy, E.Hadamard, E.Transpose, E.Apply, E.Sum, E.Trace,
              E.Softmax, E.LogSoftmax, E.Inverse, E.Vec, E.Diag, E.Unfold, E.Fold, E.WindowArgmax}
LINEAR = {E.Add, E.ScalarMul, E.Transpose, E.Sum, E.Trace, E.Vec, E.Diag, E.Unfold, E.Fold}
PIECEWISE_CONSTANT = {E.WindowArgmax}  # max pooling's mask: d = 0 almost everywhere, no curvature of its own
# constants under differentiation (UnfoldMatrix: unfold's Jacobian, an index map)
LEAVES = {E.Symbol, E.Seed, E.Identity, E.Zero, E.Ones, E.Commutation, E.UnfoldMatrix}
# nodes only the engine and code generation build: Kron (a differential only, for the adjoint of Vec),
# PSDProjection, Gram, and the batch forms (Stacked, BatchMean, and the layouts of per-sample matrices)
DERIVED_ONLY = {E.Kron, E.PSDProjection, E.Gram, E.Stacked, E.BatchMean, E.SampleProduct, E.SampleMatMul,
                E.SampleTranspose, E.VecOfSamples,
                E.UnvecOfSamples, E.BlockTrace, E.RankSum}


def test_every_node_of_the_ir_is_classified():
    nodes = {c for _, c in inspect.getmembers(E, inspect.isclass) if issubclass(c, E.Expr) and c is not E.Expr}
    assert nodes == OPERATIONS | LEAVES | DERIVED_ONLY


def test_the_tables_cover_the_same_operations():
    assert set(DIFFERENTIAL_RULES) == OPERATIONS | {E.Kron}
    assert set(JVP_RULES) == OPERATIONS | (LEAVES - {E.Symbol})  # a symbol is the identity or zero
    assert set(VJP_RULES) == OPERATIONS
    assert set(LOCAL_RULES) == OPERATIONS - LINEAR - PIECEWISE_CONSTANT  # no curvature of their own


W, A = mc.Matrix("W", "m", "n"), mc.Matrix("A", "m", "n")
x = mc.Vector("x", "n")
VEC_AND_DIAG = [
    mc.Module("VecOfMatrix", output=mc.tanh(mc.vec(A * (W @ mc.diag(x)))), inputs=[x], params=[W], constants=[A]),
    mc.Module("DiagScale", output=mc.sigmoid(W @ mc.diag(mc.tanh(x)) @ x), inputs=[x], params=[W]),
]


X, K, U = mc.Matrix("X", "c", "L"), mc.Matrix("K", "m", "c*3"), mc.Matrix("U", "c*3", "L")
UNFOLD_AND_FOLD = [
    mc.Module("StridedConvTanh", output=mc.vec(mc.tanh(K @ mc.unfold(X, 3, stride=2, padding=1, dilation=2))),
              inputs=[X], params=[K]),
    mc.Module("FoldTanh", output=mc.vec(mc.sigmoid(mc.fold(U * U, "L", 3, padding=1))), inputs=[U]),
    mc.Module("MaxPoolTanh", output=mc.vec(mc.tanh(mc.max_pool(K @ mc.unfold(X, 3, padding=1), 2))), inputs=[X],
              params=[K]),
]
# over images (c × H·W, pixels row by row): a rectangular kernel, strides, padding and dilation per dimension
IMAGE, K6, U4 = mc.Matrix("X", "c", 12), mc.Matrix("K", "m", "c*6"), mc.Matrix("U", "c*4", 4)
UNFOLD_AND_FOLD += [
    mc.Module("Conv2dTanh", output=mc.vec(mc.tanh(K6 @ mc.unfold(IMAGE, (2, 3), stride=(2, 1), padding=(1, 0),
                                                                  dilation=(2, 1), size=(3, 4)))),
              inputs=[IMAGE], params=[K6]),
    mc.Module("Fold2dTanh", output=mc.vec(mc.sigmoid(mc.fold(U4 * U4, (3, 3), 2, stride=(1, 2), padding=(0, 1)))),
              inputs=[U4]),
    mc.Module("MaxPool2dTanh", output=mc.vec(mc.tanh(mc.max_pool(IMAGE * IMAGE, 2, size=(3, 4)))), inputs=[IMAGE]),
    # a padding that differs before and after (TensorFlow's 'same'), and a strided fold over it
    mc.Module("AsymmetricConv2dTanh", output=mc.vec(mc.tanh(K6 @ mc.unfold(IMAGE, (2, 3), stride=2,
                                                                            padding=((0, 1), (1, 0)), size=(3, 4)))),
              inputs=[IMAGE], params=[K6]),
    # overlapping windows over a padding no maximum takes: the inputs −X⊙X are ≤ 0, so a zero pad would win
    mc.Module("PaddedMaxPool2dTanh", output=mc.vec(mc.tanh(mc.max_pool(-1 * (IMAGE * IMAGE), 3, stride=2, padding=1,
                                                                         size=(3, 4)))), inputs=[IMAGE]),
]


@pytest.mark.parametrize("module", UNFOLD_AND_FOLD, ids=lambda m: m.name)
def test_unfold_and_fold_rules_against_finite_differences_and_torch(module):
    """unfold (im2col) and its adjoint fold in every rule, against finite differences and against torch
    autograd through PyTorch's own unfold and fold."""
    checks = verify_module(module, seed=2)
    assert checks and all(c.ok for c in checks), [c for c in checks if not c.ok]
    rng = np.random.default_rng(5)
    values = sample_values(module, rng, {"c": 2, "m": 3, "L": 7})
    d = mc.derive(module)
    size = int(np.size(module.forward(values)))
    dz, Hz = seeds_for(size, rng)
    for v in module.variables:
        reference = torch_reference.dense_rules(module, v.name, values, dz, Hz)
        assert np.abs(reference["jacobian"]).max() > 1e-3 and np.abs(reference["second-order"]).max() > 1e-3
        np.testing.assert_allclose(d.evaluate_jacobian(v.name, values), reference["jacobian"], atol=1e-10)
        for c in mc.CURVATURES:
            np.testing.assert_allclose(d.evaluate_hbp(v.name, values, dz=dz, Hz=Hz, curvature=c), reference[c],
                                       atol=1e-10)


@pytest.mark.parametrize("module", VEC_AND_DIAG, ids=lambda m: m.name)
def test_vec_and_diag_rules_against_finite_differences_and_torch(module):
    """vec of a matrix (its adjoint is an unvec, written with Kronecker products) and diag of a vector,
    in every rule: against finite differences, and against torch autograd on nonzero references."""
    checks = verify_module(module, seed=3)
    assert checks and all(c.ok for c in checks), [c for c in checks if not c.ok]
    rng = np.random.default_rng(4)
    values = sample_values(module, rng, {"m": 3, "n": 4})
    size = 12 if module.name == "VecOfMatrix" else 3
    dz, Hz = seeds_for(size, rng)
    d = mc.derive(module)
    for v in module.variables:
        reference = torch_reference.dense_rules(module, v.name, values, dz, Hz)
        assert np.abs(reference["second-order"]).max() > 1e-3  # the curvature of its own is tested
        np.testing.assert_allclose(d.evaluate_jacobian(v.name, values), reference["jacobian"], atol=1e-10)
        for c in mc.CURVATURES:
            np.testing.assert_allclose(d.evaluate_hbp(v.name, values, dz=dz, Hz=Hz, curvature=c), reference[c],
                                       atol=1e-10)
