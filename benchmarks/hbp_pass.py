"""One batch HBP pass over the HBP paper's network, mcalc's generated code against BackPACK, side by side.

    python benchmarks/hbp_pass.py [--device cpu|cuda] [--repeats N] [--json OUT]
    python benchmarks/hbp_pass.py --count-launches [--json OUT]

Network 3072-1024-512-256-128-64-32-16-10, sigmoids, cross-entropy with mean
reduction, batch 500, float32. Both sides compute, per layer, the weight and
bias blocks of approximation (6), E[Jᵀ E(H) J], with batch-averaged curvature
passed backwards (BackPACK: ``HBP(curv_type, 'sum', 'average', 'E[J^T E(H) J]')``).
Factor conventions: BackPACK stores the weight block as [𝓗̄z, E[x xᵀ]] for its
row-major vec, mcalc as E[x xᵀ] ⊗ 𝓗̄z for column-stacking vec: the factors are
compared one to one. On CPU mcalc runs its NumPy backend; on CUDA its fused
CuPy kernels, and the same plan with unfused CuPy operations, each both as
called from Python and recorded once as a CUDA graph that is replayed
(``Network.capture_backward``). Contenders run in turn within each repeat; the
medians are reported.

``--count-launches`` needs no GPU, PyTorch or BackPACK: it runs the fused and
the unfused CuPy code of one pass, and the pass linked into one program fused
across the modules (``Network(linked=True)``), on the CPU emulator and counts the
device operations each launches (generated kernels, cuBLAS products, CuPy's own
elementwise and reduction kernels, fills): where a pass is bound by launches,
as it is on a GPU at this size, their ratio is what fusion can gain.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from machine import describe  # noqa: E402  (benchmarks/machine.py, beside this script)
from side_by_side import timed_in_turn  # noqa: E402

import mcalc as mc  # noqa: E402
from mcalc import layers as L  # noqa: E402
from mcalc.codegen.plan import plan_module  # noqa: E402
from mcalc.codegen.render import render_module  # noqa: E402
from mcalc.train.network import Network  # noqa: E402

SIZES = [3072, 1024, 512, 256, 128, 64, 32, 16, 10]
BATCH = 500
MODES = {"exact": "hessian", "ggn": "ggn", "pch-abs": "pch-abs"}


def pass_flops() -> float:
    """The floating-point operations of the products of one pass ((6), as mcalc plans it): forward,
    δW and δX per layer, Wᵀ 𝓗z W but for the first layer, the Gram factors it forms (rows ≤ B), and
    each sigmoid's φ′ φ′ᵀ."""
    flops = sum(2.0 * n * n * BATCH for n in SIZES[1:-1])
    for layer, (n, m) in enumerate(itertools.pairwise(SIZES)):
        flops += 3 * 2.0 * BATCH * n * m + (2.0 * n * n * BATCH if n <= BATCH else 0)
        if layer > 0:  # the data needs no block
            flops += 2.0 * (m * m * n + m * n * n)
    return flops


def gemm_floor(xp, repeats: int) -> float:
    """Seconds of one square float32 cuBLAS GEMM doing the pass's flops: the compute floor of the device."""
    side = round((pass_flops() / 2) ** (1 / 3))
    a = xp.ones((side, side), dtype=xp.float32)
    sync = xp.cuda.Device().synchronize
    return timed_side_by_side({"floor": (lambda: a @ a, sync)}, repeats)["floor"]


def graphed_forward_backward(model, loss_fn, X_t, y_t):
    """PyTorch's forward and backward of ``model`` captured once as a CUDA graph (``torch.cuda.graphs``,
    as its documentation captures a whole network: warm-up on a side stream, gradients set to None so
    that the graph allocates them from its pool); returns the replay."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            loss_fn(model(X_t), y_t).backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    model.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        loss_fn(model(X_t), y_t).backward()
    return graph.replay


def unfused(module: mc.Module) -> types.ModuleType:
    """The same plan printed as plain CuPy operations (one kernel per operation)."""
    # products through mcalc's matmul, as in the fused code, so that this variant can be captured too
    source = render_module(plan_module(mc.derive(module)), "numpy",
                           "import cupy as xp\nfrom mcalc.runtime.cuda_graph import matmul as _matmul",
                           product="_matmul({a}, {b})")
    namespace = types.ModuleType(f"unfused_{module.name}")
    exec(compile(source, f"<unfused {module.name}>", "exec"), namespace.__dict__)
    return namespace


def mcalc_pass(net: Network, X, Y, mode: str) -> list[tuple]:
    """Forward, loss, gradients and every layer's (W, b) HBP blocks by approximation (6)."""
    return layer_blocks(net.backward(X, Y, mode, "6")[2])


def layer_blocks(blocks: dict) -> list[tuple]:
    return [(blocks[f"W{i}"], blocks[f"b{i}"]) for i in range(1, len(SIZES))]


def backpack_pass(model, loss_fn, X, y, mode: str):
    from backpack import backpack
    from backpack.extensions import HBP

    extension = HBP(MODES[mode], "sum", "average", "E[J^T E(H) J]")
    model.zero_grad()
    loss = loss_fn(model(X), y)
    with backpack(extension):
        loss.backward()
    return [(m.weight.hbp, m.bias.hbp) for m in model if hasattr(m, "weight")]


def _difference(ours: tuple, reference: tuple, xp) -> float:
    """Relative difference of the weight blocks' action 𝓗̄z V E[x xᵀ] on a random V, and of the bias blocks.

    A Kronecker product fixes its factors only up to a scale moved between them,
    so the blocks are compared by what they do, not factor by factor.
    """
    host = lambda a: a.get() if hasattr(a, "get") else np.asarray(a)  # noqa: E731
    (G, A), (Hb,) = [[t.detach().cpu().numpy().astype(np.float64) for t in r] for r in reference]
    V = np.random.default_rng(0).normal(size=(G.shape[0], A.shape[0]))
    theirs = G @ V @ A.T  # (G ⊗ A) applied to V's row-major vec
    weight, bias_block = ours
    mine = host(weight.matvec(xp.asarray(V.reshape(-1, order="F"), dtype=xp.float32))).reshape(V.shape, order="F")
    bias = host(bias_block.dense)
    return max(float(np.abs(mine - theirs).max() / np.abs(theirs).max()),
               float(np.abs(bias - Hb).max() / np.abs(Hb).max()))


def timed_side_by_side(contenders: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each ``name: (fn, sync)``, the device synchronised after each run
    (:func:`side_by_side.timed_in_turn`)."""
    return timed_in_turn({name: (lambda fn=fn, sync=sync: (fn(), sync())) for name, (fn, sync) in contenders.items()},
                         repeats)


def spec() -> str:
    return "-".join([str(SIZES[0]), *[f"{w}-sigmoid" for w in SIZES[1:-1]], str(SIZES[-1])])


def cupy_networks() -> dict[str, Network]:
    """The network on the fused CuPy kernels module by module, on the same plan as unfused CuPy operations,
    and linked into one program per pass fused across the modules (``Network(linked=True)``)."""
    unfused_net = Network(spec(), backend="cupy", dtype=np.float32)
    unfused_net.code = {m.name: unfused(m) for m in (L.Linear, L.Sigmoid, L.CrossEntropy)}
    return {"fused": Network(spec(), backend="cupy", dtype=np.float32), "unfused": unfused_net,
            "linked": Network(spec(), backend="cupy", dtype=np.float32, linked=True)}


def launch_counts() -> dict[str, dict[str, dict[str, int]]]:
    """Device operations of one pass per mode, fused and unfused, counted on the CPU emulator."""
    from mcalc.runtime import emulator

    counts: dict[str, dict[str, dict[str, int]]] = {}
    with emulator.installed() as cp:
        variants = cupy_networks()
        rng = np.random.default_rng(0)
        X = cp.asarray(rng.normal(size=(SIZES[0], BATCH)), dtype=np.float32)
        Y = cp.asarray(np.eye(SIZES[-1], dtype=np.float32)[:, rng.integers(0, SIZES[-1], BATCH)])
        for mode in MODES:
            counts[mode] = {}
            for name, net in variants.items():
                emulator.COUNTS.clear()
                mcalc_pass(net, X, Y, mode)
                counts[mode][name] = {**emulator.COUNTS, "total": sum(emulator.COUNTS.values())}
    return counts


def print_launch_counts(counts: dict, json_path: str | None) -> None:
    kinds = ["kernel", "matmul", "reduce", "elementwise", "fill"]
    print(f"device operations of one HBP pass (network {'-'.join(map(str, SIZES))}, batch {BATCH}), "
          "counted on the CPU emulator:")
    print(f"  {'mode':<8} {'variant':<8} " + " ".join(f"{k:>11}" for k in [*kinds, "total"]))
    for mode, variants in counts.items():
        for name, c in variants.items():
            print(f"  {mode:<8} {name:<8} " + " ".join(f"{c.get(k, 0):>11}" for k in [*kinds, "total"]))
        print(f"  {mode:<8} unfused / fused: {variants['unfused']['total'] / variants['fused']['total']:.2f}×, "
              f"fused / linked: {variants['fused']['total'] / variants['linked']['total']:.2f}×")
    if json_path:
        Path(json_path).write_text(json.dumps({"machine": "CPU emulator (counts do not depend on the machine)",
                                               "launches": counts}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--count-launches", action="store_true",
                        help="count each variant's device operations on the CPU emulator (no GPU, no torch)")
    args = parser.parse_args()
    if args.count_launches:
        print_launch_counts(launch_counts(), args.json)
        return

    import torch
    from backpack import extend

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    device = torch.device(args.device)
    layers = []
    for i in range(len(SIZES) - 1):
        linear = torch.nn.Linear(SIZES[i], SIZES[i + 1])
        torch.nn.init.xavier_uniform_(linear.weight)
        layers += [linear] + ([torch.nn.Sigmoid()] if i < len(SIZES) - 2 else [])
    model = extend(torch.nn.Sequential(*layers).to(device))
    loss_fn = extend(torch.nn.CrossEntropyLoss())
    X_t = torch.randn(BATCH, SIZES[0], device=device)
    y_t = torch.randint(0, SIZES[-1], (BATCH,), device=device)

    if args.device == "cuda":
        import cupy as xp

        sync = xp.cuda.Device().synchronize
        torch_sync = torch.cuda.synchronize
        variants = {f"mcalc {name} CuPy": net for name, net in cupy_networks().items()}
    else:
        xp = np
        sync = torch_sync = lambda: None
        variants = {"mcalc NumPy": Network(spec(), backend="numpy", dtype=np.float32),
                    "mcalc NumPy linked": Network(spec(), backend="numpy", dtype=np.float32, linked=True)}
    linears = [m for m in model if hasattr(m, "weight")]
    for net in variants.values():  # the PyTorch model's weights
        for i, m in enumerate(linears, start=1):
            net.params[f"W{i}"] = xp.asarray(m.weight.detach().cpu().numpy())
            net.params[f"b{i}"] = xp.asarray(m.bias.detach().cpu().numpy()[:, None])
    X = xp.ascontiguousarray(xp.asarray(X_t.cpu().numpy()).T)
    Y = xp.asarray(np.eye(SIZES[-1], dtype=np.float32)[y_t.cpu().numpy()].T)

    def plain():
        model.zero_grad()
        loss_fn(model(X_t), y_t).backward()

    peers = {"plain PyTorch forward+backward": (plain, torch_sync)}
    if args.device == "cuda":  # the fair peer of a replayed mcalc graph: PyTorch's pass replayed too
        peers["plain PyTorch forward+backward graph"] = (graphed_forward_backward(model, loss_fn, X_t, y_t),
                                                         torch_sync)
    results = timed_side_by_side(peers, args.repeats)
    floor = f"float32 GEMM of the pass's {pass_flops() / 1e9:.1f} GFLOP (floor)"
    if args.device == "cuda":
        results[floor] = gemm_floor(xp, args.repeats)
    agreement = {}
    for mode in MODES:
        reference = backpack_pass(model, loss_fn, X_t, y_t, mode)
        contenders = {f"BackPACK HBP [{mode}]": (lambda m=mode: backpack_pass(model, loss_fn, X_t, y_t, m),
                                                 torch_sync)}
        for name, net in variants.items():
            passes = {name: lambda n=net, m=mode: mcalc_pass(n, X, Y, m)}
            if args.device == "cuda":  # the same pass recorded as one CUDA graph
                replay = net.capture_backward(X, Y, mode, "6")
                passes[f"{name} graph"] = lambda r=replay: layer_blocks(r(X, Y)[2])
            for label, run in passes.items():
                blocks = run()
                agreement[f"{label} [{mode}]"] = max(_difference(ours, refs, xp)
                                                     for ours, refs in zip(blocks, reference))
                contenders[f"{label} [{mode}]"] = (run, sync)
        results.update(timed_side_by_side(contenders, args.repeats))
    print(f"device: {args.device}, batch {BATCH}, float32, network {'-'.join(map(str, SIZES))}")
    for name, seconds in results.items():
        print(f"  {name:<40} {seconds * 1e3:9.1f} ms")
    print("agreement with BackPACK (max relative difference of the weight blocks' action and the bias blocks):")
    for name, worst in agreement.items():
        print(f"  {name:<40} {worst:.1e}")
    print("ratios:")
    ratios = {}
    for mode in MODES:
        bp = results[f"BackPACK HBP [{mode}]"]
        for name in agreement:
            if name.endswith(f"[{mode}]"):
                ratios[f"BackPACK / {name}"] = bp / results[name]
        if args.device == "cuda":
            for graph in ("", " graph"):
                ratios[f"unfused{graph} / fused{graph} [{mode}]"] = (
                    results[f"mcalc unfused CuPy{graph} [{mode}]"] / results[f"mcalc fused CuPy{graph} [{mode}]"])
            ratios[f"fused / fused graph [{mode}]"] = (results[f"mcalc fused CuPy [{mode}]"]
                                                       / results[f"mcalc fused CuPy graph [{mode}]"])
            for graph in ("", " graph"):
                ratios[f"fused{graph} / linked{graph} [{mode}]"] = (
                    results[f"mcalc fused CuPy{graph} [{mode}]"] / results[f"mcalc linked CuPy{graph} [{mode}]"])
        else:
            ratios[f"NumPy / NumPy linked [{mode}]"] = (results[f"mcalc NumPy [{mode}]"]
                                                        / results[f"mcalc NumPy linked [{mode}]"])
        ratios[f"BackPACK / plain PyTorch [{mode}]"] = bp / results["plain PyTorch forward+backward"]
        if args.device == "cuda":  # the target: a graphed mcalc pass within 1.5× of PyTorch's graph
            linked = results[f"mcalc linked CuPy graph [{mode}]"]
            torch_graph = results["plain PyTorch forward+backward graph"]
            ratios[f"linked graph / plain PyTorch graph [{mode}]"] = linked / torch_graph
            ratios[f"linked graph / GEMM floor [{mode}]"] = linked / results[floor]
    for name, r in ratios.items():
        print(f"  {name:<48} {r:6.2f}×")
    if args.json:
        machine = describe(torch.cuda.get_device_name() if args.device == "cuda" else None)
        Path(args.json).write_text(json.dumps({"machine": machine, "seconds": results, "ratios": ratios,
                                               "agreement": agreement, "torch": torch.__version__}, indent=2))


if __name__ == "__main__":
    main()
