"""Measuring the data path: loader throughput and per-image statistics (small, picklable results
that Dask tasks return)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from helpers import data, objects

if TYPE_CHECKING:  # names for annotations only: importing costs nothing at run time
    import pandas as pd

STATS_DTYPES = {"key": str, "breed": str, "width": "int64", "height": "int64",
                "red": "float32", "green": "float32", "blue": "float32"}  # fmt: skip


def image_stats(url: str, keys: Sequence[str], options: dict | None = None) -> pd.DataFrame:
    """Size and mean colour of some images: a small pandas DataFrame, one row per readable image.

    Small and picklable, for a Dask task (``dd.from_delayed``); empty ``keys`` give the empty
    frame with the columns and types (the ``meta`` Dask needs).
    """
    import numpy as np
    import pandas as pd

    ds = objects.S3ImageDataset(url, keys, [], options)  # cache-free, one concurrent round
    rows = []
    for i, img, _ in ds.samples(list(range(len(keys)))):  # bad images are skipped and logged
        r, g, b = np.asarray(img.reduce(4), dtype="float32").reshape(-1, 3).mean(0) / 255
        folder = data.class_folder(keys[i])
        rows.append((keys[i], data.breed(folder), img.width, img.height, r, g, b))
    return pd.DataFrame(rows, columns=list(STATS_DTYPES)).astype(STATS_DTYPES)


def time_loader(loader: Iterable, max_batches: int | None = None) -> dict:
    """Iterate a loader and measure it: images, seconds, img/s (first batch included)."""
    n, start = 0, time.perf_counter()
    for i, batch in enumerate(loader):
        if batch is not None:
            n += len(batch[1])
        if max_batches is not None and i + 1 >= max_batches:
            break
    seconds = time.perf_counter() - start
    return {"images": n, "seconds": round(seconds, 2), "img_per_s": round(n / seconds, 1)}


def loader_throughput(
    manifest: data.Manifest,
    keys: Sequence[str],
    options: dict | None,
    image_size: int,
    batch_size: int,
    num_workers: int,
    max_batches: int | None = None,
) -> dict:
    """Build a training loader where this runs (e.g. inside a Dask worker) and time it."""
    import torch

    threads = torch.get_num_threads()  # the setting outlives this task on a Dask worker
    torch.set_num_threads(1)  # the loader's processes do the work; keep this one light
    try:
        ds = objects.make_dataset(manifest, keys, options, image_size, train=True)
        loader = data.make_loader(ds, batch_size, num_workers, shuffle=True)
        return time_loader(loader, max_batches)
    finally:
        torch.set_num_threads(threads)
