"""Modules whose per-sample input is a matrix, d × T (T positions: a signal's samples, a sequence's
tokens, a convolution's patches), declared, verified and generated like any other.

    mcalc derive examples/per_sample_matrices.py
    mcalc verify examples/per_sample_matrices.py                  # every rule against finite differences
    mcalc verify examples/per_sample_matrices.py --backend numpy  # the generated code over a batch

A batch of such an input is passed to generated code as a (d, B, T) array and computed on with its
samples side by side, (d, T·B): the weights shared over positions multiply all of them at once.
"""
import mcalc as mc

U = mc.Matrix("U", "d", "T")

# A Linear layer applied at every position (a 1 × 1 convolution): the same W and b for all T columns.
W, b = mc.Matrix("W", "m", "d"), mc.Vector("b", "m")
PositionwiseLinear = mc.Module("PositionwiseLinear", output=W @ U + b @ mc.ones("T").T, inputs=[U], params=[W, b])

# An activation at every entry.
PositionwiseTanh = mc.Module("PositionwiseTanh", output=mc.tanh(U), inputs=[U])

# Sum pooling over the positions: a vector per sample.
SumOverPositions = mc.Module("SumOverPositions", output=U @ mc.ones("T"), inputs=[U])

# Flatten: the positions' columns stacked into one vector (column-major vec), for a Linear layer after.
Flatten = mc.Module("Flatten", output=mc.vec(U), inputs=[U])
