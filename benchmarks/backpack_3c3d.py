"""K-FAC factors of BackPACK's 3C3D network on CIFAR-10-shaped input: mcalc's kfac against BackPACK's KFLR.

    python benchmarks/backpack_3c3d.py [--device cpu|cuda] [--batch 64] [--repeats 5] [--json OUT]

The network is DeepOBS' ``cifar10_3c3d`` as BackPACK's own benchmarks build it (three convolutions of 64,
96 and 128 filters with ReLUs, each followed by a 3 × 3 max pooling of stride 2 with TensorFlow's 'same'
padding, then Linear layers of 512, 256 and 10 units), written as an mcalc model spec; the PyTorch copy
pads with ZeroPad2d as DeepOBS does and gets mcalc's weights (its flatten's order permuted). Both sides
compute one pass of exact-Fisher Kronecker factors (the GGN of the cross-entropy, summed over the
classes): mcalc's ``KFAC._statistics(fisher='exact')`` (nine backward passes through the generated code,
one per column of the Fisher's rank-9 root at the logits) and BackPACK's ``KFLR`` (the ten classes' square
roots backpropagated at once). Factors are
compared one to one, each with the mcalc convention it shares: BackPACK's convolution input factor is
Σₜ uₜ uₜᵀ, T times mcalc's KFC (K-FAC-expand) factor, which carries the bias row besides; its convolution
output factor sums the positions' gradients before the outer product, as mcalc's
``kfac_approx='reduce'`` does (K-FAC-reduce's output factor); the Linear layers' are the same in all.
The check runs in float64; the times (kfac's default, expand) in float32, the contenders in turn within
each repeat, medians reported, one BLAS thread each side unless the environment says more (also mcalc's
K-FAC-reduce, whose output factor sums the positions first as KFLR's does). The same for each library's
default K-FAC, the Monte Carlo Fisher (one label sampled per input, one backward pass): mcalc's
``fisher='mc'`` against BackPACK's ``KFAC``, checked with BackPACK's sampler made to draw mcalc's labels
(as ``tests/test_backpack_conv.py`` does). glibc's malloc
thresholds fixed first, as ``mcalc`` does (``mcalc/runtime/allocator.py``). With ``--device cuda`` mcalc runs
on its CuPy backend (its fused kernels) and BackPACK on PyTorch's CUDA, each timed to a synchronisation
of the device, and the JSON names the GPU.

HBP's own modes (exact, GGN, PCH-abs under (6)) are not run here: (6) backpropagates the batch-averaged
curvature 𝓗̄z as a dense matrix, 50,176² entries at the first convolution's output (about 10 GB in float32),
and BackPACK's KFRA does the same; the script prints that size.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from machine import describe  # noqa: E402  (benchmarks/machine.py, beside this script)
from side_by_side import timed_in_turn  # noqa: E402

from mcalc.runtime.array_ops import grid  # noqa: E402
from mcalc.train.network import Network  # noqa: E402
from mcalc.train.optimizers import make_optimizer  # noqa: E402

# mcalc flattens the last 128 × 3 × 3 output pixel by pixel (the channels within), PyTorch channel by channel
FLATTEN = np.array([p * 128 + ch for ch in range(128) for p in range(9)])
SPEC = ("3x32x32-conv(64,5)-relu-maxpool(3,stride=2,pad=same)-conv(96,3)-relu-maxpool(3,stride=2,pad=same)"
        "-conv(128,3,pad=same)-relu-maxpool(3,stride=2,pad=same)-flatten-512-relu-256-relu-10")


def backpack_model(net: Network, dtype):
    """DeepOBS' 3C3D in PyTorch with ``net``'s weights: ZeroPad2d before each pooling (and the third
    convolution), as its tf-'same' padding computes them for 32 × 32 inputs."""
    import torch
    from torch import nn

    conv = lambda i, o, k: nn.Conv2d(i, o, k)  # noqa: E731
    pool = lambda: [nn.ZeroPad2d((0, 1, 0, 1)), nn.MaxPool2d(3, stride=2)]  # noqa: E731
    model = nn.Sequential(conv(3, 64, 5), nn.ReLU(), *pool(), conv(64, 96, 3), nn.ReLU(), *pool(),
                          nn.ZeroPad2d(1), conv(96, 128, 3), nn.ReLU(), *pool(), nn.Flatten(),
                          nn.Linear(1152, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10)).to(dtype)
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    linears = [m for m in model if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for k, m in enumerate(convs, 1):
            m.weight.copy_(torch.tensor(net.params[f"conv{k}.K"].reshape(m.weight.shape)))
            m.bias.copy_(torch.tensor(net.params[f"conv{k}.b"][:, 0]))
        for k, m in enumerate(linears, 1):
            W = net.params[f"W{k}"]
            m.weight.copy_(torch.tensor(W[:, FLATTEN] if k == 1 else W))
            m.bias.copy_(torch.tensor(net.params[f"b{k}"][:, 0]))
    return model


MC_SEED = 11  # mcalc's Monte Carlo labels: each timed or checked call draws from a fresh generator of this seed


def mcalc_factors(net: Network, X, kfac_approx: str = "expand", fisher: str = "exact") -> list[tuple]:
    """mcalc's K-FAC factors (Ā with the bias row, G) of every convolution and Linear layer, of the exact
    Fisher or of one label per input sampled from the model (the MC Fisher)."""
    kfac = make_optimizer("kfac", fisher=fisher, kfac_approx=kfac_approx, seed=MC_SEED)
    statistics_ = kfac._statistics(net, X)
    return [statistics_[p] for p in sorted(statistics_)]


def mcalc_labels(net: Network, X) -> np.ndarray:
    """The labels ``KFAC._statistics`` samples for X with ``fisher='mc'`` (inverse-CDF sampling of the
    model's softmax by a fresh generator of :data:`MC_SEED`), transcribed."""
    from mcalc.runtime.array_ops import softmax

    host = lambda a: a.get() if hasattr(a, "get") else a  # noqa: E731
    p = host(softmax(net.forward(X)[0]))
    draws = np.random.default_rng(MC_SEED).random(p.shape[1])
    return np.minimum((draws[None, :] > np.cumsum(p, axis=0)).sum(axis=0), p.shape[0] - 1)


def backpack_factors(model, X, y, extension: str = "KFLR", sampled=None) -> list[list]:
    """BackPACK's KFLR (or, with ``extension='KFAC'``, one-sample KFAC) factors of every weight, in layer
    order: [G, A] (a convolution's A summed over the positions). ``sampled``: the labels KFAC's sampler is
    made to draw (a tensor of one label per input), else its own."""
    import torch
    from backpack import backpack, extend, extensions
    from backpack.core.derivatives.crossentropyloss import CrossEntropyLossDerivatives

    class Drawn:  # BackPACK's Categorical, drawing the given labels: [mc_samples = 1, N]
        def sample(self, shape):
            return sampled[None, :].expand(*shape, len(sampled))

    model, loss_fn = extend(model), extend(torch.nn.CrossEntropyLoss())
    model.zero_grad()
    original = CrossEntropyLossDerivatives._make_distribution
    if sampled is not None:
        CrossEntropyLossDerivatives._make_distribution = lambda self, subsampled_input: Drawn()
    try:
        with backpack(getattr(extensions, extension)(**({"mc_samples": 1} if extension == "KFAC" else {}))):
            loss_fn(model(X), y).backward()
    finally:
        CrossEntropyLossDerivatives._make_distribution = original
    name = extension.lower()
    return [getattr(m.weight, name) for m in model if hasattr(m, "weight") and m.weight is not None]


def compare(expand: list[tuple], reduce: list[tuple], theirs: list[list], positions: list[int]) -> list[dict]:
    """The relative differences of every layer's factors: BackPACK's input factor against T times mcalc's
    expand factor (its bias row left out), its output factor against mcalc's reduce factor (for a Linear
    layer, T = 1, expand and reduce are one)."""
    host = lambda a: a.get() if hasattr(a, "get") else a  # noqa: E731  (a CuPy array's values)
    out = []
    for k, ((A, _), (_, G), (G_b, A_b), T) in enumerate(zip(expand, reduce, theirs, positions)):
        A, G, A_b, G_b = host(A), host(G), A_b.detach().cpu().numpy(), G_b.detach().cpu().numpy()
        A = A[:-1, :-1] if k != len(positions) - 3 else A[:-1, :-1][np.ix_(FLATTEN, FLATTEN)]  # the first Linear's
        out.append({"positions": T, "input_factor": float(np.abs(T * A - A_b).max() / np.abs(A_b).max()),
                    "output_factor": float(np.abs(G - G_b).max() / np.abs(G_b).max())})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args()
    import torch

    from mcalc.runtime.allocator import keep_freed_memory

    fixed = keep_freed_memory()  # as `mcalc train` runs (both contenders share the process's allocator)
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    dense_entries = (64 * 28 * 28) ** 2
    print(f"(6) would backpropagate 𝓗̄z of {64 * 28 * 28:,} × {64 * 28 * 28:,} at conv1's output: "
          f"{dense_entries * 4 / 2**30:.1f} GiB in float32; HBP's modes are not run", flush=True)

    cuda = args.device == "cuda"
    if cuda:
        import cupy

        on_device, backend = cupy.asarray, "cupy"
        synchronised = lambda run: lambda: (run(), cupy.cuda.Device().synchronize(),  # noqa: E731
                                            torch.cuda.synchronize())
    else:
        on_device, backend, synchronised = np.asarray, "numpy", lambda run: run
    device = torch.device(args.device)

    # the check, in float64, on a small batch
    net = Network(SPEC, seed=0, backend=backend)
    positions = [_positions(layer) for layer in net.layers if layer.params]
    X = rng.normal(size=(3 * 32 * 32, 8))
    y = rng.integers(0, 10, 8)
    images = torch.tensor(X.T.reshape(8, 32 * 32, 3).transpose(0, 2, 1).reshape(8, 3, 32, 32).copy())
    theirs = backpack_factors(backpack_model(net, torch.float64).to(device), images.to(device),
                              torch.tensor(y).to(device))
    check = compare(mcalc_factors(net, on_device(X)), mcalc_factors(net, on_device(X), "reduce"), theirs, positions)
    sampled = torch.tensor(mcalc_labels(net, on_device(X))).to(device)
    theirs_mc = backpack_factors(backpack_model(net, torch.float64).to(device), images.to(device),
                                 torch.tensor(y).to(device), "KFAC", sampled)
    check_mc = compare(mcalc_factors(net, on_device(X), fisher="mc"),
                       mcalc_factors(net, on_device(X), "reduce", fisher="mc"), theirs_mc, positions)
    for label, rows in (("exact Fisher, KFLR", check), ("MC Fisher, KFAC", check_mc)):
        print(f"  {label}:")
        for k, row in enumerate(rows):
            print(f"    layer {k + 1} (T = {row['positions']:4d}): input factor {row['input_factor']:.1e}, "
                  f"output factor {row['output_factor']:.1e}", flush=True)
    worst = max(max(r["input_factor"], r["output_factor"]) for r in check + check_mc)
    assert worst < 1e-8, f"factors differ: {worst}"

    # the timing, in float32
    net32 = Network(SPEC, seed=0, dtype=np.float32, backend=backend)
    B = args.batch
    X = rng.normal(size=(3 * 32 * 32, B)).astype(np.float32)
    y = torch.tensor(rng.integers(0, 10, B)).to(device)
    images = torch.tensor(X.T.reshape(B, 32 * 32, 3).transpose(0, 2, 1).reshape(B, 3, 32, 32).copy()).to(device)
    model = backpack_model(net32, torch.float32).to(device)
    X = on_device(X)
    times = timed_in_turn({"mcalc kfac (exact Fisher)": synchronised(lambda: mcalc_factors(net32, X)),
                   "mcalc kfac, reduce": synchronised(lambda: mcalc_factors(net32, X, "reduce")),
                   "BackPACK KFLR": synchronised(lambda: backpack_factors(model, images, y)),
                   "mcalc kfac (MC Fisher)": synchronised(lambda: mcalc_factors(net32, X, fisher="mc")),
                   "mcalc kfac (MC Fisher), reduce": synchronised(lambda: mcalc_factors(net32, X, "reduce", "mc")),
                   "BackPACK KFAC": synchronised(lambda: backpack_factors(model, images, y, "KFAC"))}, args.repeats)
    ratio = times["BackPACK KFLR"] / times["mcalc kfac (exact Fisher)"]
    ratio_reduce = times["BackPACK KFLR"] / times["mcalc kfac, reduce"]  # the output factor BackPACK computes
    ratio_mc = times["BackPACK KFAC"] / times["mcalc kfac (MC Fisher)"]  # each library's default K-FAC
    ratio_mc_reduce = times["BackPACK KFAC"] / times["mcalc kfac (MC Fisher), reduce"]
    machine = describe(torch.cuda.get_device_name() if cuda else None)
    print(f"\n3C3D on {args.device} ({machine}), batch {B}, float32, {threads} thread(s), median of {args.repeats}:")
    for name, seconds in times.items():
        print(f"  {name:<32} {seconds * 1e3:9.1f} ms")
    print(f"  BackPACK KFLR / mcalc exact Fisher: {ratio:.2f}× (expand), {ratio_reduce:.2f}× (reduce)")
    print(f"  BackPACK KFAC / mcalc MC Fisher:    {ratio_mc:.2f}× (expand), {ratio_mc_reduce:.2f}× (reduce)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "spec": SPEC, "device": args.device, "batch": B, "dtype": "float32", "threads": threads,
            "repeats": args.repeats,
            "seconds": times, "backpack_over_mcalc": ratio, "backpack_over_mcalc_reduce": ratio_reduce,
            "backpack_kfac_over_mcalc_mc": ratio_mc, "backpack_kfac_over_mcalc_mc_reduce": ratio_mc_reduce,
            "check_float64": check, "check_float64_mc": check_mc,
            "malloc_thresholds_fixed": fixed, "machine": machine}, indent=2))


def _positions(layer) -> int:
    """T, a convolution's output positions; 1 for a Linear layer."""
    if layer.window is None:
        return 1
    kernel, stride, padding, dilation, extents = layer.window
    return int(np.prod(grid(extents, kernel, stride, padding, dilation)))


if __name__ == "__main__":
    main()
