"""The finite-difference oracle: Jacobians and HBP blocks from the forward pass alone.

Nothing here uses a derived rule: every quantity comes from central
differences of ``Module.forward``, so it checks the engine independently.
The oracle of (4a)/(4b) is  J_fdᵀ 𝓗z J_fd + S_fd  with S_fd the Hessian of
v ↦ δzᵀ vec z(v); the PCH modes cast S_fd by its eigen-decomposition.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from ..module import Module
from .evaluate import Evaluator, as_matrix, psd_project, unvec, vec

JACOBIAN_STEP = 1e-6
HESSIAN_STEP = 1e-4


def jacobian_fd(f: Callable[[np.ndarray], np.ndarray], x0: np.ndarray, h: float = JACOBIAN_STEP) -> np.ndarray:
    """∂f/∂xᵀ by central differences, f: R^n → R^m on flat arrays."""
    columns = []
    for i in range(x0.size):
        e = np.zeros_like(x0)
        e[i] = h
        columns.append((f(x0 + e) - f(x0 - e)) / (2 * h))
    return np.stack(columns, axis=1)


def hessian_fd(q: Callable[[np.ndarray], float], x0: np.ndarray, h: float = HESSIAN_STEP) -> np.ndarray:
    """∂²q/∂x∂xᵀ by the four-point central formula (error O(h²))."""
    n = x0.size
    H = np.empty((n, n))
    steps = np.eye(n) * h
    for i in range(n):
        for j in range(i, n):
            a, b = steps[i], steps[j]
            H[i, j] = H[j, i] = (q(x0 + a + b) - q(x0 + a - b) - q(x0 - a + b) + q(x0 - a - b)) / (4 * h * h)
    return H


def vectorised_forward(
    module: Module, values: Mapping[str, np.ndarray], name: str
) -> tuple[Callable[[np.ndarray], np.ndarray], np.ndarray]:
    """vec z as a function of vec v (other symbols fixed), and vec v at ``values``."""
    symbol = module.symbol(name)
    base = as_matrix(values[name], symbol, f"value of '{name}'")

    def f(flat: np.ndarray) -> np.ndarray:
        changed = dict(values)
        changed[name] = unvec(flat, base.shape)
        return vec(Evaluator.for_module(module, changed).value(module.output))

    return f, vec(base)


def fd_jacobian(module: Module, name: str, values: Mapping[str, np.ndarray]) -> np.ndarray:
    f, v0 = vectorised_forward(module, values, name)
    return jacobian_fd(f, v0)


def fd_second_order(module: Module, name: str, values: Mapping[str, np.ndarray], dz: np.ndarray) -> np.ndarray:
    """Σₖ Hzₖ(v) δzₖ: the Hessian of v ↦ δzᵀ vec z(v)."""
    f, v0 = vectorised_forward(module, values, name)
    weights = np.asarray(dz, dtype=float).reshape(-1)
    return hessian_fd(lambda v: float(weights @ f(v)), v0)


def fd_hbp(module: Module, name: str, values: Mapping[str, np.ndarray], dz: np.ndarray, Hz: np.ndarray,
           curvature: str = "exact") -> np.ndarray:
    """𝓗v of (4a)/(4b) in the given curvature mode, from finite differences only."""
    J = fd_jacobian(module, name, values)
    ggn = J.T @ np.asarray(Hz, dtype=float) @ J
    if curvature == "ggn":
        return ggn
    S = fd_second_order(module, name, values, dz)
    if curvature == "exact":
        return ggn + S
    return ggn + psd_project(S, curvature.removeprefix("pch-"))
