"""Generated code: committed and up to date, loaded only when valid, CUDA that compiles, verified backends."""
import json
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import sympy as sp
from conftest import ROOT
from hypothesis import HealthCheck, Phase, example, given, settings
from strategies import SINE, modules
from test_codegen_numpy import check_generated

import mcalc as mc
from mcalc import layers as L
from mcalc.codegen.compile import compile_source
from mcalc.codegen.cuda import CUPY, cuda_source, kernel_sources
from mcalc.codegen.generate import BACKENDS, generate
from mcalc.codegen.plan import HBPKey, ProgramBuilder, plan_module, sanitise
from mcalc.codegen.render import program_context
from mcalc.codegen.store import check_entry, load_code
from mcalc.expr import Diag, MatMul, ScalarMul, Transpose
from mcalc.modes import Approximation, Curvature
from mcalc.numeric.verify_backend import verify_backend
from mcalc.runtime import emulator
from mcalc.runtime.generated_code import LIBRARY_DIRECTORY
from mcalc.simplification import simplify
from mcalc.user_modules import load_modules

EXAMPLES = load_modules(ROOT / "examples" / "custom_layers.py")


def test_generated_folder_is_up_to_date(tmp_path):
    generate(L.LIBRARY, BACKENDS, tmp_path)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    committed = sorted(p.relative_to(LIBRARY_DIRECTORY) for p in LIBRARY_DIRECTORY.rglob("*") if p.is_file())
    assert fresh == committed, "run `mcalc generate` and commit generated/"
    for relative in fresh:
        assert (tmp_path / relative).read_bytes() == (LIBRARY_DIRECTORY / relative).read_bytes(), (
            f"generated/{relative} is stale: run `mcalc generate` and commit generated/")


def test_a_wheel_installs_the_templates_and_generated_code(tmp_path):
    """A wheel install finds templates/ and generated/ under PREFIX/share/mcalc and loads the library."""
    setuptools = pytest.importorskip("setuptools", reason="building a wheel needs setuptools in the environment")
    if tuple(int(x) for x in setuptools.__version__.split(".")[:2]) < (70, 1):  # bdist_wheel built in since 70.1
        pytest.importorskip("wheel", reason="setuptools < 70.1 builds wheels only with the wheel package")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "wheel"), str(ROOT)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    shutil.rmtree(ROOT / "build", ignore_errors=True)
    wheel = next((tmp_path / "wheel").glob("mcalc-*.whl"))
    # unpacked as an installer lays a wheel out (its .data/data/ goes to the prefix): pip install --prefix
    # would first uninstall the mcalc of the environment running the tests
    prefix = tmp_path / "prefix"
    site = prefix / "lib" / "python3" / "site-packages"
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            head, _, rest = name.partition("/")
            target = prefix / rest.partition("/")[2] if head.endswith(".data") else site / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.read(name))
    script = ("from mcalc import layers as L; from mcalc.codegen.store import load_code; "
              "import mcalc.codegen.render as r; print(r.TEMPLATES); print(load_code(L.Linear, 'numpy').__file__)")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    share = prefix / "share" / "mcalc"
    assert run.stdout.split() == [str(share / "templates"), str(share / "generated" / "numpy" / "Linear.py")]
    files = lambda top: sorted(p.relative_to(top) for p in top.rglob("*")  # noqa: E731
                               if p.is_file() and "__pycache__" not in p.parts)
    for folder in ("templates", "generated"):
        assert files(share / folder) == files(ROOT / folder)


def test_loader_refuses_corrupted_stale_and_missing_entries(tmp_path):
    generate([L.Linear], ["numpy"], tmp_path)
    check_entry(tmp_path, L.Linear, "numpy")
    path = tmp_path / "numpy" / "Linear.py"
    path.write_text(path.read_text() + "\n# edited\n")
    with pytest.raises(mc.McalcError, match=r"corrupted.*mcalc generate"):
        check_entry(tmp_path, L.Linear, "numpy")
    generate([L.Linear], ["numpy"], tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["entries"]["numpy/Linear.py"]["source_hash"] = "0" * 64
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(mc.McalcError, match="stale \\(module declaration"):
        check_entry(tmp_path, L.Linear, "numpy")
    with pytest.raises(mc.McalcError, match="no generated code for module 'MatMul'"):
        check_entry(tmp_path, L.MatMul, "numpy")
    (tmp_path / "manifest.json").write_text("{ not json")
    with pytest.raises(mc.McalcError, match="corrupted manifest"):
        check_entry(tmp_path, L.Linear, "numpy")


def test_user_modules_are_cached_by_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("MCALC_CACHE", str(tmp_path))
    (module,) = [m for m in EXAMPLES if m.name == "LowRank"]
    code = load_code(module, "numpy")
    assert code.MODULE == "LowRank" and list(tmp_path.rglob("LowRank.py"))
    # another build of mcalc (say, a changed printer with the same version number) gets a fresh entry
    monkeypatch.setattr("mcalc.codegen.store.compiler_hash", lambda: "0" * 64)
    load_code(module, "numpy")
    assert len(list(tmp_path.rglob("LowRank.py"))) == 2


def test_names_are_sanitised():
    assert sanitise("my layer-2") == "my_layer_2" and sanitise("class") == "_class" and sanitise("2x") == "_2x"


@pytest.mark.skipif(not shutil.which("nvcc"), reason="nvcc is not installed: CUDA kernels cannot be compiled here")
@pytest.mark.parametrize("module", list(L.LIBRARY) + EXAMPLES, ids=lambda m: m.name)
def test_every_cuda_kernel_compiles(module):
    result = compile_source(module.name, kernel_sources(plan_module(mc.derive(module))))
    assert result.ok, result.log
    assert result.kernels > 0 or module.name in {"Bias"}


@pytest.mark.parametrize("module", [L.Linear, L.SigmoidLinear, L.CrossEntropy, L.Softmax], ids=lambda m: m.name)
def test_numpy_backend_against_finite_differences(module):
    checks = verify_backend(module, "numpy")
    assert checks and all(c.ok for c in checks), [c for c in checks if not c.ok]


@settings(max_examples=10, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
          phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(module=modules())
@example(module=mc.Module("Found", SINE(mc.tanh(mc.Scalar("s")) * mc.Vector("u", "m")), inputs=[],
                          params=[mc.Scalar("s"), mc.Vector("u", "m")]))
@example(module=mc.Module("Found", (mc.sum(mc.Matrix("W", "m", "n")) * mc.sum(mc.Matrix("W", "m", "n")))
                          * mc.tanh(mc.Vector("x", "k") * mc.Vector("x", "k")), inputs=[],
                          params=[mc.Matrix("W", "m", "n"), mc.Vector("x", "k")]))
@example(module=mc.Module("Found", mc.softmax(mc.sum(mc.Vector("u", "m"))
                                              * (mc.Vector("x", "n") * mc.Vector("x", "n"))),
                          inputs=[], params=[mc.Vector("u", "m"), mc.Vector("x", "n")]))
@example(module=mc.Module("Found", ((mc.Scalar("s") * mc.Vector("x", "m").T @ mc.Matrix("V", "m", "n")).T
                                    * (mc.Vector("u", "n") * mc.Vector("u", "n")))
                          * (mc.tanh(mc.Vector("u", "n")) * mc.Vector("u", "n")), inputs=[],
                          params=[mc.Vector("u", "n")],
                          constants=[mc.Matrix("V", "m", "n"), mc.Scalar("s"), mc.Vector("x", "m")]))
def test_numpy_backend_on_random_modules(module, tmp_path_factory):
    """The examples are ones Hypothesis found. Under approximation (7), diag(δZ-sum ⊙ φ″) was added in
    place onto a product that a later step read again, so 𝓗̄u counted that diagonal twice. And a product
    that broadcasts both ways, 1 (tᵀ 𝓗z t) 1ᵀ, was split once, (1 tᵀ 𝓗z t) 1ᵀ: its inner product was
    named only split again, so the printer found no name for it (KeyError). The third's scale, placed on
    such a product (.simplification.scale_placement), was split on one side only (KeyError again); in the
    fourth, a broadcast v 1ᵀ was read as the transposed view of 1 vᵀ, so v was never a step of its own."""
    directory = _generate_random(module, "numpy", tmp_path_factory)
    if directory is not None:
        check_generated(module, load_code(module, "numpy", directory))


@pytest.mark.skipif(bool(emulator.unavailable_reason()), reason=emulator.unavailable_reason())
@settings(max_examples=4, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
          phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(module=modules())
@example(module=mc.Module("Found", mc.softplus(sp.Rational(1, 2) * mc.Matrix("V", "n", "m") @ mc.softplus(
    mc.Vector("u", "m"))), inputs=[], params=[mc.Matrix("V", "n", "m"), mc.Vector("u", "m")]))
@example(module=mc.Module("SoftmaxOfGroup", mc.log_softmax(2 * mc.tanh(mc.Vector("x", "n")) + mc.Vector("b", "n")),
                          inputs=[mc.Vector("x", "n")], params=[mc.Vector("b", "n")]))
def test_cuda_kernels_on_random_modules(module, tmp_path_factory):
    """The CuPy backend's fused kernels of Hypothesis-made modules, run by the CPU emulator, against the
    symbolic batch rules (the same checks as the NumPy backend's). The first example is one it found:
    softplus′ was used both inside diag(·) of a product and by a kernel, which fused it away and left the
    product reading a name never assigned (uses through diag(·) were not counted). The second has a
    (log-)softmax kernel compute its operand, a fused group with a broadcast bias, in its column loops."""
    directory = _generate_random(module, "cupy", tmp_path_factory)
    if directory is not None:
        with emulator.installed():
            check_generated(module, load_code(module, "cupy", directory))


@pytest.mark.skipif(bool(emulator.unavailable_reason()), reason=emulator.unavailable_reason())
def test_softmax_kernels_stay_finite_for_large_logits():
    """The column kernels shift by each column's max: logits of ±100 in float32 (exp overflows past 88)
    give the cross-entropy's loss, gradient and Hessian of the stable NumPy forms, in one launch each."""
    logits = np.array([[100.0, -100.0, 0.0], [-100.0, 100.0, 1.0], [0.0, 0.0, 2.0]], dtype=np.float32)
    labels = np.eye(3, dtype=np.float32)
    S = {"x": logits, "y": labels, "dz": np.full((1, 3), 1 / 3, dtype=np.float32)}
    reference = load_code(L.CrossEntropy, "numpy")
    expected = [reference.forward({}, S)["Z"], reference.gradients({}, S)["x"],
                reference.LOSS_HESSIAN["6"]({}, S)["x"].dense]
    with emulator.installed() as cp:
        code = load_code(L.CrossEntropy, "cupy")
        D = {k: cp.asarray(v) for k, v in S.items()}
        emulator.COUNTS.clear()
        loss = code.forward({}, D)["Z"]
        assert emulator.COUNTS["kernel"] == 3 and emulator.COUNTS["elementwise"] == 0  # log-softmax, y ⊙ ·, −·
        found = [loss, code.gradients({}, D)["x"], code.LOSS_HESSIAN["6"]({}, D)["x"].dense]
    for ours, theirs in zip(found, expected):
        assert np.isfinite(ours.get()).all()
        np.testing.assert_allclose(ours.get(), theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(bool(emulator.unavailable_reason()), reason=emulator.unavailable_reason())
def test_row_and_column_scalings_fuse_into_one_kernel():
    """diag(u) M diag(v) is elementwise, u[r] M[r, c] v[c]: one kernel with the scalar, u read by row and
    v by column (a rectangular M and two vectors tell a swapped index from the right one)."""
    u, M, v = mc.Vector("u", "m"), mc.Matrix("M", "m", "n"), mc.Vector("v", "n")
    builder = ProgramBuilder()
    target = builder.ref(ScalarMul(sp.Integer(3), MatMul(Diag(u), M, Diag(v))))
    builder.program.results["out"] = target
    context = program_context(builder.program, CUPY)
    assert len(context["kernels"]) == 1 and len(context["lines"]) == 1
    rng = np.random.default_rng(0)
    values = {"u": rng.normal(size=(3, 1)), "M": rng.normal(size=(3, 5)), "v": rng.normal(size=(5, 1))}
    with emulator.installed() as cp:
        from mcalc.runtime.cuda import KernelSet

        namespace = {"_launch": KernelSet(cuda_source(context["kernels"])).launch, "dtype": np.dtype(float),
                     "P": {k: cp.asarray(a) for k, a in values.items()}, "m": 3, "n": 5}
        line = context["lines"][0]
        exec(f"{line['targets']} = {line['rhs']}", namespace)
        out = namespace[target].get()
    np.testing.assert_allclose(out, 3 * values["u"] * values["M"] * values["v"].T, rtol=1e-14)


def test_a_transpose_of_a_planned_step_is_read_as_its_view():
    """(A B)ᵀ simplifies to Bᵀ Aᵀ, a product of its own: where A B is a step already, the planner reads
    it as that step's transposed view instead of multiplying again."""
    A, B = mc.Matrix("A", "m", "k"), mc.Matrix("B", "k", "n")
    builder = ProgramBuilder()
    product = builder.ref(MatMul(A, B))
    flipped = builder.ref(simplify(Transpose(MatMul(A, B))))
    assert [type(s.node).__name__ for s in builder.program.steps] == ["MatMul", "Transpose"]
    assert builder.program.steps[1].node.args[0] == MatMul(A, B) and flipped != product


def test_layer_norms_gain_block_is_the_gram_matrix_of_its_normalised_input():
    """LayerNorm's g block is 𝓗z ⊙ E[x̂ x̂ᵀ], derived as ((x − μ) diag(1/σ)²) (x − μ)ᵀ: planned as the Gram
    matrix of x̂ = (x − μ) diag(1/σ), which the forward pass computed (.simplification.fusion.scaled_gram)."""
    layer_norm = next(m for m in load_modules(ROOT / "examples" / "layernorm_gelu.py") if m.name == "LayerNorm")
    plan = plan_module(mc.derive(layer_norm))
    program = plan.hbp[plan.hbp_aliases[HBPKey(Curvature.GGN, Approximation.MEAN_OF_SANDWICHES, False)]]
    forward = {s.node for s in plan.forward.steps}
    grams = [s.node for s in program.steps if isinstance(s.node, MatMul) and len(s.node.args) == 2
             and Transpose(s.node.args[0]) == s.node.args[1]]
    assert len(grams) == 1 and grams[0].args[0] in forward


def _generate_random(module, backend, tmp_path_factory):
    """A folder with the module's generated code; None for a module without a batch form (a per-sample
    inverse, say), which must be refused with an error that says so."""
    try:
        plan_module(mc.derive(module))
    except mc.McalcError as exc:
        assert "no batch form" in str(exc)
        return None
    directory = tmp_path_factory.mktemp("random")
    generate([module], [backend], directory)
    return directory


def test_cli_generate_and_verify(tmp_path):
    example = str(ROOT / "examples" / "custom_layers.py")
    run = lambda *a: subprocess.run([sys.executable, "-m", "mcalc.cli", *a], capture_output=True, text=True)  # noqa: E731
    done = run("generate", example, "--target", "numpy", "--out", str(tmp_path))
    assert done.returncode == 0 and (tmp_path / "manifest.json").exists(), done.stderr
    assert (tmp_path / "numpy" / "GatedLinear.py").exists()
    done = run("verify", "--backend", "numpy", "--module", "Linear")
    assert done.returncode == 0 and done.stdout.strip().endswith("passed, 0 failed"), done.stdout
    if not emulator.unavailable_reason():  # the CUDA kernels of a user's layer, run on the CPU
        done = run("verify", example, "--backend", "cupy-emulated", "--module", "Mish")
        assert done.returncode == 0 and done.stdout.strip().endswith("passed, 0 failed"), done.stdout
