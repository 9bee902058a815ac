"""Batch inference over S3 images with a trained checkpoint, one batch of keys per Dask task.

The model is loaded once per worker process (not per task) and kept; the device is decided on
the worker (its GPU if it has one); every image's probabilities are the softmax of its own
logits. Tasks return small rows (key, breeds, probabilities), never tensors.
"""

from __future__ import annotations

import logging
import os

from helpers import data, train

log = logging.getLogger(__name__)

_MODELS: dict[tuple, tuple] = {}  # (pid, checkpoint_url) -> (model, state, device)
_BUILDS = {"count": 0}  # models built in this process: tests check "once per worker"
REQUIRED = ("model", "classes", "config")


def load_model(checkpoint_url: str, options: dict | None = None):
    """``(model, state, device)`` for ``checkpoint_url``, built once per process and kept."""
    import torch

    key = (os.getpid(), checkpoint_url, _version(checkpoint_url, options))
    if key not in _MODELS:
        state = train.load_checkpoint(checkpoint_url, options)
        where = train.checkpoint_path(checkpoint_url)
        if state is None:
            raise FileNotFoundError(
                f"no checkpoint at {where}; run notebook 04 first or check checkpoint_url"
            )
        missing = [k for k in REQUIRED if k not in state]
        if missing:
            raise ValueError(
                f"{where} is not a checkpoint of helpers.train: it lacks {missing} "
                f"(expected a dict with {list(REQUIRED)})"
            )
        model = train.build_model(state["config"]["arch"], len(state["classes"]))
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as err:
            raise ValueError(
                f"{where} does not fit a {state['config']['arch']} with "
                f"{len(state['classes'])} classes: {err}"
            ) from err
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = model.to(device).eval()
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        _MODELS[key] = (model, state, device)
        _BUILDS["count"] += 1
        log.info("loaded %s on %s", where, device)
    return _MODELS[key]


def _version(checkpoint_url: str, options: dict | None) -> str:
    """The checkpoint's ETag or mtime: a retrained checkpoint is loaded again, not served stale."""
    from helpers import storage

    url = train.checkpoint_path(checkpoint_url)
    try:
        info = storage.filesystem(url, options).info(storage.split_url(url)[1])
    except FileNotFoundError:
        return ""
    return str(info.get("ETag") or info.get("mtime") or info.get("LastModified") or "")


def builds() -> int:
    """How many models this process has built (run on workers with ``client.run``)."""
    return _BUILDS["count"]


def predict(
    checkpoint_url: str, options: dict | None, data_url: str, keys, threads: int = 0, top: int = 5
) -> list[dict]:
    """Predict a batch of ``keys`` under ``data_url``: one row per readable image."""
    import torch

    torch.set_num_threads(threads or os.cpu_count() or 1)  # per task: it outlives the task
    model, state, device = load_model(checkpoint_url, options)
    classes = state["classes"]
    size = state["config"]["image_size"]
    ds = data.S3ImageDataset(
        data_url, keys, classes, options, data.eval_transform(size), draft=size
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


def batches(keys, size: int) -> list[list[str]]:
    keys = list(keys)
    return [keys[i : i + size] for i in range(0, len(keys), size)]


def predict_on_cluster(
    client, checkpoint_url: str, options: dict | None, data_url: str, keys, batch_size: int = 64
) -> list[dict]:
    """One task per batch of keys, spread over the workers; rows in the order of ``keys``."""
    futures = [
        client.submit(predict, checkpoint_url, options, data_url, b, threads=1, pure=False)
        for b in batches(keys, batch_size)
    ]
    return [row for part in client.gather(futures) for row in part]


def predict_locally(
    checkpoint_url: str,
    options: dict | None,
    data_url: str,
    keys,
    batch_size: int = 64,
    threads: int = 0,
) -> list[dict]:
    """The baseline: the same batches, one after another, in this process.

    ``threads``: PyTorch threads (0: one per core, PyTorch's default).
    """
    return [
        row
        for b in batches(keys, batch_size)
        for row in predict(checkpoint_url, options, data_url, b, threads=threads)
    ]


def warm(checkpoint_url: str, options: dict | None, data_url: str, keys) -> str:
    """Get this process ready (``client.run`` it on every worker): load the model and predict
    ``keys`` once, so first-call costs (imports, connections, kernel plans) are paid before
    timing. Returns the device."""
    predict(checkpoint_url, options, data_url, keys, threads=1)
    return str(load_model(checkpoint_url, options)[2])
