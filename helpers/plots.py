"""Figures for the notebooks. Each takes ``ax=None`` (or a figure size), returns what it drew,
and never calls ``plt.show()``: the notebook decides what to display."""

from __future__ import annotations

import logging
import math
import shutil

log = logging.getLogger(__name__)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # as in helpers.data


def task_graph(obj, **kwargs):
    """``obj.visualize()`` where Graphviz's ``dot`` is installed, else a one-line description."""
    if shutil.which("dot"):
        return obj.visualize(**{"filename": None, **kwargs})  # draw inline, write no file
    graph = obj.__dask_graph__()
    log.warning("Graphviz's 'dot' is not installed (apt-get install graphviz); no picture")
    return f"<task graph of {len(graph)} tasks; install Graphviz to draw it>"


def to_image(tensor):
    """A normalised CHW tensor -> HWC array in [0, 1] for imshow."""
    import numpy as np

    x = tensor.detach().float().cpu().numpy().transpose(1, 2, 0)
    return np.clip(x * np.array(STD) + np.array(MEAN), 0, 1)


def image_grid(images, titles, colors=None, ncols: int = 6, size: float = 2.0):
    """A grid of images (PIL or normalised tensors) titled with ``titles``; returns the figure."""
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
