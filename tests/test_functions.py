"""Elementwise functions: SymPy derives φ′ and φ″; known ones come out in their textbook form."""
import numpy as np
import pytest
import sympy as sp

import mcalc as mc


@pytest.mark.parametrize(
    ("function", "order", "expected"),
    [
        (mc.sigmoid, 1, "sigmoid*(1 - sigmoid)"),  # σ′ = σ(1 − σ)
        (mc.tanh, 1, "1 - tanh**2"),
        (mc.exp, 1, "exp"),
        (mc.exp, 2, "exp"),
    ],
)
def test_derivative_through_the_function_itself(function, order, expected):
    through = function.derivative(order).in_terms_of_base()
    s = sp.Symbol(function.name)
    assert sp.simplify(through - sp.sympify(expected, locals={function.name: s})) == 0


@pytest.mark.parametrize("function", [mc.sigmoid, mc.tanh, mc.softplus, mc.exp, mc.log, mc.sqrt])
def test_derivatives_match_finite_differences(function):
    t = np.linspace(0.3, 2.0, 7)
    h = 1e-5
    f, f1, f2 = (function.derivative(k).numpy for k in range(3))
    np.testing.assert_allclose(f1(t), (f(t + h) - f(t - h)) / (2 * h), rtol=1e-6)
    np.testing.assert_allclose(f2(t), (f1(t + h) - f1(t - h)) / (2 * h), rtol=1e-5)


def test_custom_function_from_sympy():
    t = sp.Symbol("t")
    cube = mc.elementwise("cube", t**3, t)
    assert cube.derivative(1).expr == 3 * cube.derivative(1).expr.free_symbols.pop() ** 2
    assert cube.derivative(2).display_name == "cube''"


def test_bad_function_declarations():
    t, u = sp.symbols("t u")
    with pytest.raises(mc.DeclarationError, match="depends on"):
        mc.elementwise("f", t * u, t)
    with pytest.raises(mc.DeclarationError, match="identifier"):
        mc.elementwise("not a name", t, t)
