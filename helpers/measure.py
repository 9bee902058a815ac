"""Measuring the data path: loader throughput and per-image statistics (small, picklable results
that Dask tasks return)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from helpers import data
from helpers.config import Rank
from helpers.loading.loaders import make_loaders
from helpers.loading.objects import S3ImageDataset

if TYPE_CHECKING:  # names for annotations only: importing costs nothing at run time
    import pandas as pd

    from helpers.config import TrainConfig

STATS_DTYPES = {
    "key": str,
    "breed": str,
    "width": "int64",
    "height": "int64",
    "red": "float32",
    "green": "float32",
    "blue": "float32",
}


def image_stats(url: str, keys: Sequence[str], options: dict | None = None) -> pd.DataFrame:
    """Size and mean colour of some images: a small pandas DataFrame, one row per readable image.

    Small and picklable, for a Dask task (``dd.from_delayed``); empty ``keys`` give the empty
    frame with the columns and types (the ``meta`` Dask needs).
    """
    import numpy as np
    import pandas as pd

    ds = S3ImageDataset(url, keys, None, options)  # no labels needed: one concurrent round
    rows = []
    for i, img, _ in ds.samples(list(range(len(keys)))):  # bad images are skipped and logged
        r, g, b = np.asarray(img.reduce(4), dtype="float32").reshape(-1, 3).mean(0) / 255
        folder = data.class_folder(keys[i])
        rows.append((keys[i], data.breed(folder), img.width, img.height, r, g, b))
    return pd.DataFrame(rows, columns=list(STATS_DTYPES)).astype(STATS_DTYPES)


def time_loader(loader: Iterable, max_batches: int | None = None) -> dict:
    """Iterate a loader and measure it: images, batches, seconds, img/s (first batch included)."""
    n, batches, start = 0, 0, time.perf_counter()
    for i, batch in enumerate(loader):
        if batch is not None:
            n, batches = n + len(batch[1]), batches + 1
        if max_batches is not None and i + 1 >= max_batches:
            break
    seconds = time.perf_counter() - start
    return {
        "images": n,
        "batches": batches,
        "seconds": round(seconds, 3),
        "img_per_s": round(n / seconds, 1),
    }


def training_loader(cfg: TrainConfig, options: dict | None) -> Iterable:
    """One rank's training batches for ``cfg`` (its ``data_format``), as training builds them,
    started at epoch 1: for measuring a data path outside a DDP job."""
    import torch

    manifest = data.load_manifest(cfg.data_url, options)
    split = data.split(manifest, cfg.val_fraction, cfg.seed)
    train, _ = make_loaders(cfg, options, manifest, split, Rank.alone(), torch.device("cpu"))
    train.start_epoch(1)
    return train


def loader_throughput(
    cfg: TrainConfig, options: dict | None, max_batches: int | None = None
) -> dict:
    """Build a training loader where this runs (e.g. inside a Dask worker) and time it."""
    import torch

    threads = torch.get_num_threads()  # the setting outlives this task on a Dask worker
    torch.set_num_threads(1)  # the loader's processes do the work; keep this one light
    try:
        return time_loader(training_loader(cfg, options), max_batches)
    finally:
        torch.set_num_threads(threads)


def compare_formats(cfg: TrainConfig, options: dict | None) -> pd.DataFrame:
    """One training epoch from objects and from shards, on the same server: img/s and the GET
    requests the store answered, counted by a proxy in front of it (http endpoints only; the
    count is missing for others)."""
    import dataclasses

    import pandas as pd

    from helpers.s3.proxy import S3Proxy

    endpoint = (options or {}).get("endpoint_url") or ""
    proxy = S3Proxy(endpoint).start() if endpoint.startswith("http://") else None
    through = {**(options or {}), "endpoint_url": proxy.url} if proxy else options
    rows = []
    try:
        for fmt in ("objects", "shards"):
            loader = training_loader(dataclasses.replace(cfg, data_format=fmt), through)
            if proxy:
                proxy.reset()  # count the epoch, not the manifest and index reads
            timed = time_loader(loader)
            gets = proxy.counts()["requests"].get("GET", 0) if proxy else float("nan")
            rows.append({"format": fmt, **timed, "GET requests": gets})
    finally:
        if proxy:
            proxy.stop()
    return pd.DataFrame(rows).set_index("format")


# S3 Standard's price for GET (and SELECT and other read) requests in US East (N. Virginia), as
# aws.amazon.com/s3/pricing listed it in 2025; other regions and classes differ: pass your own.
S3_GET_USD_PER_1000 = 0.0004
S3_GET_PRICE_AS_OF = "S3 Standard, us-east-1, 2025 price list"
STANFORD_DOGS_IMAGES = 20_580
EPOCHS_OF_A_RUN = 90  # an ImageNet-style schedule


def request_cost(
    formats: pd.DataFrame,
    usd_per_1000: float = S3_GET_USD_PER_1000,
    full_images: int = STANFORD_DOGS_IMAGES,
    epochs: int = EPOCHS_OF_A_RUN,
) -> pd.DataFrame:
    """What the GET requests of :func:`compare_formats` cost: per epoch here, and scaled to
    ``full_images`` for ``epochs`` at the same GETs per image (shards of the same size)."""
    per_image = formats["GET requests"] / formats["images"]
    full = per_image * full_images
    return formats[["images", "GET requests"]].assign(**{
        "USD per epoch": formats["GET requests"] * usd_per_1000 / 1000,
        f"GETs per epoch, {full_images:,} images": full.round(),
        f"USD for {epochs} epochs": full * epochs * usd_per_1000 / 1000,
    })  # fmt: skip
