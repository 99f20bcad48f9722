"""Verification of generated code (NumPy or CuPy) against the finite-difference oracle, over a batch."""
from __future__ import annotations

import numpy as np

from ..calculus.hbp import CURVATURES
from ..codegen.batch import APPROXIMATIONS
from ..module import Module
from .evaluate import as_matrix, psd_project
from .finite_diff import fd_jacobian, fd_second_order
from .verify import TOLERANCES, Check, relative_error, sample_values

BATCH_SIZE = 4


def _oracle(module: Module, samples: list[dict], name: str, dZ: np.ndarray, Hz: np.ndarray,
            curvature: str, approximation: str) -> np.ndarray:
    """(6) or (7) from finite differences of each sample's forward pass."""
    Js = [fd_jacobian(module, name, values) for values in samples]
    B = len(samples)
    if approximation == "6":
        ggn = sum(J.T @ Hz @ J for J in Js) / B
        concave = sum(fd_second_order(module, name, values, dZ[i]) for i, values in enumerate(samples))
    else:
        J = sum(Js) / B
        ggn = J.T @ Hz @ J
        concave = sum(fd_second_order(module, name, values, dZ.sum(0)) for values in samples) / B
    if curvature == "exact":
        return ggn + concave
    if curvature == "ggn":
        return ggn
    return ggn + psd_project(concave, curvature.removeprefix("pch-"))


def verify_backend(module: Module, backend: str, *, seed: int = 0) -> list[Check]:
    """Check the generated forward, gradients and every HBP variant of ``module`` on ``backend``."""
    from ..runtime.loader import load

    code = load(module, backend)
    xp = np
    if backend == "cupy":
        import cupy as xp
    per_sample = [s for s in module.symbols if s in module.inputs or (s in module.constants and s.is_vector)]
    samples = [sample_values(module, np.random.default_rng(seed + k)) for k in range(BATCH_SIZE)]
    shared = {s.name: as_matrix(samples[0][s.name], s, s.name) for s in module.symbols if s not in per_sample}
    for values in samples:
        values.update(shared)
    rng = np.random.default_rng(seed)
    P = {k: xp.asarray(v) for k, v in shared.items()}
    S = {s.name: xp.asarray(np.stack([np.reshape(v[s.name], -1) for v in samples], axis=1)) for s in per_sample}
    Z = np.asarray(_host(code.forward(P, S)["Z"]))
    dZ = rng.normal(size=(BATCH_SIZE, Z.shape[0])) / BATCH_SIZE
    a = rng.normal(size=(Z.shape[0], Z.shape[0]))
    Hz = a @ a.T / Z.shape[0]
    checks = [Check(module.name, "Z (forward)", "-", relative_error(
        Z, np.stack([np.reshape(module.forward(v), -1) for v in samples], axis=1)), TOLERANCES["jacobian"])]
    S["dz"] = xp.asarray(dZ.T)
    grads = code.gradients(P, S)
    for v in module.variables:
        Js = [fd_jacobian(module, v.name, values) for values in samples]
        per = [J.T @ dZ[i] for i, J in enumerate(Js)]
        got = _host(grads[v.name])
        expected = np.stack(per, axis=1) if v in module.inputs else sum(per).reshape(got.shape, order="F")
        checks.append(Check(module.name, f"δ{v.name} (batch)", "-",
                            relative_error(got, expected), TOLERANCES["gradient"]))
    for curvature in CURVATURES:
        for approximation in APPROXIMATIONS:
            blocks = code.HBP[(curvature, approximation)](P, S, xp.asarray(Hz))
            for v in module.variables:
                block = blocks[v.name]
                got = _host(block.to_dense())
                reference = _oracle(module, samples, v.name, dZ, Hz, curvature, approximation)
                label = v.name if v.is_vector else f"vec {v.name}"
                checks.append(Check(module.name, f"𝓗̄{label} ({approximation})", curvature,
                                    relative_error(got, reference), TOLERANCES["hbp"]))
    return checks


def _host(a: object) -> np.ndarray:
    return a.get() if hasattr(a, "get") else np.asarray(a)
