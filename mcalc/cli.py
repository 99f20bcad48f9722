"""The ``mcalc`` command: derive, verify and demo.

Bad input (a ``McalcError``) prints one line ``mcalc: error: …`` and exits 2;
``verify`` exits 1 when a rule disagrees with its oracle.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from . import __version__
from .errors import McalcError
from .files import check_output
from .modes import Approximation, Curvature
from .printing import FORMATS

if TYPE_CHECKING:  # the compiler is imported by the commands that use it: `mcalc train` runs without SymPy
    from .module import Module
    from .train.distributed import DataParallel

EXIT_MISMATCH = 1
EXIT_BAD_INPUT = 2


def _modules(file: str | None, name: str | None) -> list[Module]:
    if file is None:
        from .layers import LIBRARY

        modules = list(LIBRARY)
        if name is not None:
            modules = [m for m in modules if m.name == name]
            if not modules:
                raise McalcError(f"the built-in library has no module '{name}'")
        return modules
    from .user_modules import load_modules

    return load_modules(file, name)


def _derive(args: argparse.Namespace) -> int:
    from .calculus.derivation import Derivation
    from .printing.report import render

    modules = _modules(args.file, args.module)
    rendered = [render(Derivation(m), args.format) for m in modules]
    if args.format == "json":
        print("[" + ",\n".join(rendered) + "]")
    else:
        print("\n\n".join(rendered))
    return 0


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _compile_only(modules: list[Module]) -> int:
    from .calculus.derivation import Derivation
    from .codegen.compile import compile_source
    from .codegen.cuda import kernel_sources
    from .codegen.plan import plan_module

    results = [compile_source(m.name, kernel_sources(plan_module(Derivation(m)))) for m in modules]
    rows = [[r.module, str(r.kernels), r.compiler, f"{r.seconds:.2f} s", "ok" if r.ok else "FAILED"] for r in results]
    print(_table(rows, ["module", "kernels", "compiler", "time", "result"]))
    for r in results:
        if not r.ok:
            print(f"\n{r.module}:\n{r.log}")
    failed = sum(not r.ok for r in results)
    print(f"\n{len(results) - failed} passed, {failed} failed")
    return EXIT_MISMATCH if failed else 0


def _require_gpu(option: str, advice: str = "") -> None:
    """Refuse ``option`` with a clear error (and ``advice``) where CuPy or a CUDA device is missing."""
    from .runtime.backends import gpu_available, gpu_unavailable_reason

    if not gpu_available():
        raise McalcError(f"{option} needs a GPU: {gpu_unavailable_reason()}{advice}")


def _verify(args: argparse.Namespace) -> int:
    from .numeric.verify import verify_module
    from .numeric.verify_backend import verify_backend

    modules = _modules(args.file, args.module)
    if args.compile_only:
        return _compile_only(modules)
    if args.backend == "cupy":
        _require_gpu("--backend cupy", "; use --backend cupy-emulated to run the CUDA kernels on the CPU, "
                     "or --compile-only to compile them")
    if args.backend == "symbolic":
        checks = [c for m in modules for c in verify_module(m, seed=args.seed)]
    else:
        checks = [c for m in modules for c in verify_backend(m, args.backend, seed=args.seed)]
    failed = [c for c in checks if not c.ok]
    if args.json:
        print(json.dumps({"backend": args.backend, "checks": [c.as_dict() for c in checks],
                          "failed": len(failed)}, indent=2, ensure_ascii=False))
    else:
        result = lambda c: ("ok" if c.ok else "MISMATCH") + (" (zero oracle)" if c.vacuous else "")  # noqa: E731
        rows = [[c.module, c.rule, c.curvature, f"{c.error:.1e}", f"{c.tolerance:.0e}", result(c)] for c in checks]
        print(_table(rows, ["module", "rule", "curvature", "error", "tolerance", "result"]))
        vacuous = sum(c.vacuous for c in checks)
        print(f"\n{len(checks) - len(failed)} passed, {len(failed)} failed"
              + (f"; {vacuous} compared zero with zero at every point tried (nonzero rules that tested nothing: "
                 "widen the sample, or check the module)" if vacuous else ""))
    return EXIT_MISMATCH if failed else 0


def _generate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .codegen.generate import BACKENDS, generate
    from .runtime.generated_code import LIBRARY_DIRECTORY
    from .user_modules import load_modules

    modules = [m for f in args.files for m in load_modules(f)] if args.files else _modules(None, None)
    backends = BACKENDS if args.target == "all" else (args.target,)
    directory = Path(args.out) if args.out else LIBRARY_DIRECTORY
    written = generate(modules, backends, directory, progress=sys.stderr.isatty())
    print(f"wrote {len(written)} files and {directory / 'manifest.json'}")
    return 0


def _check_train_arguments(args: argparse.Namespace) -> None:
    """Numbers a run cannot start with, refused before anything is loaded or written."""
    for option, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size), ("--split", args.split),
                          ("--refresh", args.refresh)):
        if value < 1:
            raise McalcError(f"{option} must be a positive integer, not {value}")
    for option, value in (("--lr", args.lr), ("--damping", args.damping)):
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise McalcError(f"{option} must be positive and finite, not {value}")
    if args.alpha is not None and args.optimizer != "hbp-newton":
        raise McalcError(f"--alpha is hbp-newton's damping of eq. (8); {args.optimizer} has none")
    if args.cg_iterations is not None and args.cg_iterations < 1:
        raise McalcError(f"--cg-iterations must be a positive integer, not {args.cg_iterations}")
    if args.backend == "cupy":
        _require_gpu("--backend cupy")
    for option in ("json", "plot", "checkpoint"):
        if getattr(args, option, None):
            check_output(getattr(args, option), f"--{option}")


def _user_modules(file: str, model: str, backend: str) -> tuple[dict, dict]:
    """The generated code of the modules of ``file`` that ``model`` names (generated on first use, cached),
    and their declarations."""
    from .codegen.store import load_code
    from .layers import LIBRARY
    from .train.model_spec import UserModule, parse_spec
    from .user_modules import load_modules

    modules = {m.name: m for m in load_modules(file)}
    named = sorted({t.name for t in parse_spec(model, modules=modules) if isinstance(t, UserModule)})
    built_in = sorted(m.name for m in LIBRARY)
    if clashes := [name for name in named if name in built_in]:  # a width's Linear layer would run it, say
        raise McalcError(f"{file}: module '{clashes[0]}' has the name of a built-in module, which the network's "
                         f"own layers run ({', '.join(built_in)}); rename it")
    return {name: load_code(modules[name], backend) for name in named}, {name: modules[name] for name in named}


def _train(args: argparse.Namespace) -> int:
    from .train.distributed import DataParallel, communicator

    parallel = DataParallel(communicator(args.backend))
    if parallel.comm.size == 1:
        return _train_on(args, parallel)
    try:  # a rank that fails ends them all, rather than leaving the others waiting in a reduction
        return _train_on(args, parallel)
    except BaseException as exc:
        message = str(exc) if isinstance(exc, McalcError) else f"{type(exc).__name__}: {exc}"
        print(f"mcalc: error on rank {parallel.comm.rank} of {parallel.comm.size}: {message}", file=sys.stderr,
              flush=True)
        time.sleep(0.5)  # the launcher forwards the message before the abort tears the ranks down
        parallel.comm.abort(EXIT_BAD_INPUT)
        raise


def _train_on(args: argparse.Namespace, parallel: DataParallel) -> int:
    from .train.checkpoint import load_checkpoint
    from .train.data import load_dataset
    from .train.network import Network
    from .train.optimizers import make_optimizer
    from .train.trainer import check_lr_drops, plot, train, write_json

    say = print if parallel.is_root else lambda *a, **k: None  # rank 0 speaks and writes for the run
    _check_train_arguments(args)
    code, declarations = _user_modules(args.modules, args.model, args.backend) if args.modules else ({}, {})
    net = Network(args.model, loss=args.loss, backend=args.backend, seed=args.seed, code=code, linked=args.linked,
                  declarations=declarations)
    data = load_dataset(args.data, seed=args.seed, folder=args.data_dir)
    if net.widths[0] != data.features or net.widths[-1] != data.classes:
        raise McalcError(f"model '{args.model}' maps {net.widths[0]} → {net.widths[-1]}, but the data have "
                         f"{data.features} features and {data.classes} classes")
    options = {"lr": args.lr}
    if args.optimizer == "hbp-newton":
        options.update(curvature=args.curvature, approximation=args.approximation, split=args.split,
                       solver=args.solver, refresh=args.refresh)
        if args.alpha is not None:
            options["alpha"] = args.alpha
    if args.optimizer == "kfac":
        options.update(fisher=args.fisher, kfac_approx=args.kfac_approx, seed=args.seed, damping=args.damping)
    if args.optimizer in ("hf-newton", "hf-gn"):
        options.update(damping=args.damping, cg_iterations=args.cg_iterations, measured_on=args.measure_on)
    optimizer = make_optimizer(args.optimizer, **options)
    check_lr_drops(optimizer, args.lr_drop, args.epochs)
    resume = load_checkpoint(args.resume) if args.resume else None
    if resume is not None:
        if resume.get("spec") != args.model:
            raise McalcError(f"{args.resume}: the checkpoint is of model '{resume.get('spec')}', not '{args.model}'")
        if resume.get("loss", net.loss_module) != net.loss_module:  # checkpoints before the loss was saved: unchecked
            raise McalcError(f"{args.resume}: the checkpoint is of the {resume['loss']} loss, not {net.loss_module}")
        saved = resume.get("name") or type(resume["optimizer"]).__name__
        if saved not in (args.optimizer, type(optimizer).__name__):
            raise McalcError(f"{args.resume}: the checkpoint is of optimizer '{saved}', not '{args.optimizer}'")
    ranks = f", {parallel.comm.size} ranks" if parallel.comm.size > 1 else ""
    # Martens' Hessian-free passes over the training set at every step: said, since it sets the epoch's cost
    whole = ", its gradient and line search on the whole training set" if getattr(
        optimizer, "measured_on", None) == "training-set" else ""
    say(f"training {args.model} ({args.loss} loss) on {data.name} ({len(data.y_train)} training, "
        f"{len(data.y_test)} test samples) with {args.optimizer}: {args.epochs} epoch{'s' * (args.epochs != 1)}, "
        f"batch {args.batch_size}{whole}, seed {args.seed}, {args.backend}{ranks}", flush=True)

    def report(row: dict) -> None:  # each epoch as it ends, flushed also when the output goes to a file
        print(f"epoch {row['epoch']:3d}  train loss {row['train_loss']:.4f}  test loss {row['test_loss']:.4f}  "
              f"test accuracy {row['test_accuracy']:.4f}  elapsed {row['wall_s']:.1f} s", flush=True)

    result = train(net, data, optimizer, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                   progress=True, name=args.optimizer, checkpoint=args.checkpoint or args.resume,
                   resume=resume, graphs=args.graphs, on_epoch=report, parallel=parallel, lr_drops=args.lr_drop)
    if not parallel.is_root:
        return 0
    if result["final"]["rejected_steps"]:
        print(f"{result['final']['rejected_steps']} steps rejected (loss not finite, or more than doubled)")
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        plot([result], args.plot, title=f"{args.model} on {data.name}, {args.optimizer}, seed {args.seed}")
        print(f"wrote {args.plot}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .calculus.derivation import Derivation
    from .layers import LIBRARY, SigmoidLinear
    from .numeric.verify import verify_module
    from .printing.report import render

    for option in ("json", "plot"):
        check_output(getattr(args, option), f"--{option}")
    print(f"mcalc {__version__} — derive and verify the built-in library\n")
    rows, failures = [], 0
    for m in LIBRARY:
        start = time.perf_counter()
        d = Derivation(m)
        d.rules()
        derived = time.perf_counter() - start
        start = time.perf_counter()
        checks = verify_module(m, derivation=d)
        verified = time.perf_counter() - start
        bad = sum(not c.ok for c in checks)
        failures += bad
        worst = max(c.error / c.tolerance for c in checks)
        rows.append([m.name, str(len(checks)), f"{derived * 1e3:.0f} ms", f"{verified * 1e3:.0f} ms",
                     f"{worst:.1e}", "ok" if not bad else f"{bad} MISMATCH"])
    print(_table(rows, ["module", "checks", "derive", "verify", "worst error/tol", "result"]))
    print("\nThe composite σ → Linear, derived analytically, is (S.11a–c) of the HBP paper:\n")
    print(render(Derivation(SigmoidLinear), "text"))

    from .numeric.verify_backend import verify_backend

    print("\nGenerated NumPy code (generated/), batch rules (6) and (7), against finite differences:\n")
    rows = []
    for m in LIBRARY:
        start = time.perf_counter()
        checks = verify_backend(m, "numpy")
        bad = sum(not c.ok for c in checks)
        failures += bad
        rows.append([m.name, str(len(checks)), f"{(time.perf_counter() - start) * 1e3:.0f} ms",
                     f"{max(c.error / c.tolerance for c in checks):.1e}", "ok" if not bad else f"{bad} MISMATCH"])
    print(_table(rows, ["module", "checks", "time", "worst error/tol", "result"]))
    _demo_training(args)
    return EXIT_MISMATCH if failures else 0


DEMO_MODEL = "64-128-sigmoid-10"
DEMO_RUNS = (  # optimiser, its options, batch size: the same network for each; second-order ones at their defaults
    ("sgd", {"lr": 0.1, "momentum": 0.9}, 64),
    ("adam", {"lr": 3e-3}, 64),
    ("hbp-newton", {}, 64),  # the paper's: α = 0.02, γ = 0.1, CG with ε = 0.1, n = 50, PCH-abs
    ("kfac", {}, 64),  # kfac-jax's adaptive learning rate, momentum and damping
    ("kbfgs", {}, 64),  # the authors' λ = 0.3 and momentum 0.9; mcalc's γ = 1 (README)
    ("hf-gn", {}, 64),  # Martens': λ₀ = 45, n_CG ≤ 250, preconditioned, CG-backtracking, the training set's gradient
    ("hf-newton", {}, 64),
)


def _demo_training(args: argparse.Namespace) -> None:
    from .train.data import digits
    from .train.network import Network
    from .train.optimizers import make_optimizer
    from .train.trainer import plot, train, write_json

    target = args.target_accuracy
    print(f"\nTraining {DEMO_MODEL} on the bundled digits ({args.epochs} epochs each, seed {args.seed}):\n")
    data, results, rows = digits(args.seed), [], []
    for name, options, batch in DEMO_RUNS:
        net = Network(DEMO_MODEL, seed=args.seed)
        result = train(net, data, make_optimizer(name, **options), epochs=args.epochs, batch_size=batch,
                       seed=args.seed, progress=sys.stderr.isatty(), name=name)
        results.append(result)
        reached = next((r for r in result["history"] if r["test_accuracy"] >= target), None)
        final = result["final"]
        rows.append([name, f"{final['test_loss']:.3f}", f"{final['test_accuracy']:.3f}",
                     str(reached["epoch"]) if reached else "-", f"{reached['wall_s']:.1f} s" if reached else "-"])
    print(_table(rows, ["optimizer", "test loss", "test accuracy", f"epochs to {target:.0%}",
                        f"seconds to {target:.0%}"]))
    plot(results, args.plot, title=f"{DEMO_MODEL} on digits, seed {args.seed}")
    write_json({"runs": results}, args.json)
    print(f"\ncurves: {args.plot}   history: {args.json}")


class _WithDefaults(argparse.HelpFormatter):
    """Help that names each option's default, where it has one (None and False say nothing)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        silent = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if not silent and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def _seed(text: str) -> int:
    """A seed, as NumPy's generators take it: a whole number ≥ 0."""
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"a seed is a whole number ≥ 0, not {text!r}")
    return int(text)


def _count(text: str) -> int:
    """A positive whole number (epochs)."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, not {text!r}")
    return int(text)


def _accuracy(text: str) -> float:
    """A test accuracy to reach: a fraction in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"an accuracy is a fraction in (0, 1], not {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mcalc", description="Matrix calculus for curvature: derive, "
                                     "verify and compile Hessian backpropagation rules.")
    parser.add_argument("--version", action="version", version=f"mcalc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("derive", help="print every derived rule of the modules in FILE.py")
    p.add_argument("file", nargs="?", help="a Python file declaring mc.Module objects (default: built-in library)")
    p.add_argument("--module", help="only the module of this name")
    p.add_argument("--format", choices=FORMATS, default="text")
    p.set_defaults(run=_derive)

    p = sub.add_parser("verify", help="check every rule against finite differences")
    p.add_argument("file", nargs="?", help="a Python file declaring mc.Module objects (default: built-in library)")
    p.add_argument("--module", help="only the module of this name")
    p.add_argument("--backend", choices=["symbolic", "numpy", "cupy", "cupy-emulated"], default="symbolic",
                   help="what is checked: the symbolic rules (dense), or the generated code of a backend "
                        "(cupy-emulated: the CuPy code with its CUDA kernels run on the CPU, no GPU needed)")
    p.add_argument("--compile-only", action="store_true", help="only compile every CUDA kernel (nvcc or NVRTC)")
    p.add_argument("--seed", type=_seed, default=0, help="random point to check at")
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    p.set_defaults(run=_verify)

    p = sub.add_parser("generate", help="render modules to NumPy / CuPy code with a manifest")
    p.add_argument("files", nargs="*", help="Python files declaring mc.Module objects (default: built-in library)")
    p.add_argument("--target", choices=["numpy", "cupy", "all"], default="all")
    p.add_argument("--out", help="output folder (default: the project's generated/)")
    p.set_defaults(run=_generate)

    p = sub.add_parser("train", help="train a network on the generated kernels", formatter_class=_WithDefaults)
    p.add_argument("--data", default="digits",
                   help="digits (bundled), mnist1d (generated offline), synthetic (5 classes, correlated features), "
                        "mnist, cifar10 (with --data-dir) or FILE.npz")
    p.add_argument("--data-dir", help="folder of the MNIST IDX files or CIFAR-10 python batches")
    p.add_argument("--model", default="64-128-sigmoid-10",
                   help="widths, activations and modules of --modules, e.g. 64-128-sigmoid-10 or "
                        "64-RMSNorm-GatedLinear(m=32)-10 (a module's input takes the current width; bind its "
                        "other dimensions in parentheses); a convolutional network starts with channels x length "
                        "(or channels x height x width) and uses conv(filters, kernel[, stride=, pad=, dil=]), "
                        "avgpool(k), maxpool(k), attention(features) and flatten, e.g. "
                        "1x40-conv(32,5,pad=2)-relu-maxpool(2)-flatten-10 or 1x8x8-conv(16,3,pad=1)-relu-flatten-10")
    p.add_argument("--modules", metavar="FILE.py", help="a Python file declaring mc.Module objects the model may use "
                   "by name; their code is generated on first use and cached")
    p.add_argument("--loss", choices=["ce", "mse"], default="ce",
                   help="cross-entropy, or the per-sample squared error (z − y)ᵀ(z − y)")
    p.add_argument("--optimizer", choices=["sgd", "adam", "hbp-newton", "kfac", "kbfgs", "hf-newton", "hf-gn"],
                   default="hbp-newton", help="each at its reference's defaults (README)")
    p.add_argument("--fisher", choices=["mc", "exact"], default="mc", help="kfac: sampled or exact Fisher")
    p.add_argument("--kfac-approx", choices=["expand", "reduce"], default="expand",
                   help="kfac: a convolution's factors, K-FAC-expand (KFC's) or K-FAC-reduce (Eschenhagen et al. 2023)")
    p.add_argument("--damping", type=float,
                   help="initial Levenberg–Marquardt λ of kfac (default 1) and hf-newton, hf-gn (default 45)")
    p.add_argument("--cg-iterations", type=int, help="hf-newton, hf-gn: at most this many CG steps (default 250)")
    p.add_argument("--measure-on", choices=["training-set", "batch"], default="training-set",
                   help="hf-newton, hf-gn: where the gradient, its squares, CG-backtracking and the line search are "
                        "measured: the whole training set (Martens') or the mini-batch; the curvature products and "
                        "the reduction ratio are the mini-batch's either way")
    p.add_argument("--epochs", type=int, default=10, help="passes over the training data")
    p.add_argument("--batch-size", type=int, default=64, help="samples per step")
    p.add_argument("--lr", type=float, help="learning rate (default: the optimiser's; kfac: fixed instead of "
                   "the quadratic model's)")
    p.add_argument("--curvature", choices=[c.value for c in Curvature], default=Curvature.PCH_ABS.value,
                   help="hbp-newton's curvature blocks")
    p.add_argument("--approximation", choices=[a.value for a in Approximation],
                   default=Approximation.AUTO.value,
                   help="hbp-newton's batch rule: 6 averages the sandwiched Hessians E[Jᵀ 𝓗 J] (exact for the batch), "
                        "7 sandwiches with the averaged Jacobians E[J]ᵀ 𝓗 E[J] (cheaper), 6-kfac is 6 with each "
                        "mean of Kronecker products factored, E[A ⊗ B] ≈ E[A] ⊗ E[B] (K-FAC's; for a user's inner "
                        "parameters), and a weight shared over positions by K-FAC-expand; 6-kfac-reduce the same "
                        "with K-FAC-reduce; auto (the default) is 6 where it has a closed batch form (every MLP) "
                        "and 6-kfac where 6 would be formed sample by sample (a convolution's weight)")
    p.add_argument("--split", type=int, default=1, help="row-wise sub-blocks per parameter (Section 4)")
    p.add_argument("--solver", choices=["auto", "cg", "eigen"], default="cg",
                   help="hbp-newton: CG per step (the paper's), averaged eigenbases renewed every --refresh "
                        "steps, or eigenbases where they are cheaper and as safe as CG (auto)")
    p.add_argument("--refresh", type=int, default=5, help="hbp-newton: steps between eigenbasis renewals")
    p.add_argument("--alpha", type=float, help="hbp-newton: α of eq. (8), where its adaptation starts and its "
                   "floor (default: the paper's 0.02)")
    p.add_argument("--lr-drop", type=int, nargs="+", default=[], metavar="EPOCH",
                   help="divide the learning rate by ten at the start of each of these epochs (step decay)")
    p.add_argument("--backend", choices=["numpy", "cupy"], default="numpy", help="where the arrays live")
    p.add_argument("--linked", action="store_true",
                   help="run each backward pass as one program generated for the whole network, fused across "
                        "its modules (a chain of vector modules, a user's too; convolutions and attention run "
                        "module by module)")
    p.add_argument("--graphs", action="store_true",
                   help="cupy: replay each backward pass as a CUDA graph (one launch instead of one per kernel)")
    p.add_argument("--seed", type=_seed, default=0, help="initial weights, data order, split of digits")
    p.add_argument("--json", help="write the history here")
    p.add_argument("--plot", help="write loss and accuracy curves here (PNG)")
    p.add_argument("--checkpoint", help="save the run here after every epoch")
    p.add_argument("--resume", help="continue the run saved in this checkpoint (and keep saving to it)")
    p.set_defaults(run=_train)

    p = sub.add_parser("demo", help="the main job on embedded data")
    p.add_argument("--epochs", type=_count, default=12)
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--target-accuracy", type=_accuracy, default=0.95)
    p.add_argument("--plot", default="mcalc-demo.png", help="where the training curves go")
    p.add_argument("--json", default="mcalc-demo.json", help="where the histories go")
    p.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .runtime.allocator import keep_freed_memory

    args = build_parser().parse_args(argv)
    keep_freed_memory()  # generated code's temporaries reuse freed memory (runtime/allocator.py)
    try:
        return args.run(args)
    except McalcError as exc:
        print(f"mcalc: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
