"""A module's derived rules: Jacobians, gradient backprop and HBP for every input and parameter."""
from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import McalcError
from ..expr import Expr, Identity, Seed, Symbol, substitute, tangent
from ..modes import CURVATURES, Curvature
from ..module import Module
from ..simplification import simplify
from . import hbp as hbp_rules
from .adjoint import backprop
from .differential import directional_derivative
from .jacobian import Jacobians
from .second_order import second_order_term


@dataclass(frozen=True)
class DerivedRule:
    """One derived rule, ready to print: ``lhs = expr``, citing its equation."""

    variable: str
    kind: str  # 'jacobian' | 'gradient' | 'second-order' | 'hbp' | 'hessian'
    curvature: str | None
    lhs: str
    lhs_latex: str
    expr: Expr
    equation: str


class Derivation:
    """The rules of one module, derived lazily and cached.

    ``Hz`` and ``dz`` are the seeds the rules are written in: 𝓗z, the Hessian
    of the loss with respect to vec z, and δz, its gradient (in z's shape).
    """

    def __init__(self, module: Module) -> None:
        self.module = module
        z = module.output
        self.Hz = Seed("Hz", z.size, z.size)
        self.dz = Seed("dz", *z.shape)
        self.Rdz = Seed("Rdz", *z.shape)  # R{δz}: the direction δz moves in, for R-backprop

    # --- symbolic rules --------------------------------------------------
    def _variable(self, name: str) -> Symbol:
        for v in self.module.variables:
            if v.name == name:
                return v
        raise McalcError(
            f"module '{self.module.name}' has no input or parameter '{name}'; "
            f"rules exist for {[v.name for v in self.module.variables]}"
        )

    @functools.cache  # noqa: B019 - a Derivation lives as long as its rules are wanted
    def _jacobians(self, name: str) -> Jacobians:
        return Jacobians(self._variable(name))

    def jacobian(self, name: str) -> Expr:
        """Dz(v) = ∂ vec z / ∂ (vec v)ᵀ (S.2), structured."""
        return self._jacobians(name)(self.module.output)

    @functools.cache  # noqa: B019
    def gradient(self, name: str) -> Expr:
        """δv = [Dz(v)]ᵀ δz in v's shape (gradient backpropagation, Section 3)."""
        return backprop(self.module.output, self._variable(name), self.dz)

    def _directions(self, names: tuple[str, ...]) -> dict[Expr, Expr]:
        return {v: tangent(v) for v in map(self._variable, names)}

    @functools.cache  # noqa: B019
    def jvp(self, names: tuple[str, ...]) -> Expr:
        """R{z} = Σᵥ Dz(v)[dv] in z's shape: the output's tangent when each named variable v moves
        along its tangent seed dv (a Jacobian-vector product without forming the Jacobian)."""
        return directional_derivative(self.module.output, self._directions(names))

    @functools.cache  # noqa: B019
    def gradient_tangent(self, name: str, names: tuple[str, ...]) -> Expr:
        """R{δv}: the directional derivative of the rule δv = [Dz(v)]ᵀ δz when the named variables move
        along their tangents and δz along R{δz} (Pearlmutter's R-backprop; exact curvature products)."""
        directions = {**self._directions(names), self.dz: self.Rdz}
        return directional_derivative(self.gradient(name), directions)

    @functools.cache  # noqa: B019
    def second_order(self, name: str) -> Expr:
        """Σₖ [Hzₖ(v)] δzₖ, the module's own curvature in (4a)/(4b)."""
        return second_order_term(self.module.output, self._variable(name), self.dz, self._jacobians(name))

    @functools.cache  # noqa: B019
    def gauss_newton(self, name: str) -> Expr:
        return hbp_rules.gauss_newton_term(self.jacobian(name), self.Hz)

    @functools.cache  # noqa: B019
    def hbp(self, name: str, curvature: Curvature | str = Curvature.EXACT) -> Expr:
        """𝓗v by (4a)/(4b) in the given curvature mode, structured."""
        curvature = Curvature.parse(curvature)
        return hbp_rules.hbp(self.gauss_newton(name), self.second_order(name), curvature)

    def hessian(self, name: str) -> Expr:
        """The Hessian of a scalar module (a loss) itself: Hz(v) = Σₖ Hzₖ δzₖ at δz = 1 (S.10)."""
        if not self.module.output.is_scalar:
            raise McalcError(f"module '{self.module.name}' is not scalar-valued; ask for hbp() instead")
        return simplify(substitute(self.second_order(name), {self.dz: Identity(1)}))

    def rules(self, curvatures: tuple[Curvature, ...] = CURVATURES) -> list[DerivedRule]:
        """Every rule of the module, in a stable order."""
        out: list[DerivedRule] = []
        for v in self.module.variables:
            label = hbp_rules.variable_label(v)
            latex_label = v.name if v.is_vector else rf"\operatorname{{vec}} {v.name}"
            eq = "(4a)" if v in self.module.inputs else "(4b)"
            out.append(DerivedRule(v.name, "jacobian", None, f"Dz({label})", rf"\mathrm{{D}}z({latex_label})",
                            self.jacobian(v.name), "(S.2)"))
            out.append(DerivedRule(v.name, "gradient", None, f"δ{v.name}", rf"\delta {v.name}",
                            self.gradient(v.name), "Section 3"))
            out.append(DerivedRule(v.name, "second-order", None, f"Σₖ Hzₖ({label}) δzₖ",
                            rf"\sum_k \mathrm{{H}}z_k({latex_label})\,\delta z_k",
                            self.second_order(v.name), "(S.4)–(S.7)"))
            for c in curvatures:
                out.append(DerivedRule(v.name, "hbp", c, f"𝓗{label}", rf"\mathcal{{H}}{latex_label}",
                                self.hbp(v.name, c), eq))
            if self.module.output.is_scalar:
                out.append(DerivedRule(v.name, "hessian", None, f"Hz({label})", rf"\mathrm{{H}}z({latex_label})",
                                self.hessian(v.name), "(S.10)"))
        return out

    def latex(self) -> str:
        """Every rule as LaTeX, one ``align*`` line each."""
        from ..printing.report import render

        return render(self, "latex")

    def text(self) -> str:
        from ..printing.report import render

        return render(self, "text")

    # --- numeric evaluation ---------------------------------------------
    def _evaluator(self, values: Mapping[str, np.ndarray], dz: Any = None, Hz: Any = None) -> Any:
        from ..numeric.evaluate import Evaluator

        return Evaluator.for_module(self.module, values, dz=dz, Hz=Hz, seeds=(self.dz, self.Hz))

    def evaluate_jacobian(self, name: str, values: Mapping[str, np.ndarray]) -> np.ndarray:
        """Dense Dz(v), shape (size z, size v)."""
        return self._evaluator(values).value(self.jacobian(name))

    def evaluate_gradient(self, name: str, values: Mapping[str, np.ndarray], dz: Any) -> np.ndarray:
        """Dense δv = [Dz(v)]ᵀ δz, as vec v (size v,)."""
        return self._evaluator(values, dz=dz).value(self.gradient(name)).reshape(-1, order="F")

    def evaluate_hbp(
        self,
        name: str,
        values: Mapping[str, np.ndarray],
        *,
        dz: Any,
        Hz: Any,
        curvature: str = "exact",
    ) -> np.ndarray:
        """Dense 𝓗v, shape (size v, size v)."""
        return self._evaluator(values, dz=dz, Hz=Hz).value(self.hbp(name, curvature))

    def _tangent_evaluator(self, values: Mapping[str, np.ndarray], tangents: Mapping[str, Any],
                           dz: Any = None, Rdz: Any = None) -> Any:
        from ..numeric.evaluate import as_matrix, unvec

        ev = self._evaluator(values, dz=dz)
        for name, value in tangents.items():
            v = self._variable(name)
            ev.seeds[tangent(v).kind] = as_matrix(value, v, f"tangent of '{name}'")
        if Rdz is not None:
            ev.seeds[self.Rdz.kind] = unvec(np.asarray(Rdz, dtype=float).reshape(-1, order="F"),
                                            ev.value(self.module.output).shape)
        return ev

    def evaluate_jvp(self, values: Mapping[str, np.ndarray], tangents: Mapping[str, Any]) -> np.ndarray:
        """vec R{z} for tangents of some variables (by name; the others do not move)."""
        ev = self._tangent_evaluator(values, tangents)
        return ev.value(self.jvp(tuple(tangents))).reshape(-1, order="F")

    def evaluate_gradient_tangent(self, name: str, values: Mapping[str, np.ndarray], *, dz: Any,
                                  tangents: Mapping[str, Any], Rdz: Any) -> np.ndarray:
        """vec R{δv} for δz = ``dz`` moving along ``Rdz`` and the named variables along their tangents."""
        ev = self._tangent_evaluator(values, tangents, dz=dz, Rdz=Rdz)
        return ev.value(self.gradient_tangent(name, tuple(tangents))).reshape(-1, order="F")

    def evaluate_hessian(self, name: str, values: Mapping[str, np.ndarray]) -> np.ndarray:
        """Dense Hessian of a scalar module with respect to vec v."""
        return self._evaluator(values).value(self.hessian(name))


def derive(module: Module) -> Derivation:
    """Derive every rule of ``module`` (lazily)."""
    if not isinstance(module, Module):
        raise McalcError(f"derive() expects an mc.Module, got {type(module).__name__}")
    return Derivation(module)
