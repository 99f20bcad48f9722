"""Plain-text (Unicode) printing of expressions: W x + b, (x xᵀ) ⊗ 𝓗z, diag[σ'(x)] ..."""
from __future__ import annotations

import sympy as sp

from ..expr import ONE, Expr, tangent_of
from .base import ATOM, Printer, spec_text


class TextPrinter(Printer):
    minus = "−"

    def _print_Symbol(self, e: Expr) -> str:
        return e.args[0]

    def _print_Seed(self, e: Expr) -> str:
        variable = tangent_of(e)
        if variable is not None:
            return f"d{variable}"
        return {"Hz": "𝓗z", "dz": "δz", "Rdz": "R{δz}"}[e.kind]

    def _sub(self, d: sp.Expr) -> str:
        text = self.dim(d)
        return text if len(text) == 1 else f"({text})"

    def _print_Identity(self, e: Expr) -> str:
        return f"I_{self._sub(e.args[0])}"

    def _print_Zero(self, e: Expr) -> str:
        return "0"

    def _print_Ones(self, e: Expr) -> str:
        rows, cols = e.shape
        if cols == ONE:
            return f"1_{self._sub(rows)}"
        if rows == ONE:
            return f"1_{self._sub(cols)}ᵀ"
        return f"1_({self.dim(rows)}×{self.dim(cols)})"

    def _print_Commutation(self, e: Expr) -> str:
        return f"K_({self.dim(e.args[0])},{self.dim(e.args[1])})"

    def _print_MatMul(self, e: Expr) -> str:
        return " ".join(self.wrap(f, 40, strict=True) for f in e.args)

    def _print_ScalarMul(self, e: Expr) -> str:
        c = e.args[0]
        operand = self.wrap(e.args[1], 30)
        if c == -1:
            return f"−{operand}"
        coefficient = str(c) if c.is_Integer or c.is_Symbol else f"({c})"
        return f"{coefficient}·{operand}"

    def _print_ScaleBy(self, e: Expr) -> str:
        return f"{self.wrap(e.args[0], ATOM)}·{self.wrap(e.args[1], 30)}"

    def _print_Hadamard(self, e: Expr) -> str:
        return " ⊙ ".join(self.wrap(f, 41) for f in e.args)

    def _print_Kron(self, e: Expr) -> str:
        return " ⊗ ".join(self.wrap(f, 41) for f in e.args)

    def _print_Transpose(self, e: Expr) -> str:
        return self.wrap(e.args[0], ATOM) + "ᵀ"

    def _print_Inverse(self, e: Expr) -> str:
        return self.wrap(e.args[0], ATOM) + "⁻¹"

    def _print_Apply(self, e: Expr) -> str:
        return f"{e.args[0].display_name}({self._print(e.args[1])})"

    def _print_Sum(self, e: Expr) -> str:
        return f"sum({self._print(e.args[0])})"

    def _print_Trace(self, e: Expr) -> str:
        return f"tr({self._print(e.args[0])})"

    def _print_Softmax(self, e: Expr) -> str:
        return f"softmax({self._print(e.args[0])})"

    def _print_LogSoftmax(self, e: Expr) -> str:
        return f"log_softmax({self._print(e.args[0])})"

    def _print_Diag(self, e: Expr) -> str:
        return f"diag[{self._print(e.args[0])}]"

    def _print_Vec(self, e: Expr) -> str:
        return f"vec({self._print(e.args[0])})"

    def _print_Gram(self, e: Expr) -> str:
        inner = self.wrap(e.args[0], ATOM)
        return f"{inner} {inner}ᵀ" if e.scale == 1 else f"({e.scale})·{inner} {inner}ᵀ"

    def _print_WindowArgmax(self, e: Expr) -> str:
        return f"argmax{_spec_text(e.args[1])}({self._print(e.args[0])})"

    def _print_BlockTrace(self, e: Expr) -> str:
        return f"blocktrace_{self.dim(e.args[1])}({self._print(e.args[0])})"

    def _print_Unfold(self, e: Expr) -> str:
        return f"unfold{_spec_text(e.args[1])}({self._print(e.args[0])})"

    def _print_Fold(self, e: Expr) -> str:
        return f"fold{_spec_text(e.args[1])}({self._print(e.args[0])})"

    def _print_UnfoldMatrix(self, e: Expr) -> str:
        return f"P_unfold{_spec_text(e.args[0])}"

    def _print_Stacked(self, e: Expr) -> str:
        return f"[{self._print(e.args[0])}]_B"

    def _print_SampleProduct(self, e: Expr) -> str:  # each sample's block times V: M (I_B ⊗ V)
        return f"{self.wrap(e.args[0], ATOM)} (I_B ⊗ {self._print(e.args[1])})"

    def _print_SampleMatMul(self, e: Expr) -> str:
        return f"[{self._print(e.args[0])} · {self._print(e.args[1])}]ᵢ"

    def _print_SampleTranspose(self, e: Expr) -> str:
        return f"[{self._print(e.args[0])}]ᵢᵀ"

    def _print_VecOfSamples(self, e: Expr) -> str:
        return f"vecᵢ[{self._print(e.args[0])}]"

    def _print_UnvecOfSamples(self, e: Expr) -> str:
        return f"unvecᵢ[{self._print(e.args[0])}]"

    def _print_BatchMean(self, e: Expr) -> str:
        return f"meanᵢ[{self._print(e.args[0])}]"

    def _print_RankSum(self, e: Expr) -> str:
        return f"Σ_ranks[{self._print(e.args[0])}]"

    def _print_PSDProjection(self, e: Expr) -> str:
        return f"{e.args[0]}_eig[{self._print(e.args[1])}]"


_printer = TextPrinter()


def to_text(expr: Expr) -> str:
    """The plain-text form of ``expr``."""
    return _printer.doprint(expr)


def _spec_text(spec) -> str:
    """[k=5, s=2, p=2] or [k=3x3, p=1x1], with the defaults (stride 1, padding 0, dilation 1) left out."""
    parts = [f"k={spec_text(spec.kernel)}"] + [
        f"{n}={spec_text(v)}" for n, v, default in (("s", spec.stride, 1), ("p", spec.padding, 0),
                                                    ("d", spec.dilation, 1)) if set(v) != {default}]
    return "[" + ", ".join(parts) + "]"
