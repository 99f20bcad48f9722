"""The steps of a per-sample program that their batch means can replace: the program's mean pushed down
through its linear steps to the chains of structured factors it multiplies.

A per-sample program (a batch mean with no closed form, :class:`~mcalc.expr.BatchMean`) computes a stack
of per-sample matrices and returns their mean. Its value is often a sum of scaled and transposed chains,
attention's Σ cᵢ Jᵢᵀ 𝓗z Jᵢ: since E[Σ cᵢ Xᵢ] = Σ cᵢ E[Xᵢ] and E[Xᵀ] = E[X]ᵀ, the mean can be taken of each
chain instead, which :func:`~mcalc.runtime.chain.chain_mean` does without the stack (its samples' index
summed inside the contraction). A step qualifies when it is a chain, or a sum (of whole terms), scaling or
transpose, and every step that reads it is one that qualifies and reads it as a term; the value itself
qualifies when it is such a step. A term that does not qualify is averaged where the sum reads it.
"""
from __future__ import annotations

from ..expr import Add, Diag, Expr, Identity, ScalarMul, Transpose
from .numpy_printer import is_whole, prints_as_chain
from .plan import Program


def linear_terms(node: Expr) -> tuple[Expr, ...] | None:
    """The terms whose means give ``node``'s mean: none for a chain (its mean is computed whole), the
    operand of a scaling or transpose, a sum's terms; None for any other step."""
    if prints_as_chain(node):
        return ()
    if isinstance(node, (ScalarMul, Transpose)):
        return (node.args[-1],)
    if isinstance(node, Add) and all(
            is_whole(t) and not isinstance(t.operand if isinstance(t, ScalarMul) else t, (Diag, Identity))
            for t in node.args):
        return node.args
    return None


def mean_steps(program: Program) -> set[str]:
    """The steps of a per-sample ``program`` that are computed as their batch means (see the module)."""
    value = program.results.get("value")
    if not isinstance(value, str):
        return set()
    target_of = {s.node: s.target for s in program.steps}
    readers = program.readers()
    others = set(program.result_names()) - {value}
    means: set[str] = set()
    for step in reversed(program.steps):  # readers before what they read
        if linear_terms(step.node) is None or step.target in others:
            continue
        read_by = readers.get(step.target, [])
        if step.target == value or (read_by and all(
                target_of[r] in means and step.target in {program.names.get(t) for t in linear_terms(r)}
                for r in read_by)):
            means.add(step.target)
    return means
