"""The command line: derive in every format, verify's table and exit codes, demo."""
import json
import subprocess
import sys

import pytest
from conftest import ROOT

from mcalc import cli
from mcalc.calculus.jacobian import JVP_RULES
from mcalc.expr import Apply, Diag, MatMul, Vec

EXAMPLES = str(ROOT / "examples" / "custom_layers.py")


def run(*args):
    return subprocess.run([sys.executable, "-m", "mcalc.cli", *args], capture_output=True, text=True)


@pytest.mark.parametrize("fmt", ["text", "latex", "markdown", "json"])
def test_derive_formats(fmt):
    result = run("derive", EXAMPLES, "--module", "LowRank", "--format", fmt)
    assert result.returncode == 0, result.stderr
    if fmt == "json":
        (doc,) = json.loads(result.stdout)
        assert doc["module"] == "LowRank" and doc["params"] == ["U", "R"]
        assert any(r["text"] == "(x xᵀ) ⊗ (Uᵀ 𝓗z U)" for r in doc["rules"])
    elif fmt == "latex":
        assert result.stdout.startswith("\\begin{align*}") and r"\otimes" in result.stdout
    else:
        assert "LowRank" in result.stdout


def test_derive_library_by_default():
    result = run("derive", "--module", "Linear")
    assert result.returncode == 0 and "𝓗vec W = (x xᵀ) ⊗ 𝓗z" in result.stdout


def test_verify_prints_a_table_and_passes():
    result = run("verify", EXAMPLES)
    assert result.returncode == 0, result.stdout
    assert "module" in result.stdout and "tolerance" in result.stdout
    assert result.stdout.strip().endswith("passed, 0 failed")


def test_verify_json():
    result = run("verify", "--module", "CrossEntropy", "--json")
    doc = json.loads(result.stdout)
    assert doc["failed"] == 0 and all(c["ok"] for c in doc["checks"])


def test_verify_exits_1_on_a_wrong_rule(monkeypatch, capsys):
    def wrong(node, jac):  # drops the derivative: dφ(A) = φ(A) ⊙ dA
        return MatMul(Diag(Vec(Apply(node.function, node.operand))), jac(node.operand))

    monkeypatch.setitem(JVP_RULES, Apply, wrong)
    assert cli.main(["verify", "--module", "Tanh"]) == cli.EXIT_MISMATCH
    assert "MISMATCH" in capsys.readouterr().out


def test_verify_exits_1_on_a_wrong_directional_derivative(monkeypatch, capsys):
    from mcalc.calculus.differential import DIFFERENTIAL_RULES
    from mcalc.expr import Hadamard

    def wrong(node, d):  # drops the derivative: dφ(A) = φ(A) ⊙ dA
        return Hadamard(node, d(node.operand))

    monkeypatch.setitem(DIFFERENTIAL_RULES, Apply, wrong)
    assert cli.main(["verify", "--module", "Tanh"]) == cli.EXIT_MISMATCH
    out = capsys.readouterr().out
    assert "R{z}" in out and "MISMATCH" in out


def test_demo_runs(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mcalc.cli", "demo", "--epochs", "3"], capture_output=True,
                            text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "SigmoidLinear" in result.stdout and "MISMATCH" not in result.stdout
    assert "hbp-newton" in result.stdout and (tmp_path / "mcalc-demo.png").exists()
    runs = json.loads((tmp_path / "mcalc-demo.json").read_text())["runs"]
    assert [r["optimizer"] for r in runs] == ["sgd", "adam", "hbp-newton", "kfac", "kbfgs", "hf-gn", "hf-newton"]
