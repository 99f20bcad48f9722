"""The command line: derive in every format, verify's table and exit codes, demo."""
import json
import re
import subprocess
import sys

import numpy as np
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


# --- train: bad input, live progress, help, file modes ------------------------------------------
@pytest.mark.parametrize(("arguments", "message"), [
    (["--batch-size", "0"], "--batch-size must be a positive integer, not 0"),
    (["--batch-size", "-5"], "--batch-size must be a positive integer, not -5"),
    (["--lr", "-1"], "--lr must be positive and finite, not -1.0"),
    (["--lr", "inf"], "--lr must be positive and finite, not inf"),
    (["--epochs", "0"], "--epochs must be a positive integer, not 0"),
    (["--split", "0"], "--split must be a positive integer, not 0"),
    (["--cg-iterations", "0"], "--cg-iterations must be a positive integer"),
    (["--optimizer", "sgd", "--alpha", "0.1"], "--alpha is hbp-newton's damping of eq. (8); sgd has none"),
    (["--alpha", "0"], "alpha must lie in (0, 1], not 0.0"),
    (["--epochs", "3", "--lr-drop", "4"], "--lr-drop 4: a drop happens at the start of an epoch from 2 to 3"),
    (["--optimizer", "kfac", "--lr-drop", "2"], "KFAC chooses its step length itself"),
])
def test_train_refuses_numbers_a_run_cannot_start_with(arguments, message, tmp_path, capsys):
    out = tmp_path / "h.json"
    assert cli.main(["train", *arguments, "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"mcalc: error: {message}" or (message in err and len(err.strip().splitlines()) == 1)
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize(("arguments", "message"), [
    (["train", "--seed", "-1"], "argument --seed: a seed is a whole number ≥ 0, not '-1'"),
    (["verify", "--seed", "x"], "argument --seed: a seed is a whole number ≥ 0, not 'x'"),
    (["demo", "--seed", "-1"], "argument --seed: a seed is a whole number ≥ 0"),
    (["demo", "--epochs", "0"], "argument --epochs: must be a positive whole number, not '0'"),
    (["demo", "--target-accuracy", "2"], "argument --target-accuracy: an accuracy is a fraction in (0, 1]"),
])
def test_options_of_the_wrong_kind_are_one_line_of_usage(arguments, message, tmp_path, capsys, monkeypatch):
    """A seed below 0 (NumPy's and scikit-learn's tracebacks before), no epochs or an accuracy past 1: exit 2,
    argparse's usage and one error line, nothing written."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        cli.main(arguments)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"mcalc {arguments[0]}: error: {message}")
    assert not list(tmp_path.iterdir())


def test_train_on_cupy_without_a_gpu_is_one_clear_line(tmp_path, capsys):
    from mcalc.runtime.backends import gpu_available

    if gpu_available():
        pytest.skip("a GPU is here")
    assert cli.main(["train", "--backend", "cupy", "--json", str(tmp_path / "h.json")]) == 2
    assert capsys.readouterr().err.startswith("mcalc: error: --backend cupy needs a GPU: ")
    assert not list(tmp_path.iterdir())


def test_resume_with_another_optimizer_is_refused(tmp_path, capsys):
    checkpoint = tmp_path / "kfac.ckpt"
    assert cli.main(["train", "--optimizer", "kfac", "--epochs", "1", "--checkpoint", str(checkpoint)]) == 0
    assert cli.main(["train", "--optimizer", "sgd", "--epochs", "2", "--resume", str(checkpoint)]) == 2
    assert "the checkpoint is of optimizer 'kfac', not 'sgd'" in capsys.readouterr().err
    assert cli.main(["train", "--optimizer", "kfac", "--epochs", "2", "--resume", str(checkpoint)]) == 0
    # a run resumed with another loss, or with no epochs left, is refused too (it trained on, or did nothing)
    resumed = ["train", "--optimizer", "kfac", "--resume", str(checkpoint)]
    assert cli.main([*resumed, "--loss", "mse", "--epochs", "3"]) == 2
    assert "the checkpoint is of the CrossEntropy loss, not MSE" in capsys.readouterr().err
    assert cli.main([*resumed, "--epochs", "2"]) == 2
    assert "nothing to train: the run already has 2 of 2 epochs" in capsys.readouterr().err


def test_train_prints_a_header_and_each_epoch_as_it_ends_when_piped():
    """Piped stdout: the header and epoch 1 arrive while the run is still going (flushed per epoch)."""
    process = subprocess.Popen([sys.executable, "-m", "mcalc.cli", "train", "--optimizer", "hf-gn", "--epochs", "6"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    header = process.stdout.readline()
    first = process.stdout.readline()
    running = process.poll() is None
    rest, _ = process.communicate()
    assert header.startswith("training 64-128-sigmoid-10 (ce loss) on digits")
    assert "hf-gn: 6 epochs, batch 64, its gradient and line search on the whole training set" in header
    assert first.startswith("epoch   1  train loss") and "elapsed" in first
    assert running and process.returncode == 0 and rest.count("epoch ") == 5


def test_train_help_names_the_defaults():
    text = run("train", "--help").stdout
    for default in ("(default: digits)", "(default: 64-128-sigmoid-10)", "(default: hbp-newton)", "(default: 10)",
                    "(default: 64)", "(default: pch-abs)", "(default: 0)", "averaged Jacobians"):
        assert default in " ".join(text.split()), default


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_follow_the_umask(tmp_path, umask):
    import os

    from mcalc.files import write_atomic

    old = os.umask(umask)
    try:
        write_atomic(tmp_path / "a.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_an_error_in_a_users_file_names_the_users_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import mcalc as mc\nx = mc.Vector('x', 'n')\ny = (x +\n")
    result = run("derive", str(bad))
    assert result.returncode == 2 and "at line 3: SyntaxError" in result.stderr
    bad.write_text("import mcalc as mc\nx = mc.Vector('x', 'n')\n\nm = mc.Module('M', output=x, inputs=5, params=[])\n")
    result = run("derive", str(bad))  # raised inside mcalc (line 43 of module.py): the user's line is named
    assert result.returncode == 2 and "at line 4: TypeError" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_make_demo_installs_mcalc_without_the_test_extra():
    """The demo's environment has no PyTorch: `make demo` depends on the base install, `make test` adds the test
    and mpi extras."""
    makefile = (ROOT / "Makefile").read_text()
    base = makefile.split("$(VENV)/base:")[1].split("\n\n")[0]
    assert "demo: $(VENV)/base" in makefile and "-e ." in base and "[test]" not in base
    assert "test: $(VENV)/installed" in makefile and '-e ".[test,mpi]"' in makefile.split("$(VENV)/installed:")[1]


def test_training_the_library_runs_without_the_compiler():
    """`mcalc train` on the built-in library imports neither SymPy nor Jinja2: the runtime imports the
    committed generated code, checked against its manifest, and nothing of the compiler."""
    probe = ("import sys; from mcalc.cli import main; code = main(['train', '--epochs', '1', '--data', 'synthetic']); "
             "print(sorted(m for m in ('sympy', 'jinja2', 'mcalc.codegen', 'mcalc.calculus') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "[]"


def test_a_network_is_handed_its_generated_code(tmp_path):
    """Code generated elsewhere (here into a folder of its own) and loaded by the store runs the network."""
    import types

    from mcalc import layers as L
    from mcalc.codegen.generate import generate
    from mcalc.codegen.store import load_code
    from mcalc.train.network import Network

    generate([L.Linear], ["numpy"], tmp_path)
    code = load_code(L.Linear, "numpy", tmp_path)
    calls = []
    handed = types.SimpleNamespace(**vars(code))  # the same functions, its forward pass counted
    handed.forward = lambda P, S, cache=None: calls.append(1) or code.forward(P, S, cache)
    net = Network("4-3-tanh-2", code={"Linear": handed})
    X, Y = np.ones((4, 5)), np.eye(2)[:, [0, 1, 0, 1, 0]]
    assert net.backward(X, Y)[0] == Network("4-3-tanh-2").backward(X, Y)[0]
    assert len(calls) == 2  # both linear layers ran the code handed over


def test_train_with_a_users_modules_from_the_command_line(tmp_path, monkeypatch):
    """`--modules FILE.py` and the modules by name in `--model`, their code generated on first use."""
    monkeypatch.setenv("MCALC_CACHE", str(tmp_path))
    result = run("train", "--modules", EXAMPLES, "--model", "64-RMSNorm-32-relu-Swish-10", "--epochs", "1",
                     "--optimizer", "hbp-newton", "--json", str(tmp_path / "run.json"))
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "run.json").read_text())["history"][0]["test_accuracy"] > 0.5
    for model, message in [("64-LayerNorm-10", "unknown token 'LayerNorm'.*modules: GatedLinear"),
                           ("64-LowRank(m=8)-10", "dimension 'r' is not fixed by its input")]:
        result = run("train", "--modules", EXAMPLES, "--model", model, "--epochs", "1")
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert re.search(message, result.stderr), result.stderr


def test_an_output_that_cannot_be_a_file_is_refused_before_training(tmp_path):
    """--json at a folder failed after the whole run with an IsADirectoryError traceback: refused at once, and
    so is a path through a file; a write that fails later is an mcalc error too (files.write_atomic)."""
    from mcalc.errors import McalcError
    from mcalc.files import write_atomic

    (tmp_path / "a_file").write_text("")
    for option, path in [("--json", tmp_path), ("--plot", tmp_path / "a_file" / "curves.png")]:
        result = run("train", "--model", "64-10", "--epochs", "1", option, str(path))
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert "epoch" not in result.stdout and option in result.stderr
    with pytest.raises(McalcError, match="cannot write"):
        write_atomic(tmp_path / "a_file" / "out.json", "{}")


def test_a_users_module_named_like_a_built_in_one_is_refused(tmp_path):
    """A user's module called Linear would be run by every width of the spec (the network's own Linear layers),
    and the loss then met the wrong width (a NumPy broadcasting traceback): refused, naming the clash."""
    clash = tmp_path / "clash.py"
    clash.write_text('import mcalc as mc\nx = mc.Vector("x", "n")\n'
                     'Linear = mc.Module("Linear", output=mc.tanh(x), inputs=[x])\n')
    result = run("train", "--modules", str(clash), "--model", "64-Linear-10", "--epochs", "1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "module 'Linear' has the name of a built-in module" in result.stderr, result.stderr


def test_the_cli_fixes_glibcs_malloc_thresholds():
    """runtime/allocator.py: on glibc the thresholds are set (mallopt returns 1); elsewhere nothing is."""
    import platform

    from mcalc.runtime.allocator import keep_freed_memory

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc: mcalc leaves the allocator alone")
    keep_freed_memory.cache_clear()
    assert keep_freed_memory() is True
