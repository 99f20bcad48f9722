"""Layers people ask curvature libraries for, declared, verified, generated and trained by mcalc.

    mcalc derive examples/layernorm_gelu.py
    mcalc verify examples/layernorm_gelu.py                      # every rule against finite differences
    mcalc verify examples/layernorm_gelu.py --backend numpy      # the generated code too
    mcalc train --modules examples/layernorm_gelu.py --model 64-LayerNorm-128-GELU-10 --optimizer hbp-newton
"""
import sympy as sp

import mcalc as mc

x = mc.Vector("x", "n")

# Layer normalisation (Ba et al. 2016): z = g ⊙ (x − 1·mean x) / sqrt(mean((x − 1·mean x)²) + ε) + b.
g = mc.Vector("g", "n", positive=True)  # a gain: a network starts it at 1 (a shift, b, at 0)
b = mc.Vector("b", "n")
centred = x - mc.mean(x) * mc.ones("n")
LayerNorm = mc.Module(
    "LayerNorm",
    output=g * (centred / mc.sqrt(mc.mean(centred * centred) + sp.Rational(1, 100000))) + b,
    inputs=[x],
    params=[g, b],
)

# GELU (Hendrycks & Gimpel 2016), exact form: φ(t) = t Φ(t) = t (1 + erf(t/√2)) / 2.
t = sp.Symbol("t")
gelu = mc.elementwise("gelu", t * (1 + sp.erf(t / sp.sqrt(2))) / 2, t)
GELU = mc.Module("GELU", output=gelu(x), inputs=[x])

# A residual block, z = x + W₂ tanh(W₁ x + b₁): its inner parameters' blocks are batch means of per-sample
# Kronecker products (exact under (6), two factors under 6-kfac).
W1, b1, W2 = mc.Matrix("W1", "h", "n"), mc.Vector("b1", "h"), mc.Matrix("W2", "n", "h")
Residual = mc.Module("Residual", output=x + W2 @ mc.tanh(W1 @ x + b1), inputs=[x], params=[W1, b1, W2])
