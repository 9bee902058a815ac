"""Figures for the notebooks. Each takes ``ax=None`` (or a figure size), returns what it drew,
and never calls ``plt.show()``: the notebook decides what to display."""

from __future__ import annotations

import logging
import math
import shutil

log = logging.getLogger(__name__)


def task_graph(obj, **kwargs):
    """``obj.visualize()`` where Graphviz's ``dot`` is installed, else a one-line description."""
    if shutil.which("dot"):
        return obj.visualize(**{"filename": None, **kwargs})  # draw inline, write no file
    graph = obj.__dask_graph__()
    log.warning("Graphviz's 'dot' is not installed (apt-get install graphviz); no picture")
    return f"<task graph of {len(graph)} tasks; install Graphviz to draw it>"


def to_image(tensor):
    """A uint8 CHW tensor (what the loaders yield) -> HWC array for imshow."""
    return tensor.detach().cpu().permute(1, 2, 0).numpy()


def image_grid(images, titles, colors=None, ncols: int = 6, size: float = 2.0):
    """A grid of images (PIL or uint8 CHW tensors) titled with ``titles``; returns the figure."""
    import matplotlib.pyplot as plt

    n = len(images)
    nrows = max(1, math.ceil(n / ncols))
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(ncols * size, nrows * size * 1.1), squeeze=False
    )
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        img = images[i]
        ax.imshow(to_image(img) if hasattr(img, "detach") else img)
        ax.set_title(titles[i], fontsize=8, color=(colors[i] if colors else "black"))
    fig.tight_layout()
    return fig


def training_curves(steps, epochs, figsize=(13, 3.4)):
    """Loss, accuracy and img/s from a Monitor's step and epoch frames; returns the figure."""
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc, ax_speed) = plt.subplots(1, 3, figsize=figsize)
    if len(steps):
        s = steps[steps["rank"] == 0]
        x = s["epoch"] - 1 + s["step"] / s["steps"]
        ax_loss.plot(x, s["loss"], label="train (running)")
        ax_acc.plot(x, 100 * s["acc"], label="train (running)")
        ax_speed.plot(x, s["img_per_s"], label="all ranks")
        ax_speed.plot(x, 100 * s["data_wait"], label="% time waiting for data", alpha=0.6)
    if len(epochs):
        ax_loss.plot(epochs["epoch"], epochs["val_loss"], "o-", label="validation")
        ax_acc.plot(epochs["epoch"], 100 * epochs["val_top1"], "o-", label="val top-1")
        ax_acc.plot(epochs["epoch"], 100 * epochs["val_top5"], "s--", label="val top-5")
    for ax, title in ((ax_loss, "loss"), (ax_acc, "accuracy %"), (ax_speed, "images / s")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def live_training(monitor):
    """The figure :meth:`helpers.monitor.Monitor.follow` redraws: curves + the latest line."""
    fig = training_curves(monitor.frame("step"), monitor.frame("epoch"))
    fig.suptitle(monitor.latest_line(), fontsize=9, family="monospace", y=1.02)
    return fig


def predictions(images, true, pred, classes, ncols: int = 6):
    """Validation images titled ``predicted / true`` breed: green when right, red when wrong."""
    from helpers.data import breed

    pairs = list(zip(true, pred, strict=True))
    titles = [f"{breed(classes[p])}\n(true: {breed(classes[t])})" for t, p in pairs]
    colors = ["green" if t == p else "red" for t, p in pairs]
    return image_grid(images, titles, colors, ncols=ncols)


def confusion_matrix(true, predicted, labels, ax=None):
    """Counts of (true, predicted) breeds as an image; returns the Axes."""
    import matplotlib.pyplot as plt
    import numpy as np

    index = {b: i for i, b in enumerate(labels)}
    counts = np.zeros((len(labels), len(labels)), dtype=int)
    for t, p in zip(true, predicted, strict=True):
        counts[index[t], index[p]] += 1
    if ax is None:
        _, ax = plt.subplots(figsize=(0.5 * len(labels) + 2, 0.5 * len(labels) + 1.5))
    ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), n in np.ndenumerate(counts):
        if n:
            ax.text(
                j,
                i,
                n,
                ha="center",
                va="center",
                fontsize=7,
                color="white" if n > counts.max() / 2 else "black",
            )
    return ax


def scaling(workers, measured, ideal, ax=None):
    """Measured throughput against the ideal linear line; returns the Axes."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(workers, ideal, "--", color="grey", label="ideal (linear)")
    ax.plot(workers, measured, "o-", label="measured")
    ax.set_xlabel("workers (ranks)")
    ax.set_ylabel("training images / s")
    ax.set_xticks(list(workers))
    ax.grid(alpha=0.3)
    ax.legend()
    return ax
