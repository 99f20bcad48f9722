"""Verification of generated code (NumPy or CuPy) against the finite-difference oracle, over a batch."""
from __future__ import annotations

import numpy as np

from ..calculus.derivation import Derivation
from ..codegen.batch import batch_hbp
from ..errors import McalcError
from ..expr import Expr
from ..modes import APPROXIMATIONS, CURVATURES, Approximation, Curvature
from ..module import Module
from .evaluate import Evaluator, as_matrix, unvec, vec, with_curvature
from .finite_diff import fd_gradient_tangents, fd_jacobian, fd_jvp, fd_second_order
from .verify import TOLERANCES, Check, relative_error, sample_values

BATCH_SIZE = 4


class _Oracle:
    """(6) or (7) from finite differences of each sample's forward pass; both with the per-sample
    second-order term Σᵢ Σₖ Hzₖ(xᵢ) δzᵢₖ, (7) averaging the Gauss–Newton term's Jacobians. The
    finite differences of a variable are taken once, for every curvature and approximation."""

    def __init__(self, module: Module, samples: list[dict], dZ: np.ndarray) -> None:
        self.module, self.samples, self.dZ = module, samples, dZ
        self._parts: dict[str, tuple[list[np.ndarray], np.ndarray]] = {}

    def __call__(self, name: str, Hz: np.ndarray, curvature: Curvature, approximation: Approximation) -> np.ndarray:
        if name not in self._parts:
            Js = [fd_jacobian(self.module, name, values) for values in self.samples]
            concave = sum(fd_second_order(self.module, name, values, self.dZ[i])
                          for i, values in enumerate(self.samples))
            self._parts[name] = (Js, concave)
        Js, concave = self._parts[name]
        if Approximation.parse(approximation) is Approximation.MEAN_OF_SANDWICHES:
            ggn = sum(J.T @ Hz @ J for J in Js) / len(Js)
        else:
            J = sum(Js) / len(Js)
            ggn = J.T @ Hz @ J
        return with_curvature(ggn, concave, curvature)


def verify_backend(module: Module, backend: str, *, seed: int = 0) -> list[Check]:
    """Check the generated forward, gradients and every HBP variant of ``module`` on ``backend``
    ('numpy', 'cupy', or 'cupy-emulated': the CuPy code with its kernels run on the CPU)."""
    from ..codegen.store import load_code

    if backend == "cupy-emulated":
        from ..runtime.emulator import installed, unavailable_reason

        reason = unavailable_reason()
        if reason:
            raise McalcError(reason)
        with installed():
            return verify_backend(module, "cupy", seed=seed)

    code = load_code(module, backend)
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
    S = {s.name: xp.asarray(batch_argument([v[s.name] for v in samples], s)) for s in per_sample}
    Z = vec_columns(_host(code.forward(P, S)["Z"]))
    dZ = rng.normal(size=(BATCH_SIZE, Z.shape[0])) / BATCH_SIZE  # row i: vec δzᵢ
    a = rng.normal(size=(Z.shape[0], Z.shape[0]))
    Hz = a @ a.T / Z.shape[0]
    checks = [Check(module.name, "Z (forward)", "-", relative_error(
        Z, np.stack([vec(as_matrix(module.forward(v), module.output, "z")) for v in samples], axis=1)),
        TOLERANCES["jacobian"])]
    S["dz"] = xp.asarray(batch_argument([unvec(row, _output_shape(module, samples)) for row in dZ], module.output))
    grads = code.gradients(P, S)
    for v in module.variables:
        Js = [fd_jacobian(module, v.name, values) for values in samples]
        per = [J.T @ dZ[i] for i, J in enumerate(Js)]
        got = _host(grads[v.name])
        if v in module.inputs:
            got, expected = vec_columns(got), np.stack(per, axis=1)
        else:
            expected = sum(per).reshape(got.shape, order="F")
        checks.append(Check(module.name, f"δ{v.name} (batch)", "-",
                            relative_error(got, expected), TOLERANCES["gradient"]))
    checks += _tangent_checks(module, code, xp, samples, P, S, dZ, rng)
    oracle = _Oracle(module, samples, dZ)
    factored = Evaluator.for_batch(module, {k: _host(v) for k, v in P.items()},
                                   {s.name: np.moveaxis(_host(S[s.name]), 1, 0) for s in per_sample},  # (B, …)
                                   dZ=dZ, Hz=Hz)
    for curvature in CURVATURES:
        for approximation in APPROXIMATIONS:
            blocks = code.HBP[(curvature, approximation)](P, S, xp.asarray(Hz))
            for v in module.variables:
                block = blocks[v.name]
                got = _host(block.to_dense())
                if approximation.factored:  # an approximation by definition: against
                    reference = factored.value(batch_hbp(Derivation(module), v.name, curvature, approximation))
                else:  # the factored batch rule; finite differences test (6) and (7)
                    reference = oracle(v.name, Hz, curvature, approximation)
                label = v.name if v.is_vector else f"vec {v.name}"
                checks.append(Check(module.name, f"𝓗̄{label} ({approximation})", curvature,
                                    relative_error(got, reference), TOLERANCES["hbp"]))
    for approximation, start in code.LOSS_HESSIAN.items():  # a loss: HBP's start, nothing from above
        blocks = start(P, S)
        for v in module.variables:
            reference = oracle(v.name, np.zeros_like(Hz), Curvature.EXACT, approximation)
            label = v.name if v.is_vector else f"vec {v.name}"
            checks.append(Check(module.name, f"𝓗̄{label} ({approximation}), 𝓗z = 0", "exact",
                                relative_error(_host(blocks[v.name].to_dense()), reference), TOLERANCES["hbp"]))
    return checks


def _tangent_checks(module: Module, code: object, xp: object, samples: list[dict], P: dict, S: dict,
                    dZ: np.ndarray, rng: np.random.Generator) -> list[Check]:
    """The generated jvp and rgradients (all variables moving, and the parameters alone) against
    each sample's finite differences."""
    checks = []
    B = len(samples)
    per_sample = {v.name: v for v in module.inputs}
    shared = {v.name: rng.normal(size=np.shape(samples[0][v.name])) for v in module.params}
    tangents = [{**shared, **{n: rng.normal(size=np.shape(samples[0][n])) for n in per_sample}} for _ in range(B)]
    RdZ = rng.normal(size=dZ.shape)
    for with_inputs in (True, False):
        moving = [v for v in module.variables if with_inputs or v in module.params]
        if not moving:
            continue
        chosen = [{n: t[n] for n in (v.name for v in moving)} for t in tangents]
        V = {v.name: xp.asarray(batch_argument([t[v.name] for t in chosen], v)) if v.name in per_sample
             else xp.asarray(as_matrix(chosen[0][v.name], v, v.name)) for v in moving}
        V["dz"] = xp.asarray(batch_argument([unvec(row, _output_shape(module, samples)) for row in RdZ],
                                            module.output))
        which = "" if with_inputs else ", parameters moving"
        expected = np.stack([fd_jvp(module, values, t) for values, t in zip(samples, chosen)], axis=1)
        got = vec_columns(_host(code.jvp(P, S, V, inputs=with_inputs)["Z"]))
        checks.append(Check(module.name, f"R{{Z}}{which}", "-", relative_error(got, expected),
                            TOLERANCES["jacobian"]))
        per = [fd_gradient_tangents(module, samples[i], dZ[i], chosen[i], RdZ[i]) for i in range(B)]
        results = code.rgradients(P, S, V, inputs=with_inputs)
        for v in moving:
            got = _host(results[v.name])
            if v.name in per_sample:
                got, expected = vec_columns(got), np.stack([np.reshape(r[v.name], -1) for r in per], axis=1)
            else:
                expected = sum(r[v.name] for r in per).reshape(got.shape, order="F")
            checks.append(Check(module.name, f"R{{δ{v.name}}} (batch{which})", "-",
                                relative_error(got, expected), TOLERANCES["hbp"]))
    return checks


def batch_argument(values: list, symbol: Expr) -> np.ndarray:
    """Per-sample values of ``symbol`` as generated code takes their batch: a vector's (rows, B), a
    matrix's (rows, B, cols)."""
    matrices = np.stack([as_matrix(v, symbol, "a sample") for v in values], axis=1)  # (rows, B, cols)
    return matrices[:, :, 0] if symbol.is_vector else matrices


def vec_columns(batch: np.ndarray) -> np.ndarray:
    """A batch as generated code returns it, (rows, B) or (rows, B, cols), as one column vec(·ᵢ) per sample."""
    return batch if batch.ndim == 2 else batch.transpose(1, 2, 0).reshape(batch.shape[1], -1).T


def _output_shape(module: Module, samples: list[dict]) -> tuple[int, int]:
    return as_matrix(module.forward(samples[0]), module.output, "z").shape


def _host(a: object) -> np.ndarray:
    return a.get() if hasattr(a, "get") else np.asarray(a)
