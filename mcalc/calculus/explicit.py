"""Entrywise SymPy expansion of expressions, for exact symbolic comparison.

Structured equality (two rules simplifying to the same tree) proves equality
for every dimension; when the trees differ, expanding both at small concrete
sizes into SymPy matrices whose entries are symbols (x₀, W₀₁, …) and
simplifying the difference decides equality exactly at those sizes.
"""
from __future__ import annotations

from collections.abc import Mapping

import sympy as sp

from .. import dims
from ..errors import McalcError
from ..expr import Expr, UnfoldMatrix
from ..simplification import simplify


class Expander:
    """Expands an expression into an explicit ``sympy.Matrix`` at fixed sizes."""

    def __init__(self, sizes: Mapping[str, int]) -> None:
        self.binding = {sp.Symbol(k, integer=True, positive=True): v for k, v in sizes.items()}
        self._memo: dict[Expr, sp.Matrix] = {}

    def dim(self, d: sp.Expr) -> int:
        return dims.evaluate(d, self.binding)

    def __call__(self, e: Expr) -> sp.Matrix:
        if e not in self._memo:
            method = getattr(self, f"_x_{type(e).__name__}", None)
            if method is None:
                raise McalcError(f"no entrywise expansion for {type(e).__name__}")
            self._memo[e] = method(e)
        return self._memo[e]

    def _entries(self, name: str, rows: int, cols: int, symmetric: bool = False) -> sp.Matrix:
        def entry(i: int, j: int) -> sp.Symbol:
            if symmetric and j < i:
                i, j = j, i
            return sp.Symbol(f"{name}_{i}_{j}", real=True)

        return sp.Matrix(rows, cols, lambda i, j: entry(i, j))

    def _x_Symbol(self, e: Expr) -> sp.Matrix:
        return self._entries(e.args[0], self.dim(e.rows), self.dim(e.cols))

    def _x_Seed(self, e: Expr) -> sp.Matrix:
        return self._entries(e.args[0], self.dim(e.rows), self.dim(e.cols), symmetric=e.args[0] == "Hz")

    def _x_Identity(self, e: Expr) -> sp.Matrix:
        return sp.eye(self.dim(e.rows))

    def _x_Zero(self, e: Expr) -> sp.Matrix:
        return sp.zeros(self.dim(e.rows), self.dim(e.cols))

    def _x_Ones(self, e: Expr) -> sp.Matrix:
        return sp.ones(self.dim(e.rows), self.dim(e.cols))

    def _x_Commutation(self, e: Expr) -> sp.Matrix:
        m, n = self.dim(e.args[0]), self.dim(e.args[1])
        k = sp.zeros(m * n, m * n)
        for i in range(m):
            for j in range(n):
                k[j + n * i, i + m * j] = 1
        return k

    def _x_UnfoldMatrix(self, e: Expr) -> sp.Matrix:
        spec, c, size = e.args
        out = sp.zeros(self.dim(e.rows), self.dim(e.cols))
        for row, col in spec.matrix_ones(self.dim(c), [self.dim(s) for s in size]):
            out[row, col] = 1
        return out

    def _x_Unfold(self, e: Expr) -> sp.Matrix:
        x, spec, size = e.args
        a = self(x)
        columns = sp.Matrix([a[i, j] for j in range(a.cols) for i in range(a.rows)])  # vec X
        patches = self(UnfoldMatrix(spec, x.rows, size)) * columns
        rows = self.dim(e.rows)
        return sp.Matrix(rows, self.dim(e.cols), lambda i, j: patches[j * rows + i])

    def _x_Fold(self, e: Expr) -> sp.Matrix:
        u, spec, size = e.args
        a = self(u)
        columns = sp.Matrix([a[i, j] for j in range(a.cols) for i in range(a.rows)])  # vec U
        signal = self(UnfoldMatrix(spec, e.rows, size)).T * columns
        rows = self.dim(e.rows)
        return sp.Matrix(rows, self.dim(e.cols), lambda i, j: signal[j * rows + i])

    def _x_MatMul(self, e: Expr) -> sp.Matrix:
        out = self(e.args[0])
        for f in e.args[1:]:
            out = out * self(f)
        return out

    def _x_Add(self, e: Expr) -> sp.Matrix:
        out = self(e.args[0])
        for t in e.args[1:]:
            out = out + self(t)
        return out

    def _x_ScalarMul(self, e: Expr) -> sp.Matrix:
        return e.args[0].xreplace(self.binding) * self(e.args[1])

    def _x_ScaleBy(self, e: Expr) -> sp.Matrix:
        return self(e.args[0])[0, 0] * self(e.args[1])

    def _x_Hadamard(self, e: Expr) -> sp.Matrix:
        return self(e.args[0]).multiply_elementwise(self(e.args[1]))

    def _x_Transpose(self, e: Expr) -> sp.Matrix:
        return self(e.args[0]).T

    def _x_Apply(self, e: Expr) -> sp.Matrix:
        f = e.args[0]
        return self(e.args[1]).applyfunc(f.at)

    def _x_Sum(self, e: Expr) -> sp.Matrix:
        return sp.Matrix([[sum(self(e.args[0]))]])

    def _x_Trace(self, e: Expr) -> sp.Matrix:
        return sp.Matrix([[self(e.args[0]).trace()]])

    def _x_Softmax(self, e: Expr) -> sp.Matrix:
        exps = self(e.args[0]).applyfunc(sp.exp)
        return exps / sum(exps)

    def _x_LogSoftmax(self, e: Expr) -> sp.Matrix:
        x = self(e.args[0])
        total = sp.log(sum(x.applyfunc(sp.exp)))
        return x.applyfunc(lambda v: v - total)

    def _x_Inverse(self, e: Expr) -> sp.Matrix:
        return self(e.args[0]).inv()

    def _x_Kron(self, e: Expr) -> sp.Matrix:
        return sp.kronecker_product(self(e.args[0]), self(e.args[1]))

    def _x_Diag(self, e: Expr) -> sp.Matrix:
        return sp.diag(*list(self(e.args[0])))

    def _x_Vec(self, e: Expr) -> sp.Matrix:
        a = self(e.args[0])
        return sp.Matrix([a[i, j] for j in range(a.cols) for i in range(a.rows)])


def symbolically_equal(a: Expr, b: Expr, sizes: Mapping[str, int] | None = None) -> bool:
    """Whether two expressions are equal: structurally after simplification, else entrywise.

    ``sizes`` binds the dimension names for the entrywise check (default 2 each).
    """
    a, b = simplify(a), simplify(b)
    if a == b:
        return True
    if a.shape != b.shape:
        return False
    names = {str(s) for x in a.walk() for d in x.shape for s in sp.sympify(d).free_symbols}
    names |= {str(s) for x in b.walk() for d in x.shape for s in sp.sympify(d).free_symbols}
    binding = {n: (sizes or {}).get(n, 2) for n in names}
    expand = Expander(binding)
    difference = expand(a) - expand(b)
    return all(sp.simplify(sp.expand(entry.rewrite(sp.exp))) == 0 for entry in difference)
