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
