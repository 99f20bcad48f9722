"""Modules: an output expression with its symbols labelled input, parameter or constant."""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import sympy as sp

from . import dims
from .errors import DeclarationError
from .expr import Expr, Symbol, map_dims, substitute

if TYPE_CHECKING:
    from .calculus.derivation import Derivation

# Names the generated code gives to what is passed into a module's rules.
RESERVED_NAMES = {"dz": "δz, the gradient backpropagated into a module", "Hz": "𝓗z, the Hessian passed back"}


def _describe(s: Symbol) -> str:
    """'a matrix of shape m × n', 'a positive vector of size n' and the like."""
    hints = "".join(f"{h} " for h in s.hints)
    if s.is_scalar:
        return f"a {hints}scalar"
    return f"a {hints}vector of size {s.rows}" if s.is_vector else f"a {hints}matrix of shape {s.rows} × {s.cols}"


class Module:
    """A network module z = f(inputs, params; constants).

    Every symbol of ``output`` must be labelled: ``inputs`` receive the parent's
    output and get an 𝓗x rule (4a), ``params`` are trained and get an 𝓗θ rule
    (4b), ``constants`` (labels, fixed data) get no rule.
    """

    def __init__(
        self,
        name: str,
        output: Expr,
        inputs: Sequence[Symbol] = (),
        params: Sequence[Symbol] = (),
        constants: Sequence[Symbol] = (),
    ) -> None:
        if not isinstance(name, str) or not name.isidentifier():
            raise DeclarationError(f"module name {name!r} must be an identifier")
        if not isinstance(output, Expr):
            raise DeclarationError(f"module '{name}': output {output!r} is not an mcalc expression")
        self.name = name
        self.output = output
        self.inputs = tuple(inputs)
        self.params = tuple(params)
        self.constants = tuple(constants)
        self._check()

    def _check(self) -> None:
        labelled: dict[str, Symbol] = {}
        for role, group in (("input", self.inputs), ("parameter", self.params), ("constant", self.constants)):
            for s in group:
                if not isinstance(s, Symbol):
                    raise DeclarationError(
                        f"module '{self.name}': {role} {s!r} is not a symbol (mc.Vector / mc.Matrix / mc.Scalar)"
                    )
                if s.name in labelled:
                    raise DeclarationError(f"module '{self.name}': symbol '{s.name}' is labelled twice")
                if s.name in RESERVED_NAMES:
                    raise DeclarationError(f"module '{self.name}': the name '{s.name}' is reserved "
                                           f"({RESERVED_NAMES[s.name]}); rename the symbol")
                labelled[s.name] = s
        used: dict[str, Symbol] = {}
        for s in self.output.symbols:  # a set: two symbols of one name must be refused whichever comes first
            if used.setdefault(s.name, s) != s:
                raise DeclarationError(f"module '{self.name}': two different symbols are named '{s.name}' "
                                       f"({_describe(used[s.name])} and {_describe(s)}); give each its own name")
        for n, s in used.items():
            if n not in labelled:
                raise DeclarationError(
                    f"module '{self.name}': symbol '{n}' in the output is not labelled input, param or constant"
                )
            if labelled[n] != s:
                raise DeclarationError(f"module '{self.name}': two different symbols are named '{n}' "
                                       f"({_describe(labelled[n])} labelled, {_describe(s)} in the output); "
                                       "give each its own name")
        for n in labelled:
            if n not in used:
                raise DeclarationError(f"module '{self.name}': symbol '{n}' is labelled but unused in the output")
        if not (self.inputs or self.params):
            raise DeclarationError(f"module '{self.name}' has no input and no parameter to differentiate")

    # ------------------------------------------------------------------
    @property
    def variables(self) -> tuple[Symbol, ...]:
        """Inputs then parameters: the symbols that get HBP rules."""
        return self.inputs + self.params

    @property
    def symbols(self) -> tuple[Symbol, ...]:
        return self.inputs + self.params + self.constants

    def symbol(self, name: str) -> Symbol:
        for s in self.symbols:
            if s.name == name:
                return s
        raise DeclarationError(
            f"module '{self.name}' has no symbol '{name}'; it has {[s.name for s in self.symbols]}"
        )

    def role(self, name: str) -> str:
        s = self.symbol(name)
        return "input" if s in self.inputs else "param" if s in self.params else "constant"

    def forward(self, values: Mapping[str, np.ndarray]) -> np.ndarray:
        """z for NumPy values (vectors 1-D or (n, 1), matrices (rows, cols))."""
        from .numeric.evaluate import Evaluator, to_user_shape

        ev = Evaluator.for_module(self, values)
        return to_user_shape(ev.value(self.output), self.output)

    def derive(self) -> Derivation:
        from .calculus.derivation import Derivation

        return Derivation(self)

    def renamed(self, suffix: str) -> Module:
        """A copy whose parameters and constants carry ``suffix`` (to chain equal layers)."""
        mapping = {s: Symbol(s.name + suffix, *s.shape, s.hints) for s in self.params + self.constants}
        return Module(
            self.name + suffix,
            substitute(self.output, mapping),
            self.inputs,
            [mapping[s] for s in self.params],
            [mapping[s] for s in self.constants],
        )

    @property
    def dimensions(self) -> set[sp.Symbol]:
        """The dimension symbols of the module's declared symbols."""
        return {d for s in self.symbols for extent in s.shape for d in extent.free_symbols}

    def with_dims(self, mapping: dict[sp.Symbol, sp.Expr]) -> Module:
        """A copy with dimension symbols renamed (or fixed) by ``mapping``."""
        if not mapping:
            return self
        new = {s: map_dims(s, mapping) for s in self.symbols}
        return Module(self.name, map_dims(self.output, mapping), [new[s] for s in self.inputs],
                      [new[s] for s in self.params], [new[s] for s in self.constants])

    def __repr__(self) -> str:
        return (
            f"Module({self.name}: z = {self.output!r}; inputs={[s.name for s in self.inputs]}, "
            f"params={[s.name for s in self.params]}, constants={[s.name for s in self.constants]})"
        )


def chain(name: str, modules: Iterable[Module]) -> Module:
    """Compose modules in data-flow order: each output feeds the next module's single input.

    The result is one module whose rules are derived analytically for the
    whole composition (Supplement C.1, e.g. σ then Linear gives (S.11)).
    """
    modules = list(modules)
    if not modules:
        raise DeclarationError(f"chain '{name}' needs at least one module")
    first = modules[0]
    output, inputs = first.output, list(first.inputs)
    params, constants = list(first.params), list(first.constants)
    used = first.dimensions
    for position, m in enumerate(modules[1:], start=2):
        if len(m.inputs) != 1:
            raise DeclarationError(f"chain '{name}': module '{m.name}' must have exactly one input to be chained")
        m = m.with_dims(_unify(name, m, output, used, position))
        used |= m.dimensions
        (x,) = m.inputs
        taken = {s.name for s in inputs + params + constants}
        for s in m.params + m.constants:
            if s.name in taken:
                raise DeclarationError(
                    f"chain '{name}': symbol '{s.name}' of '{m.name}' clashes with an earlier module's; "
                    "use Module.renamed(suffix)"
                )
        output = substitute(m.output, {x: output})
        params += m.params
        constants += m.constants
    return Module(name, output, inputs, params, constants)


def _unify(chain_name: str, m: Module, incoming: Expr, used: set[sp.Symbol], position: int) -> dict:
    """Dimension renaming that makes ``m``'s input the shape of ``incoming`` and keeps its other dims apart."""
    (x,) = m.inputs
    mapping: dict[sp.Symbol, sp.Expr] = {}
    for own, given in zip(x.shape, incoming.shape):
        if own.is_Symbol and mapping.get(own, given) == given:
            mapping[own] = given
        elif not dims.same(own.xreplace(mapping), given):
            raise DeclarationError(
                f"chain '{chain_name}': '{m.name}' expects input '{x.name}' of shape {x.shape} "
                f"but receives {incoming!r} of shape {incoming.shape}"
            )
    taken = used | set(mapping.values())
    for d in sorted(m.dimensions - set(mapping), key=str):
        if d in taken:
            fresh = next(f"{d}{position}{k or ''}" for k in range(100)
                         if dims.dim(f"{d}{position}{k or ''}") not in taken)
            mapping[d] = dims.dim(fresh)
            taken.add(mapping[d])
    return mapping
