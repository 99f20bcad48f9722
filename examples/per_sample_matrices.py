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

# A 1-D convolution (PyTorch's Conv1d): c input channels, m filters of width 5, the signal padded with 2
# zeros at each end so that the output has as many positions as the input; W is (m × c·5), PyTorch's
# weight reshaped.
X = mc.Matrix("X", "c", "L")
K = mc.Matrix("K", "m", "c*5")
Conv1d = mc.Module("Conv1d", output=K @ mc.unfold(X, 5, padding=2) + b @ mc.ones("L").T, inputs=[X], params=[K, b])

# The same with stride 2 and dilation 2: fewer, wider-spaced patches.
StridedConv1d = mc.Module("StridedConv1d", output=K @ mc.unfold(X, 5, stride=2, padding=1, dilation=2),
                          inputs=[X], params=[K])

# A 2-D convolution (PyTorch's Conv2d) over 4 × 3 images: each image is c × 12, its pixels row by row
# (PyTorch's reshape(c, H*W)), and unfold takes their size; 3 × 3 filters, padding 1, so that the output
# is again 4 × 3 images, (m × 12).
Image = mc.Matrix("X", "c", 12)
K9 = mc.Matrix("K", "m", "c*9")
Conv2d = mc.Module("Conv2d", output=K9 @ mc.unfold(Image, 3, padding=1, size=(4, 3)) + b @ mc.ones(12).T,
                   inputs=[Image], params=[K9, b])
