"""Four layers that are not in mcalc's built-in library, declared in a few lines each.

    mcalc derive examples/custom_layers.py --format latex
    mcalc verify examples/custom_layers.py
"""
import sympy as sp

import mcalc as mc

x = mc.Vector("x", "n")
W = mc.Matrix("W", "m", "n")
V = mc.Matrix("V", "m", "n")
b = mc.Vector("b", "m")
c = mc.Vector("c", "m")

# A gated linear unit: one weight matrix makes the value, the other a sigmoid gate.
GatedLinear = mc.Module(
    "GatedLinear",
    output=(W @ x + b) * mc.sigmoid(V @ x + c),
    inputs=[x],
    params=[W, V, b, c],
)

# A low-rank layer with two weight matrices, z = U (R x): the rules of U and R are coupled through x.
U = mc.Matrix("U", "m", "r")
R = mc.Matrix("R", "r", "n")
LowRank = mc.Module("LowRank", output=U @ (R @ x), inputs=[x], params=[U, R])

# RMS normalisation with a learned gain: z = g ⊙ x / sqrt(mean(x ⊙ x) + ε).
g = mc.Vector("g", "n", positive=True)  # a gain: a network starts it at 1
eps = sp.Rational(1, 100)
RMSNorm = mc.Module(
    "RMSNorm",
    output=g * (x / mc.sqrt(mc.mean(x * x) + eps)),
    inputs=[x],
    params=[g],
)

# Swish with a learned temperature β per unit: z = x ⊙ σ(β ⊙ x).
beta = mc.Vector("beta", "n", positive=True)  # a network starts it at 1 (swish)
Swish = mc.Module("Swish", output=x * mc.sigmoid(beta * x), inputs=[x], params=[beta])

# Mish activation declared from a SymPy expression, φ(t) = t tanh(softplus(t)); SymPy derives φ′ and φ″.
t = sp.Symbol("t")
mish = mc.elementwise("mish", t * sp.tanh(sp.log(1 + sp.exp(t))), t)
Mish = mc.Module("Mish", output=mish(x), inputs=[x])
