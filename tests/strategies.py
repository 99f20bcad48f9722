"""Hypothesis strategies: random modules composed of random operations."""
from __future__ import annotations

import sympy as sp
from hypothesis import strategies as st

import mcalc as mc

_t = sp.Symbol("t")
SINE = mc.elementwise("wave", sp.sin(_t) + _t / 2, _t)
FUNCTIONS = [mc.sigmoid, mc.tanh, mc.softplus, SINE]

# one symbol per shape; roles decided per module
LEAVES = {
    ("n", 1): mc.Vector("x", "n"),
    ("m", 1): mc.Vector("u", "m"),
    ("m", "n"): mc.Matrix("W", "m", "n"),
    ("n", "m"): mc.Matrix("V", "n", "m"),
    ("n", "n"): mc.Matrix("A", "n", "n"),
    (1, 1): mc.Scalar("s"),
}
DIMS = ["n", "m", 1]


@st.composite
def expressions(draw, shape, depth=3):
    """A random expression of the given (rows, cols) shape."""
    leaf = LEAVES.get(shape)
    if depth == 0 or (leaf is not None and draw(st.integers(0, 3)) == 0):
        if leaf is None:
            k = draw(st.sampled_from(["n", "m"]))
            return draw(expressions((shape[0], k), 0)) @ draw(expressions((k, shape[1]), 0)) \
                if (shape[0], k) in LEAVES and (k, shape[1]) in LEAVES else draw(expressions(shape, 1))
        return leaf
    sub = lambda s: expressions(s, depth - 1)  # noqa: E731
    ops = ["apply", "add", "hadamard", "scale", "matmul", "transpose", "scaleby"]
    if shape == (1, 1):
        ops += ["sum", "sum"]
    if shape[1] == 1 and shape[0] != 1:
        ops += ["softmax"]
    op = draw(st.sampled_from(ops))
    if op == "apply":
        return draw(st.sampled_from(FUNCTIONS))(draw(sub(shape)))
    if op == "add":
        return draw(sub(shape)) + draw(sub(shape))
    if op == "hadamard":
        return draw(sub(shape)) * draw(sub(shape))
    if op == "scale":
        return draw(st.sampled_from([-1, 2, sp.Rational(1, 2)])) * draw(sub(shape))
    if op == "matmul":
        k = draw(st.sampled_from(DIMS))
        return draw(sub((shape[0], k))) @ draw(sub((k, shape[1])))
    if op == "transpose":
        return draw(sub((shape[1], shape[0]))).T
    if op == "scaleby":
        return draw(sub((1, 1))) * draw(sub(shape))
    if op == "sum":
        return mc.sum(draw(sub(draw(st.sampled_from(list(LEAVES))))))
    return mc.softmax(draw(sub(shape)))


@st.composite
def modules(draw):
    """A module z = random expression, with each of its symbols labelled input, parameter or constant."""
    output = draw(expressions(draw(st.sampled_from([("m", 1), ("n", 1), (1, 1)])), 3))
    used = sorted(output.symbols, key=lambda s: s.name)
    roles = [draw(st.sampled_from(["input", "param", "constant"])) for _ in used]
    if all(r == "constant" for r in roles):
        roles[0] = "param"
    pick = lambda role: [s for s, r in zip(used, roles) if r == role]  # noqa: E731
    return mc.Module("Random", output=output, inputs=pick("input"), params=pick("param"), constants=pick("constant"))
