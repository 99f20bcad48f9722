"""mcalc: a symbolic matrix-calculus compiler for curvature (Hessian backpropagation).

Declare a module with matrix symbols, derive its Jacobians and HBP rules by
Magnus–Neudecker calculus, verify them numerically, evaluate them densely::

    import mcalc as mc
    x, W, b = mc.Vector("x", "n"), mc.Matrix("W", "m", "n"), mc.Vector("b", "m")
    Linear = mc.Module("Linear", output=W @ x + b, inputs=[x], params=[W, b])
    mc.derive(Linear).hbp("W")            # (x xᵀ) ⊗ 𝓗z   (S.8c)
"""
from . import simplify as _simplify_rules  # noqa: F401 - registers the rewrite rules
from .calculus import CURVATURES, Derivation, derive
from .errors import (
    DeclarationError,
    DifferentiabilityError,
    DimensionError,
    EvaluationError,
    McalcError,
    ModuleFileError,
    ShapeError,
    UnsupportedOperationError,
)
from .expr import Expr
from .functions import (
    ElementwiseFunction,
    elementwise,
    exp,
    log,
    relu,
    sigmoid,
    softplus,
    sqrt,
    tanh,
)
from .module import Module, chain
from .simplify import simplify
from .symbols import (
    Matrix,
    Scalar,
    Vector,
    diag,
    identity,
    inv,
    kron,
    log_softmax,
    mean,
    softmax,
    sum,
    trace,
    vec,
)

__version__ = "0.1.0"

__all__ = [
    "CURVATURES", "DeclarationError", "Derivation", "DifferentiabilityError", "DimensionError",
    "ElementwiseFunction", "EvaluationError", "Expr", "Matrix", "McalcError", "Module", "ModuleFileError",
    "Scalar", "ShapeError", "UnsupportedOperationError", "Vector", "chain", "derive", "diag", "elementwise",
    "exp", "identity", "inv", "kron", "log", "log_softmax", "mean", "relu", "sigmoid", "simplify", "softmax",
    "softplus", "sqrt", "sum", "tanh", "trace", "vec",
]
