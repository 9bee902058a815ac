"""Batch inference over S3 images with a trained checkpoint, one batch of keys per Dask task.

The model is loaded once per worker process (not per task) and kept
(:func:`helpers.checkpoint.cached_model`); the device is decided on the worker (its GPU if it
has one); every image's probabilities are the softmax of its own logits. Tasks return small
rows (key, breeds, probabilities), never tensors.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from helpers import checkpoint, data, objects, transforms
from helpers.progress import Callback, progress

if TYPE_CHECKING:  # names for annotations only: importing costs nothing at run time
    from distributed import Client

log = logging.getLogger(__name__)


def builds() -> int:
    """How many models this process has built (run on workers with ``client.run``)."""
    return checkpoint.builds()


def predict(
    checkpoint_url: str,
    options: dict | None,
    data_url: str,
    keys: Sequence[str],
    threads: int = 0,
    top: int = 5,
) -> list[dict]:
    """Predict a batch of ``keys`` under ``data_url``: one row per readable image."""
    import torch

    torch.set_num_threads(threads or os.cpu_count() or 1)  # per task: it outlives the task
    model, state, device = checkpoint.cached_model(checkpoint_url, options)
    classes = state["classes"]
    size = state["config"]["image_size"]
    ds = objects.S3ImageDataset(
        data_url, keys, classes, options, transforms.eval_transform(size), draft=size
    )
    samples = ds.samples(list(range(len(keys))))
    if not samples:
        return []
    idx, images, labels = zip(*samples, strict=True)
    with torch.inference_mode():
        logits = model(torch.stack(images).to(device)).float()
    probs = logits.softmax(dim=1)  # row by row: each image's own distribution
    k = min(top, len(classes))
    top_p, top_i = probs.topk(k, dim=1)
    rows = []
    for j, i in enumerate(idx):
        rows.append(
            {
                "key": keys[i],
                "true": data.breed(classes[labels[j]]),
                "predicted": data.breed(classes[int(top_i[j, 0])]),
                "probability": float(top_p[j, 0]),
                "top5": [
                    (data.breed(classes[int(c)]), round(float(p), 4))
                    for p, c in zip(top_p[j], top_i[j], strict=True)
                ],
            }
        )
    return rows


def batches(keys: Sequence[str], size: int) -> list[list[str]]:
    keys = list(keys)
    return [keys[i : i + size] for i in range(0, len(keys), size)]


def predict_on_cluster(
    client: Client,
    checkpoint_url: str,
    options: dict | None,
    data_url: str,
    keys: Sequence[str],
    batch_size: int = 64,
    callback: Callback | None = None,
) -> list[dict]:
    """One task per batch of keys, spread over the workers; rows in the order of ``keys``.

    Progress (batches done, as they finish): a notebook bar or log lines, and ``callback``."""
    from distributed import as_completed

    futures = [
        client.submit(predict, checkpoint_url, options, data_url, b, threads=1, pure=False)
        for b in batches(keys, batch_size)
    ]
    with progress(len(futures), "inference", callback, unit="batch") as bar:
        for _ in as_completed(futures):  # a failed batch raises below, in gather, with its error
            bar.update()
    return [row for part in client.gather(futures) for row in part]


def predict_locally(
    checkpoint_url: str,
    options: dict | None,
    data_url: str,
    keys: Sequence[str],
    batch_size: int = 64,
    threads: int = 0,
    callback: Callback | None = None,
) -> list[dict]:
    """The baseline: the same batches, one after another, in this process.

    ``threads``: PyTorch threads (0: one per core, PyTorch's default).
    """
    return [
        row
        for b in progress(batches(keys, batch_size), "inference (local)", callback, unit="batch")
        for row in predict(checkpoint_url, options, data_url, b, threads=threads)
    ]


def warm(checkpoint_url: str, options: dict | None, data_url: str, keys: Sequence[str]) -> str:
    """Get this process ready (``client.run`` it on every worker): load the model and predict
    ``keys`` once, so first-call costs (imports, connections, kernel plans) are paid before
    timing. Returns the device."""
    predict(checkpoint_url, options, data_url, keys, threads=1)
    return str(checkpoint.cached_model(checkpoint_url, options)[2])
