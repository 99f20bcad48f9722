"""The training loop: mini-batches, evaluation per epoch, and the guard that rejects non-finite and runaway
steps, restoring the weights and the optimiser's state."""
from __future__ import annotations

import copy
import io
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import McalcError
from ..files import write_atomic
from ..modes import Approximation
from .checkpoint import save_checkpoint
from .data import Dataset
from .distributed import DataParallel
from .network import Network
from .optimizer_protocol import CurvatureRequest, MiniBatch, Optimizer
from .progress import progress_bar

TRUST_BOUND = 2.0  # a second-order step that more than doubles its own mini-batch's loss is rejected


def one_hot(labels: np.ndarray, classes: int) -> np.ndarray:
    """Labels as columns of the identity: (classes, B)."""
    return np.eye(classes)[:, labels]


def restore(optimizer: Optimizer, snapshot: Optimizer) -> None:
    """Put ``optimizer`` back, in place, into the state ``snapshot`` (a deep copy) holds."""
    vars(optimizer).clear()
    vars(optimizer).update(vars(snapshot))


def step_is_rejected(optimizer: Optimizer, loss_before: float, loss_after: float, updates: dict[str, Any], xp: Any,
                     trust_bound: float = TRUST_BOUND) -> bool:
    """Whether the training loop rejects a step: its loss or an update is not finite or, for a
    second-order optimiser (:attr:`.Optimizer.second_order`), its mini-batch loss rose past
    ``trust_bound`` times the loss before it."""
    if not math.isfinite(loss_after) or not all(bool(xp.isfinite(u).all()) for u in updates.values()):
        return True
    return optimizer.second_order and loss_after > trust_bound * loss_before


def train(net: Network, data: Dataset, optimizer: Optimizer, *, epochs: int, batch_size: int, seed: int = 0,
          progress: bool = False, name: str = "", checkpoint: str | Path | None = None,
          resume: dict[str, Any] | None = None, graphs: bool = False,
          on_epoch: Callable[[dict[str, Any]], None] | None = None,
          parallel: DataParallel | None = None, lr_drops: Sequence[int] = ()) -> dict[str, Any]:
    """Train ``net`` and return ``{"optimizer", "history": [...], "final": {...}}`` (the design's format).

    A step is rejected when its loss or an update is not finite or, for a
    second-order optimiser, when its mini-batch loss more than doubles
    (:func:`step_is_rejected`): the weights and the optimiser's own state
    (velocities, factors, quasi-Newton matrices) are restored to what they were
    before the step, and the optimiser's ``reject()`` raises its damping; steps
    rejected are counted. The optimiser's ``prepare(net, X_train)`` is given
    the training inputs once before its first step (K-BFGS's pass over the
    data), and each step the whole training set beside its batch (``batch.training``,
    this rank's shard; Martens' Hessian-free measures on it); :mod:`.optimizer_protocol`
    says what else the loop asks of it.
    With ``checkpoint`` the state is saved after every epoch; ``resume`` (a
    loaded checkpoint) continues that run exactly where it stopped. ``graphs``
    (cupy backend): each backward pass is a CUDA graph replayed, one captured per
    curvature mode and batch shape (:meth:`Network.capture_backward`). ``on_epoch`` is called with each
    epoch's history row as the epoch ends (the CLI prints it); with ``progress``, the steps are shown as they
    go: a bar on a terminal, else a line to standard error at most every 30 s (:mod:`.progress`). With
    ``parallel`` over several ranks each
    takes its shard of every batch, and the network (``net.parallel``) and the optimisers average every
    batch mean of a step over them (:mod:`.distributed`); only rank 0 calls ``on_epoch``, shows progress
    and writes checkpoints. ``lr_drops``: the epochs at whose start the learning rate is divided by ten
    (step decay; :func:`check_lr_drops` says which optimisers have one).
    """
    if graphs and net.backend != "cupy":
        raise McalcError(f"CUDA graphs need the cupy backend; this network runs on {net.backend}")
    parallel = parallel or DataParallel()
    if graphs and parallel.comm.size > 1:
        raise McalcError(f"CUDA graphs run in one process: a captured pass cannot make the all-reduces of "
                         f"{parallel.comm.size} ranks; run without --graphs")
    check_lr_drops(optimizer, lr_drops, epochs)
    net.parallel = parallel
    progress = progress and parallel.is_root
    xp = net.xp
    captured: dict[tuple, Any] = {}

    def backward(X: Any, Y: Any) -> tuple:
        """Loss, gradients and the blocks the optimiser's next step needs."""
        request = optimizer.curvature_request() or CurvatureRequest(None, Approximation.MEAN_OF_SANDWICHES)
        if not graphs:
            return net.backward(X, Y, *request)
        key = (*request, X.shape)
        if key not in captured:
            captured[key] = net.capture_backward(X, Y, *request)
        return captured[key](X, Y)

    rng = np.random.default_rng(seed)
    history, rejected, first_epoch, elapsed = [], 0, 1, 0.0
    done = resume["epoch"] if resume is not None else 0
    if done >= epochs:  # refused before the network or the optimiser is touched
        raise McalcError(f"nothing to train: the run already has {done} of {epochs} epochs")
    if resume is not None:
        net.params = {k: xp.asarray(v) for k, v in resume["params"].items()}
        optimizer = resume["optimizer"]
        rng.bit_generator.state = resume["rng"]
        history, rejected = list(resume["history"]), resume["rejected"]
        first_epoch, elapsed = done + 1, history[-1]["wall_s"] if history else 0.0
    as_array = lambda a: xp.asarray(a, dtype=net.dtype)  # noqa: E731
    X_train, X_test = as_array(data.x_train.T), as_array(data.x_test.T)
    Y_train, Y_test = as_array(one_hot(data.y_train, data.classes)), as_array(one_hot(data.y_test, data.classes))
    labels_test = xp.asarray(data.y_test)
    if resume is None:
        optimizer.prepare(net, X_train)
    steps = math.ceil(len(data.y_train) / batch_size)
    whole = parallel.local(np.arange(len(data.y_train)))  # this rank's shard of the training set
    X_whole, Y_whole = (X_train, Y_train) if len(whole) == len(data.y_train) else \
        (X_train[:, xp.asarray(whole)], Y_train[:, xp.asarray(whole)])
    start = time.perf_counter() - elapsed
    bar = progress_bar((epochs - first_epoch + 1) * steps, name or "train") if progress else None
    for epoch in range(first_epoch, epochs + 1):
        if epoch in lr_drops:  # step decay; a run resumed past a drop has its optimiser's lower rate already
            optimizer.lr = optimizer.lr / 10
        order = rng.permutation(len(data.y_train))
        losses = []
        for k in range(steps):
            index = xp.asarray(parallel.shard(order[k * batch_size:(k + 1) * batch_size]))  # all of it in one process
            X, Y = X_train[:, index], Y_train[:, index]
            loss, grads, blocks = backward(X, Y)  # means over the global batch
            snapshot = copy.deepcopy(optimizer)
            # its loss after the update computed once, here or in the step; the training set's, by whoever asks
            batch = MiniBatch(net, X, Y, loss, training=MiniBatch(net, X_whole, Y_whole))
            updates = optimizer.step(net, grads, blocks, batch)
            loss_after = batch.loss(updates)
            previous = dict(net.params)
            net.params = net.params_plus(updates)
            if step_is_rejected(optimizer, loss, loss_after, updates, xp):
                net.params = previous  # never corrupt the weights, nor the optimiser's state
                restore(optimizer, snapshot)
                rejected += 1
                optimizer.reject()
            else:
                losses.append(loss)
            if bar is not None:
                bar.update()
        history.append({
            "epoch": epoch,
            "train_loss": float(np.mean(losses)) if losses else float("nan"),
            "test_loss": net.loss(X_test, Y_test),
            "test_accuracy": net.accuracy(X_test, labels_test),
            "wall_s": time.perf_counter() - start,
        })
        if bar is not None:
            bar.set_postfix(acc=f"{history[-1]['test_accuracy']:.3f}")
        if on_epoch is not None and parallel.is_root:
            if bar is not None:
                bar.clear()
            on_epoch(history[-1])
            if bar is not None:
                bar.refresh()
        if checkpoint is not None and parallel.is_root:
            save_checkpoint(checkpoint, {"epoch": epoch, "params": dict(net.params), "optimizer": optimizer,
                                         "name": name, "rng": rng.bit_generator.state, "history": history,
                                         "rejected": rejected, "spec": net.spec, "loss": net.loss_module})
    if bar is not None:
        bar.close()
    return {"optimizer": name, "history": history, "final": {**history[-1], "rejected_steps": rejected}}


def has_learning_rate(optimizer: Optimizer) -> bool:
    """Whether the optimiser steps by a fixed learning rate, which a drop can divide (kfac's comes from its
    quadratic model unless ``lr`` fixes it)."""
    return isinstance(getattr(optimizer, "lr", None), (int, float))


def check_lr_drops(optimizer: Optimizer, lr_drops: Sequence[int], epochs: int) -> None:
    """Refuses drops that cannot happen: an optimiser without a learning rate (:func:`has_learning_rate`),
    or an epoch outside 2 … ``epochs``."""
    if lr_drops and not has_learning_rate(optimizer):
        raise McalcError(f"{type(optimizer).__name__} chooses its step length itself: a learning-rate drop needs "
                         f"a fixed learning rate (--lr)")
    wrong = [e for e in lr_drops if not 2 <= e <= epochs]
    if wrong:
        raise McalcError(f"--lr-drop {wrong[0]}: a drop happens at the start of an epoch from 2 to {epochs}")


def write_json(result: dict[str, Any], path: str | Path) -> None:
    write_atomic(Path(path), json.dumps(result, indent=2) + "\n")


def plot(results: list[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """Test loss and accuracy against epochs and against wall-clock time, one line per run, under ``title``
    (say, the model and the data). The accuracy axis starts just below the lowest accuracy of the runs'
    second halves, where they are told apart (the loss panels show the early epochs whole); epochs are
    ticked at whole numbers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(2, 2, figsize=(11, 7), sharey="row")
    for result in results:
        h = result["history"]
        for column, x_key in enumerate(("epoch", "wall_s")):
            xs = [r[x_key] for r in h]
            axes[0][column].plot(xs, [r["test_loss"] for r in h], label=result["optimizer"])
            axes[1][column].plot(xs, [r["test_accuracy"] for r in h], label=result["optimizer"])
    for column, label in enumerate(("epoch", "wall-clock seconds")):
        axes[1][column].set_xlabel(label)
    for row in axes:
        row[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    later = [r["test_accuracy"] for result in results for r in result["history"][len(result["history"]) // 2:]]
    if later:
        axes[1][0].set_ylim(max(0.0, min(later) - 0.02), min(1.0, max(later) + 0.01))
    axes[0][0].set_ylabel("test loss")
    axes[1][0].set_ylabel("test accuracy")
    axes[0][0].set_yscale("log")
    axes[0][1].legend()
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=110)
    plt.close(figure)
    write_atomic(Path(path), png.getvalue())  # written whole or not at all
