"""Batch inference over S3 images with a trained checkpoint: one Dask task per work item, a batch
of keys (per-object layout) or a whole shard (one GET).

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

from helpers import checkpoint, data, objects, shards, storage, stream, transforms
from helpers.progress import Callback, progress

if TYPE_CHECKING:  # names for annotations only: importing costs nothing at run time
    from distributed import Client

    from helpers.config import InferenceConfig

log = logging.getLogger(__name__)


def builds() -> int:
    """How many models this process has built (run on workers with ``client.run``)."""
    return checkpoint.builds()


def work(settings: InferenceConfig, options: dict | None, split: data.Split) -> list:
    """What the tasks predict: batches of ``keys_per_task`` keys (objects), or whole shards of the
    chosen split (shards: one GET each), up to ``max_images`` images either way."""
    manifest_keys = {"val": split.val, "train": split.train, "all": split.train + split.val}
    if stream.resolve_format(settings.data_format, settings.data_url, options) == "objects":
        keys = manifest_keys[settings.images][: settings.max_images]
        return batches(keys, settings.keys_per_task)
    index = shards.read_index(settings.data_url, options)
    names = {"val": ["val"], "train": ["train"], "all": ["train", "val"]}[settings.images]
    items, total = [], 0
    for entry in (e for n in names for e in index["splits"][n]["shards"]):
        if total >= settings.max_images:
            break
        items.append(entry["name"])
        total += entry["images"]
    return items


def predict(
    checkpoint_url: str,
    options: dict | None,
    data_url: str,
    item: Sequence[str] | str,
    threads: int = 0,
    top: int = 5,
) -> list[dict]:
    """Predict one work item under ``data_url``: a batch of keys, or a shard's name; one row
    (with the image's original key) per readable image."""
    import torch

    torch.set_num_threads(threads or os.cpu_count() or 1)  # per task: it outlives the task
    model, state, device = checkpoint.cached_model(checkpoint_url, options)
    classes, size = state["classes"], state["config"]["image_size"]
    tf = transforms.eval_transform(size)
    if isinstance(item, str):
        keys, images, labels = _shard_samples(data_url, options, item, tf, size)
    else:
        ds = objects.S3ImageDataset(data_url, item, classes, options, tf, draft=size)
        samples = ds.samples(list(range(len(item))))
        keys = [item[i] for i, _, _ in samples]
        images, labels = [x for _, x, _ in samples], [y for _, _, y in samples]
    if not keys:
        return []
    with torch.inference_mode():
        logits = model(torch.stack(images).to(device)).float()
    probs = logits.softmax(dim=1)  # row by row: each image's own distribution
    top_p, top_i = probs.topk(min(top, len(classes)), dim=1)
    return [
        {
            "key": key,
            "true": data.breed(classes[label]),
            "predicted": data.breed(classes[int(top_i[j, 0])]),
            "probability": float(top_p[j, 0]),
            "top5": [
                (data.breed(classes[int(c)]), round(float(p), 4))
                for p, c in zip(top_p[j], top_i[j], strict=True)
            ],
        }
        for j, (key, label) in enumerate(zip(keys, labels, strict=True))
    ]


def _shard_samples(data_url: str, options: dict | None, name: str, tf, size: int) -> tuple:
    """Keys, images and labels of one shard, read with one GET; a bad member is skipped."""
    url = storage.join(shards.location(data_url), name)
    blob = storage.filesystem(url, options).cat_file(storage.split_url(url)[1])
    keys, images, labels = [], [], []
    for key, members in shards.read_shard(blob):
        try:
            image = transforms.decode_image(members["jpg"], key, draft=size)
            label = int(members["cls"])
        except (KeyError, ValueError) as err:
            log.warning("skipping %s in shard %s: %s", key, url, err)
            continue
        keys.append(key + ".jpg")
        images.append(tf(image))
        labels.append(label)
    return keys, images, labels


def batches(keys: Sequence[str], size: int) -> list[list[str]]:
    """``keys`` in lists of ``size``: the work items of the per-object path."""
    keys = list(keys)
    return [keys[i : i + size] for i in range(0, len(keys), size)]


def predict_on_cluster(
    client: Client,
    checkpoint_url: str,
    options: dict | None,
    data_url: str,
    items: list,
    callback: Callback | None = None,
) -> list[dict]:
    """One task per work item, spread over the workers; rows in the order of ``items``.

    Progress (items done, as they finish): a notebook bar or log lines, and ``callback``."""
    from distributed import as_completed

    futures = [
        client.submit(predict, checkpoint_url, options, data_url, item, threads=1, pure=False)
        for item in items
    ]
    with progress(len(futures), "inference", callback, unit="task") as bar:
        for _ in as_completed(futures):  # a failed batch raises below, in gather, with its error
            bar.update()
    return [row for part in client.gather(futures) for row in part]


def predict_locally(
    checkpoint_url: str,
    options: dict | None,
    data_url: str,
    items: list,
    threads: int = 0,
    callback: Callback | None = None,
) -> list[dict]:
    """The baseline: the same work items, one after another, in this process.

    ``threads``: PyTorch threads (0: one per core, PyTorch's default).
    """
    return [
        row
        for item in progress(items, "inference (local)", callback, unit="task")
        for row in predict(checkpoint_url, options, data_url, item, threads=threads)
    ]


def warm(
    checkpoint_url: str, options: dict | None, data_url: str, item: Sequence[str] | str
) -> str:
    """Get this process ready (``client.run`` it on every worker): load the model and predict
    one work item, so first-call costs (imports, connections, kernel plans) are paid before
    timing. Returns the device."""
    predict(checkpoint_url, options, data_url, item, threads=1)
    return str(checkpoint.cached_model(checkpoint_url, options)[2])
