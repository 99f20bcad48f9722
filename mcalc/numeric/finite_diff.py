"""The finite-difference oracle: Jacobians and HBP blocks from the forward pass alone.

Nothing here uses a derived rule: every quantity comes from central
differences of ``Module.forward``, so it checks the engine independently.
The oracle of (4a)/(4b) is  J_fdᵀ 𝓗z J_fd + S_fd  with S_fd the Hessian of
v ↦ δzᵀ vec z(v); the PCH modes cast S_fd by its eigen-decomposition.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from ..modes import Curvature
from ..module import Module
from .evaluate import Evaluator, as_matrix, unvec, vec, with_curvature

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


def hessian_vector_fd(q: Callable[[np.ndarray], float], x0: np.ndarray, v: np.ndarray,
                      h: float = HESSIAN_STEP) -> np.ndarray:
    """∂²q/∂x∂xᵀ · v by the same four-point formula along (eᵢ, v): 4n evaluations, not the 2n² of the
    whole Hessian."""
    b = h * v
    out = np.empty(x0.size)
    for i in range(x0.size):
        a = np.zeros_like(x0)
        a[i] = h
        out[i] = (q(x0 + a + b) - q(x0 + a - b) - q(x0 - a + b) + q(x0 - a - b)) / (4 * h * h)
    return out


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
           curvature: Curvature | str = Curvature.EXACT) -> np.ndarray:
    """𝓗v of (4a)/(4b) in the given curvature mode, from finite differences only."""
    J = fd_jacobian(module, name, values)
    return with_curvature(J.T @ np.asarray(Hz, dtype=float) @ J, fd_second_order(module, name, values, dz), curvature)


def joint_forward(module: Module, values: Mapping[str, np.ndarray], names: tuple[str, ...],
                  ) -> tuple[Callable[[np.ndarray], np.ndarray], np.ndarray, dict[str, slice]]:
    """vec z as a function of all named variables at once (their vecs concatenated), the point,
    and where each variable sits in the concatenation."""
    bases = {n: as_matrix(values[n], module.symbol(n), f"value of '{n}'") for n in names}
    where, start = {}, 0
    for n in names:
        where[n] = slice(start, start + bases[n].size)
        start += bases[n].size

    def f(flat: np.ndarray) -> np.ndarray:
        changed = dict(values)
        for n in names:
            changed[n] = unvec(flat[where[n]], bases[n].shape)
        return vec(Evaluator.for_module(module, changed).value(module.output))

    return f, np.concatenate([vec(bases[n]) for n in names]), where


def fd_jvp(module: Module, values: Mapping[str, np.ndarray], tangents: Mapping[str, np.ndarray],
           h: float = JACOBIAN_STEP) -> np.ndarray:
    """vec R{z}: the central difference of z along the tangents (variables absent do not move)."""
    names = tuple(tangents)
    f, x0, where = joint_forward(module, values, names)
    direction = np.zeros_like(x0)
    for n in names:
        direction[where[n]] = np.asarray(tangents[n], dtype=float).reshape(-1, order="F")
    return (f(x0 + h * direction) - f(x0 - h * direction)) / (2 * h)


def fd_gradient_tangents(module: Module, values: Mapping[str, np.ndarray], dz: np.ndarray,
                         tangents: Mapping[str, np.ndarray], Rdz: np.ndarray) -> dict[str, np.ndarray]:
    """vec R{δv} = [∇²q · V]ᵥ + Dz(v)ᵀ R{δz} for every variable v, q = δzᵀ vec z (Pearlmutter);
    variables without a tangent do not move."""
    names = tuple(v.name for v in module.variables)
    f, x0, where = joint_forward(module, values, names)
    weights = np.asarray(dz, dtype=float).reshape(-1)
    direction = np.zeros_like(x0)
    for n, value in tangents.items():
        direction[where[n]] = np.asarray(value, dtype=float).reshape(-1, order="F")
    moved = hessian_vector_fd(lambda x: float(weights @ f(x)), x0, direction)
    J = jacobian_fd(f, x0)
    pulled = J.T @ np.asarray(Rdz, dtype=float).reshape(-1, order="F")
    return {n: moved[where[n]] + pulled[where[n]] for n in names}
