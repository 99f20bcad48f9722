"""mcalc: a symbolic matrix-calculus compiler for curvature (Hessian backpropagation).

Declare a module with matrix symbols, derive its Jacobians and HBP rules by
Magnus–Neudecker calculus, verify them numerically, evaluate them densely::

    import mcalc as mc
    x, W, b = mc.Vector("x", "n"), mc.Matrix("W", "m", "n"), mc.Vector("b", "m")
    Linear = mc.Module("Linear", output=W @ x + b, inputs=[x], params=[W, b])
    mc.derive(Linear).hbp("W")            # (x xᵀ) ⊗ 𝓗z   (S.8c)
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# The declaration API, imported on first use (PEP 562): the runtime and the training driver, which
# run generated code, import ``mcalc.runtime`` and ``mcalc.train`` without SymPy behind them.
_API = {
    "CURVATURES": "calculus", "Derivation": "calculus", "derive": "calculus",
    "DeclarationError": "errors", "DifferentiabilityError": "errors", "DimensionError": "errors",
    "EvaluationError": "errors", "McalcError": "errors", "ModuleFileError": "errors", "ShapeError": "errors",
    "UnsupportedOperationError": "errors",
    "Expr": "expr",
    "ElementwiseFunction": "functions", "elementwise": "functions", "exp": "functions", "log": "functions",
    "relu": "functions", "sigmoid": "functions", "softplus": "functions", "sqrt": "functions",
    "tanh": "functions",
    "Module": "module", "chain": "module",
    "simplify": "simplification",
    "Matrix": "symbols", "Scalar": "symbols", "Vector": "symbols", "diag": "symbols", "identity": "symbols",
    "inv": "symbols", "kron": "symbols", "log_softmax": "symbols", "mean": "symbols", "ones": "symbols",
    "softmax": "symbols",
    "sum": "symbols", "trace": "symbols", "unfold": "symbols", "fold": "symbols",
    "max_pool": "symbols", "vec": "symbols",
}


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'mcalc' has no attribute {name!r}")
    importlib.import_module(".simplification", __name__)  # registers the rewrite rules every derivation uses
    value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])


__all__ = sorted(_API)
