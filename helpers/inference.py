"""Batch inference over S3 images with a trained checkpoint: one Dask task per work item, a batch
of keys (per-object layout) or a whole shard (one GET).

The model is loaded once per worker process (not per task) and kept
(:func:`helpers.checkpoint.cached_model`); the device is decided on the worker (its GPU if it
has one); every image's probabilities are the softmax of its own logits. Shards are read by the
training reader (:mod:`helpers.shards.read`: whole-shard GETs, retries, damaged members skipped
and named). Tasks return small rows (key, breeds, probabilities), never tensors.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from helpers import checkpoint, data
from helpers.errors import NotFound, ParameterError
from helpers.loading.objects import S3ImageDataset
from helpers.loading.transforms import decode_image, eval_transform
from helpers.shards import format as shard_format
from helpers.shards import read
from helpers.show.progress import Callback, progress

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
    fmt = shard_format.resolve_format(settings.data_format, settings.data_url, options)
    if fmt == "objects":
        keys = manifest_keys[settings.images][: settings.max_images]
        return batches(keys, settings.keys_per_task)
    index = shard_format.read_index(settings.data_url, options)
    names = {"val": ["val"], "train": ["train"], "all": ["train", "val"]}[settings.images]
    items, total = [], 0
    for entry in (e for n in names for e in index["splits"][n]["shards"]):
        if total >= settings.max_images:
            break
        items.append(entry["name"])
        total += entry["images"]
    return items


def predict(
    settings: InferenceConfig,
    options: dict | None,
    item: Sequence[str] | str,
    threads: int = 0,
    top: int = 5,
) -> list[dict]:
    """Predict one work item of ``settings``: a batch of keys, or a shard's name; one row (with
    the image's original key) per readable image."""
    import torch

    torch.set_num_threads(threads or os.cpu_count() or 1)  # per task: it outlives the task
    model, state, device = checkpoint.cached_model(settings.checkpoint_url, options)
    classes, size = state["classes"], state["config"]["image_size"]
    if isinstance(item, str):
        keys, images, labels = _shard_samples(settings.data_url, options, item, classes, size)
    else:
        labels = [_label(k, classes) for k in item]
        tf = eval_transform(size)
        ds = S3ImageDataset(settings.data_url, item, labels, options, tf, draft=size)
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


def _label(key: str, classes: Sequence[str]) -> int:
    """The class index of ``key`` among the checkpoint's ``classes``; a key of a class the model
    was not trained on is an error naming both."""
    folder = data.class_folder(key)
    if folder not in classes:
        raise ParameterError(
            f"{key}: its class {folder!r} is not one of the {len(classes)} classes the "
            "checkpoint was trained on; predict images of the dataset it trained on"
        )
    return list(classes).index(folder)


def _shard_samples(url: str, options: dict | None, name: str, classes, size: int) -> tuple:
    """Keys, images and labels of one shard, read whole by the training reader; a damaged or
    undecodable member is skipped and named. A sample's label is its key's class among the
    checkpoint's ``classes`` (the shards' own label members number the classes of the dataset
    they were built from, which need not be the checkpoint's): a class the checkpoint does not
    know is an error naming the key."""
    tf = eval_transform(size)
    stats = dict.fromkeys(("corrupt", "missing_shards", "damaged_shards"), 0)
    where = shard_format.location(url)
    rebuild = shard_format.rebuild_command(url)
    parts = [(name, 0, 1 << 62)]  # the whole shard
    raw = read.raw_samples(
        where,
        options,
        parts,
        classes=len(classes),
        prefetch=0,
        stats=stats,
        warn=True,
        rebuild=rebuild,
    )
    keys, images, labels = [], [], []
    for key, blob, _, shard in raw:
        label = _label(key, classes)
        try:
            image = decode_image(blob, key, draft=size)
        except ValueError as err:
            log.warning("skipping %s in shard %s: %s", key, shard, err)
            continue
        keys.append(key)
        images.append(tf(image))
        labels.append(label)
    if stats["missing_shards"]:
        raise NotFound(f"shard {name} is missing from {where}; rebuild the shards with: {rebuild}")
    return keys, images, labels


def batches(keys: Sequence[str], size: int) -> list[list[str]]:
    """``keys`` in lists of ``size``: the work items of the per-object path."""
    keys = list(keys)
    return [keys[i : i + size] for i in range(0, len(keys), size)]


def predict_on_cluster(
    client: Client,
    settings: InferenceConfig,
    options: dict | None,
    items: list,
    callback: Callback | None = None,
) -> list[dict]:
    """One task per work item, spread over the workers; rows in the order of ``items``.

    Progress (items done, as they finish): a notebook bar or log lines, and ``callback``."""
    from distributed import as_completed

    futures = [
        client.submit(predict, settings, options, item, threads=1, pure=False) for item in items
    ]
    with progress(len(futures), "inference", callback, unit="task") as bar:
        for _ in as_completed(futures):  # a failed batch raises below, in gather, with its error
            bar.update()
    return [row for part in client.gather(futures) for row in part]


def predict_locally(
    settings: InferenceConfig,
    options: dict | None,
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
        for row in predict(settings, options, item, threads=threads)
    ]


def warm(settings: InferenceConfig, options: dict | None, item: Sequence[str] | str) -> str:
    """Get this process ready (``client.run`` it on every worker): load the model and predict
    one work item, so first-call costs (imports, connections, kernel plans) are paid before
    timing. Returns the device."""
    predict(settings, options, item, threads=1)
    return str(checkpoint.cached_model(settings.checkpoint_url, options)[2])
