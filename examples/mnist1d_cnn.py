"""A CNN on MNIST-1D, trained by mcalc's optimisers: Greydanus' (2020) ConvBase, three 1-D convolutions
(25 channels; kernels 5, 3, 3; stride 2; padding 1) with ReLUs and a Linear layer, as a model spec.

    python examples/mnist1d_cnn.py [--optimizer hbp-newton] [--epochs 10] [--batch-size 64] [--alpha A]
                                   [--lr-drop EPOCH ...] [--json OUT] [--plot PNG]

``--batch-size 16 --alpha 0.1 --lr-drop 31 --epochs 40`` passes the published CNN's 94% (README).

The history (``--json``) has the format of ``mcalc train --json``: this runs ``mcalc train`` on that spec.
"""
from __future__ import annotations

import argparse
import sys

from mcalc import cli

SPEC = "1x40-conv(25,5,stride=2,pad=1)-relu-conv(25,3,stride=2,pad=1)-relu-conv(25,3,stride=2,pad=1)-relu-flatten-10"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", default="hbp-newton", help="any of mcalc train's (default hbp-newton)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--alpha", type=float, help="hbp-newton's α of eq. (8) (default: the paper's 0.02)")
    parser.add_argument("--lr-drop", type=int, nargs="+", default=[], metavar="EPOCH",
                        help="divide the learning rate by ten at these epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="OUT", help="write the history there")
    parser.add_argument("--plot", metavar="PNG", help="write the loss and accuracy curves there")
    args = parser.parse_args(argv)
    command = ["train", "--data", "mnist1d", "--model", SPEC, "--optimizer", args.optimizer,
               "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--seed", str(args.seed)]
    for option in ("json", "plot", "alpha"):
        if getattr(args, option) is not None:
            command += [f"--{option}", str(getattr(args, option))]
    if args.lr_drop:
        command += ["--lr-drop", *map(str, args.lr_drop)]
    return cli.main(command)


if __name__ == "__main__":
    sys.exit(main())
