"""Figures for the notebooks. Each takes ``ax=None`` (or ``axes=None`` for a grid of plots), draws
into it or a new figure, returns the Axes, and never calls ``plt.show()``: the notebook decides
what to display (``ax.figure`` is the figure)."""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # names for annotations only: importing costs nothing at run time
    import numpy as np
    import pandas as pd
    import torch
    from matplotlib.axes import Axes

    from helpers.monitor import Monitor

log = logging.getLogger(__name__)


def task_graph(obj: Any, **kwargs) -> Any:
    """``obj.visualize()`` where Graphviz's ``dot`` is installed, else a one-line description."""
    if shutil.which("dot"):
        return obj.visualize(**{"filename": None, **kwargs})  # draw inline, write no file
    graph = obj.__dask_graph__()
    log.warning("Graphviz's 'dot' is not installed (apt-get install graphviz); no picture")
    return f"<task graph of {len(graph)} tasks; install Graphviz to draw it>"


def to_image(tensor: torch.Tensor) -> np.ndarray:
    """A uint8 CHW tensor (what the loaders yield) -> HWC array for imshow."""
    return tensor.detach().cpu().permute(1, 2, 0).numpy()


def image_grid(
    images: Sequence,
    titles: Sequence[str],
    colors: Sequence[str] | None = None,
    ncols: int = 6,
    size: float = 2.0,
    axes: Any = None,
) -> np.ndarray:
    """A grid of images (PIL or uint8 CHW tensors) titled with ``titles``, each wrapped to its
    image's width (breed names such as Greater_Swiss_Mountain_dog would run into their
    neighbours) with the rows spaced for the tallest; returns the Axes."""
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(images)
    nrows = max(1, math.ceil(n / ncols))
    titles = [_wrap(t, int(size * TITLE_CHARS_PER_INCH)) for t in titles]
    lines = max((t.count("\n") + 1 for t in titles), default=1)
    if axes is None:
        figsize = (ncols * size, nrows * (size + TITLE_LINE_INCHES * lines))
        _, axes = plt.subplots(nrows, ncols, figsize=figsize, squeeze=False)
    axes = np.asarray(axes)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        img = images[i]
        ax.imshow(to_image(img) if hasattr(img, "detach") else img)
        ax.set_title(titles[i], fontsize=8, color=(colors[i] if colors else "black"))
    axes.flat[0].figure.tight_layout()
    return axes


def training_curves(
    steps: pd.DataFrame,
    epochs: pd.DataFrame,
    axes: Any = None,
    figsize: tuple[float, float] = (13, 3.4),
) -> Any:
    """Loss, accuracy and img/s from a Monitor's step and epoch frames; returns the 3 Axes."""
    import matplotlib.pyplot as plt

    if axes is None:
        _, axes = plt.subplots(1, 3, figsize=figsize)
    ax_loss, ax_acc, ax_speed = axes
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
    ax_loss.figure.tight_layout()
    return axes


def live_training(monitor: Monitor, axes: Any = None) -> Any:
    """What :meth:`helpers.monitor.Monitor.follow` redraws: curves, the latest line, and each
    automatic restart (a red line and its cause); returns the Axes."""
    from helpers.show.lines import restart_line

    axes = training_curves(monitor.frame("step"), monitor.frame("epoch"), axes)
    restarts = monitor.restarts()
    for r in restarts:  # a red line where training stopped; it resumed from the last checkpoint
        for ax in axes:
            ax.axvline(r["at"], color="red", ls="--", lw=1)
    lines = "\n".join([*(restart_line(r) for r in restarts), monitor.latest_line()])
    title = axes[0].figure.suptitle(lines, fontsize=9, family="monospace", y=1.02)
    title.set_verticalalignment("bottom")  # more lines grow upwards, above the plots
    return axes


TITLE_CHARS_PER_INCH = 11  # characters of an 8-point title that fit an inch
TITLE_LINE_INCHES = 0.17  # the height of one such line, with its spacing


def _wrap(title: str, width: int) -> str:
    """``title``'s lines wrapped at ``width`` characters, underscores read as spaces."""
    import textwrap

    return "\n".join(textwrap.fill(line.replace("_", " "), width) or line
                     for line in title.split("\n"))  # fmt: skip


def predictions(
    images: Sequence,
    true: Sequence,
    pred: Sequence,
    classes: Sequence[str],
    ncols: int = 6,
    axes: Any = None,
) -> np.ndarray:
    """Validation images titled ``predicted / true`` breed: green when right, red when wrong."""
    from helpers.data import breed

    pairs = list(zip(true, pred, strict=True))
    titles = [f"{breed(classes[p])}\n(true: {breed(classes[t])})" for t, p in pairs]
    colors = ["green" if t == p else "red" for t, p in pairs]
    return image_grid(images, titles, colors, ncols=ncols, axes=axes)


def confusion_matrix(
    true: Sequence, predicted: Sequence, labels: Sequence, ax: Axes | None = None
) -> Axes:
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


def scaling(
    workers: Sequence[int],
    measured: Sequence[float],
    ideal: Sequence[float],
    ax: Axes | None = None,
) -> Axes:
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


def footprint(rows: Sequence[dict], limit_mib: float | None = None, ax: Axes | None = None) -> Axes:
    """What each job's rank 0 held (parameters, gradients, optimizer state: stacked bars) and its
    peak memory (a marker), one bar per job (``helpers.memory.per_rank`` rows), with the
    workers' memory limit as a line; returns the Axes."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(8, 3.8))
    jobs = [r for r in rows if r["rank"] == 0]
    names = [f"{r['arch']}\n{r['strategy'].upper()}" for r in jobs]
    bottom = [0.0] * len(jobs)
    for key, label in (("param_mib", "parameters"), ("grad_mib", "gradients"),
                       ("optim_mib", "optimizer state")):  # fmt: skip
        values = [r[key] for r in jobs]
        ax.bar(names, values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.plot(names, [r["peak_mib"] for r in jobs], "k_", markersize=30, mew=2,
            label=f"peak ({jobs[0]['peak_of']})" if jobs else "peak")  # fmt: skip
    if limit_mib:
        ax.axhline(limit_mib, color="red", ls="--", label="the workers' memory limit")
    ax.set_ylabel("MiB per rank")
    ax.set_title("What one rank holds while it trains")
    # beside the plot, covering nothing; the peak marker drawn at its handle's width, not 30 pt
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), markerscale=0.4)
    ax.grid(axis="y", alpha=0.3)
    ax.figure.tight_layout()  # the legend inside the figure, saved or shown
    return ax
