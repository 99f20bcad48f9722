"""LaTeX printing of expressions, in the notation of the HBP paper."""
from __future__ import annotations

import sympy as sp

from ..expr import ONE, Expr, tangent_of
from .base import ATOM, Printer, spec_text


def _name(name: str) -> str:
    head, _, tail = name.partition("_")
    return f"{head}_{{{tail}}}" if tail else name


class LatexPrinter(Printer):
    def parens(self, text: str) -> str:
        return rf"\left({text}\right)"

    def dim(self, d: sp.Expr) -> str:
        return sp.latex(d).replace(r"\cdot", "")

    def _print_Symbol(self, e: Expr) -> str:
        return _name(e.args[0])

    def _print_Seed(self, e: Expr) -> str:
        variable = tangent_of(e)
        if variable is not None:
            return rf"\mathrm{{d}}{_name(variable)}"
        return {"Hz": r"\mathcal{H}z", "dz": r"\delta z", "Rdz": r"\mathcal{R}\{\delta z\}"}[e.kind]

    def _print_Identity(self, e: Expr) -> str:
        return f"I_{{{self.dim(e.args[0])}}}"

    def _print_Zero(self, e: Expr) -> str:
        return "0"

    def _print_Ones(self, e: Expr) -> str:
        rows, cols = e.shape
        if cols == ONE:
            return rf"\mathbf{{1}}_{{{self.dim(rows)}}}"
        if rows == ONE:
            return rf"\mathbf{{1}}_{{{self.dim(cols)}}}^{{\top}}"
        return rf"\mathbf{{1}}_{{{self.dim(rows)} \times {self.dim(cols)}}}"

    def _print_Commutation(self, e: Expr) -> str:
        return f"K_{{{self.dim(e.args[0])},{self.dim(e.args[1])}}}"

    def _print_MatMul(self, e: Expr) -> str:
        return " ".join(self.wrap(f, 40, strict=True) for f in e.args)

    def _print_ScalarMul(self, e: Expr) -> str:
        c = e.args[0]
        operand = self.wrap(e.args[1], 30)
        if c == -1:
            return f"-{operand}"
        coefficient = sp.latex(c) if c.is_Integer or c.is_Symbol else rf"\left({sp.latex(c)}\right)"
        return f"{coefficient} {operand}"

    def _print_ScaleBy(self, e: Expr) -> str:
        return rf"{self.wrap(e.args[0], ATOM)} \, {self.wrap(e.args[1], 30)}"

    def _print_Hadamard(self, e: Expr) -> str:
        return r" \odot ".join(self.wrap(f, 41) for f in e.args)

    def _print_Kron(self, e: Expr) -> str:
        return r" \otimes ".join(self.wrap(f, 41) for f in e.args)

    def _print_Transpose(self, e: Expr) -> str:
        return self.wrap(e.args[0], ATOM) + r"^{\top}"

    def _print_Inverse(self, e: Expr) -> str:
        return self.wrap(e.args[0], ATOM) + "^{-1}"

    def _print_Apply(self, e: Expr) -> str:
        f = e.args[0]
        primes = "'" * f.order
        return rf"{f.base.latex_name}{primes}\left({self._print(e.args[1])}\right)"

    def _print_Sum(self, e: Expr) -> str:
        return rf"\operatorname{{sum}}\left({self._print(e.args[0])}\right)"

    def _print_Trace(self, e: Expr) -> str:
        return rf"\operatorname{{tr}}\left({self._print(e.args[0])}\right)"

    def _print_Softmax(self, e: Expr) -> str:
        return rf"\operatorname{{softmax}}\left({self._print(e.args[0])}\right)"

    def _print_LogSoftmax(self, e: Expr) -> str:
        return rf"\log\operatorname{{softmax}}\left({self._print(e.args[0])}\right)"

    def _print_Diag(self, e: Expr) -> str:
        return rf"\operatorname{{diag}}\left[{self._print(e.args[0])}\right]"

    def _print_Vec(self, e: Expr) -> str:
        return rf"\operatorname{{vec}}\left({self._print(e.args[0])}\right)"

    def _print_Gram(self, e: Expr) -> str:
        inner = self.wrap(e.args[0], ATOM)
        scale = "" if e.scale == 1 else sp.latex(e.scale) + r"\,"
        return rf"{scale}{inner} {inner}^{{\top}}"

    def _print_WindowArgmax(self, e: Expr) -> str:
        return rf"\operatorname{{argmax}}_{{{spec_text(e.args[1].kernel)}}}\left({self._print(e.args[0])}\right)"

    def _print_BlockTrace(self, e: Expr) -> str:
        return rf"\operatorname{{tr}}_{{{sp.latex(e.args[1])}}}\left({self._print(e.args[0])}\right)"

    def _print_Unfold(self, e: Expr) -> str:
        return rf"\operatorname{{unfold}}_{{{spec_text(e.args[1].kernel)}}}\left({self._print(e.args[0])}\right)"

    def _print_Fold(self, e: Expr) -> str:
        return rf"\operatorname{{fold}}_{{{spec_text(e.args[1].kernel)}}}\left({self._print(e.args[0])}\right)"

    def _print_UnfoldMatrix(self, e: Expr) -> str:
        return rf"P_{{\mathrm{{unfold}}, {spec_text(e.args[0].kernel)}}}"

    def _print_Stacked(self, e: Expr) -> str:
        return rf"\left[{self._print(e.args[0])}\right]_{{B}}"

    def _print_SampleProduct(self, e: Expr) -> str:
        return rf"{self.wrap(e.args[0], ATOM)} \left(I_{{B}} \otimes {self._print(e.args[1])}\right)"

    def _print_SampleMatMul(self, e: Expr) -> str:
        return rf"\left[{self._print(e.args[0])} \cdot {self._print(e.args[1])}\right]_{{i}}"

    def _print_SampleTranspose(self, e: Expr) -> str:
        return rf"\left[{self._print(e.args[0])}\right]_{{i}}^{{\top}}"

    def _print_VecOfSamples(self, e: Expr) -> str:
        return rf"\operatorname{{vec}}_{{i}}\left[{self._print(e.args[0])}\right]"

    def _print_UnvecOfSamples(self, e: Expr) -> str:
        return rf"\operatorname{{unvec}}_{{i}}\left[{self._print(e.args[0])}\right]"

    def _print_BatchMean(self, e: Expr) -> str:
        return rf"\overline{{{self._print(e.args[0])}}}"

    def _print_RankSum(self, e: Expr) -> str:
        return rf"\sum_{{\mathrm{{ranks}}}}\left[{self._print(e.args[0])}\right]"

    def _print_PSDProjection(self, e: Expr) -> str:
        return rf"\operatorname{{{e.args[0]}}}_{{\mathrm{{eig}}}}\left[{self._print(e.args[1])}\right]"


_printer = LatexPrinter()


def to_latex(expr: Expr) -> str:
    """The LaTeX form of ``expr``."""
    return _printer.doprint(expr)
