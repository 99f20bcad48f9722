"""Printers: text and LaTeX forms of expressions (``text``, ``latex``), reports of derivations (``report``)."""

FORMATS = ("text", "latex", "markdown", "json")  # the report formats of `mcalc derive --format`
