"""The examples run: the custom layers verify, and the paper's CIFAR-10 experiment runs its table (smoke)."""
import json
import os
import re
import subprocess
import sys

from conftest import ROOT


def test_cifar10_example_prints_the_papers_table():
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "cifar10_hbp.py"), "--smoke"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith(("SGD", "CG"))]
    assert len(rows) == 8
    assert rows[0].split()[1] == "0.406" and rows[2].split()[2] == "0.488"  # the authors' numbers beside ours


def test_mnist_hf_example_prints_seed_002s_table():
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "mnist_hf.py"), "--digits", "--epochs", "1"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith(("SGD", "Newton", "HF-"))]
    assert len(rows) == 6
    assert "0.2121 / 0.9138 / 222" in rows[0] and "0.2049 / 0.9239 / 246" in rows[4]  # seed 002's beside ours
    accuracies = [float(row.split()[-3]) for row in rows]
    assert all(0.0 <= a <= 1.0 for a in accuracies) and max(accuracies) > 0.5  # the methods learn


def test_the_readme_snippet_prints_what_the_readme_says():
    """The first Python block of the README, run as a script, prints the lines shown under it."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    shown = re.search(r"```\n\nprints \(before the LaTeX\)\n\n((?:    .*\n)+)", readme).group(1)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    expected = [line[4:] for line in shown.splitlines()]
    assert done.stdout.splitlines()[:len(expected)] == expected
    assert "\\begin{align*}" in done.stdout


def test_every_python_block_of_the_readme_runs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert len(blocks) >= 2
    for code in blocks[1:]:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert done.returncode == 0, (code, done.stderr)


def test_layernorm_and_gelu_verify_generate_and_train(tmp_path):
    """The README's "your own layer" example: every rule and the generated NumPy code against finite
    differences, then a network of both trained from the command line."""
    env = {**os.environ, "MCALC_CACHE": str(tmp_path)}
    example = str(ROOT / "examples" / "layernorm_gelu.py")
    for backend in ("symbolic", "numpy"):
        done = subprocess.run([sys.executable, "-m", "mcalc.cli", "verify", example, "--backend", backend],
                              capture_output=True, text=True, env=env)
        assert done.returncode == 0 and " 0 failed" in done.stdout, done.stdout + done.stderr
    done = subprocess.run([sys.executable, "-m", "mcalc.cli", "train", "--modules", example, "--model",
                           "64-LayerNorm-128-GELU-10", "--optimizer", "hbp-newton", "--epochs", "2"],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout.split("test accuracy")[-1].split()[0]) > 0.9


def test_a_long_report_names_its_repeated_subexpressions():
    """LayerNorm's rules repeat sqrt(mean(x_c ⊙ x_c) + ε) dozens of times: the report names each repeated
    subexpression once (every name used at least twice), and the zero sum(x − mean(x)·1) is gone."""
    import mcalc as mc
    from mcalc.layers import SigmoidLinear
    from mcalc.printing.report import merged, render
    from mcalc.printing.shared import shared_names
    from mcalc.printing.text import to_text
    from mcalc.user_modules import load_modules

    (layer_norm,) = [m for m in load_modules(ROOT / "examples" / "layernorm_gelu.py") if m.name == "LayerNorm"]
    d = mc.derive(layer_norm)
    plain = sum(len(to_text(r.expr)) for r in d.rules())
    report = render(d, "text")
    assert len(report) < plain / 4 and "where s₁ = x + (-1/n)·sum(x)·1_n" in report
    assert "sum(x + (-1/n)·sum(x)·1_n)" not in "".join(to_text(r.expr) for r in d.rules())
    names = shared_names([r.expr for r in merged(d.rules())])
    body = report.split("\n  where reciprocal")[0]
    for name in names.values():
        assert len(re.findall(rf"{name}(?![₀-₉])", body)) >= 3  # defined once, used at least twice
    assert "where s₁" not in render(mc.derive(SigmoidLinear), "text")  # S.11's rules read best written out


def test_the_mnist1d_cnn_example_trains_and_writes_its_history(tmp_path):
    """examples/mnist1d_cnn.py: Greydanus' ConvBase as a model spec, an epoch of hbp-newton (its default), the
    history in mcalc train's --json format."""
    import json

    out = tmp_path / "history.json"
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "mnist1d_cnn.py"), "--epochs", "1", "--json",
                           str(out)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "MCALC_CACHE": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stderr
    history = json.loads(out.read_text())
    assert history["optimizer"] == "hbp-newton" and len(history["history"]) == 1
    assert history["history"][0]["test_accuracy"] > 0.3  # chance is 0.1


def test_the_robustness_matrix_runs_an_option_other_than_the_default(tmp_path):
    """``--set hbp-newton.approximation=7`` reaches the optimiser (the run differs from the default's) and the
    JSON names it; an option the optimiser lacks is refused before anything runs."""
    script = ROOT / "benchmarks" / "robustness.py"
    losses = {}
    for name, extra in (("default", []), ("paper", ["--set", "hbp-newton.approximation=7"])):
        out = tmp_path / f"{name}.json"
        done = subprocess.run([sys.executable, str(script), "--data", "digits", "--activations", "relu", "--depths",
                               "1", "--optimizers", "hbp-newton", "--seeds", "1", "--epochs", "1", "--workers", "1",
                               "--json", str(out), *extra], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        result = json.loads(out.read_text())
        assert result["settings"] == ({"hbp-newton": {"approximation": "7"}} if extra else {})
        losses[name] = result["runs"][0]["final_loss"]
    assert losses["default"] != losses["paper"]
    done = subprocess.run([sys.executable, str(script), "--set", "kfac.no_such_option=1", "--json",
                           str(tmp_path / "never.json")], capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and "kfac has no option 'no_such_option'" in done.stderr
    assert not (tmp_path / "never.json").exists()
