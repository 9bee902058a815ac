"""Checkpoints: rank 0 writes them whole, every rank reads the same one, inference keeps a few.

A checkpoint is one ``checkpoint.pt`` in a folder (local or ``s3://``): model, optimizer,
scheduler, epoch, config, class list and the epoch's metrics. Loading uses
``torch.load(weights_only=True)``: tensors and plain containers only, never arbitrary code.
"""

from __future__ import annotations

import io
import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING

from helpers import storage
from helpers.model import build_model

if TYPE_CHECKING:  # names for annotations only: importing costs nothing at run time
    import torch
    from torch.optim.lr_scheduler import LRScheduler

    from helpers.config import TrainConfig

log = logging.getLogger(__name__)

NAME = "checkpoint.pt"
REQUIRED = ("model", "classes", "config")  # what inference needs from a checkpoint
# What must not change between a run and its resumption: the split, the data, the model.
RESUME_FIELDS = ("data_url", "arch", "image_size", "val_fraction", "seed")
CACHE_SIZE = 2  # models kept per process for inference (a ResNet-50 is ~100 MB)

_MODELS: OrderedDict[tuple, tuple] = OrderedDict()  # (pid, url, version) -> (model, state, dev)
_BUILDS = {"count": 0}  # models built in this process: tests check "once per worker"


def path(folder: str) -> str:
    """The checkpoint's URL in ``folder``."""
    return storage.join(folder, NAME)


def save(folder: str, options: dict | None, state: dict) -> None:
    """Write ``state`` whole: a local file is written then renamed, an S3 object is one PUT."""
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    url = path(folder)
    protocol, key = storage.split_url(url)
    try:
        if protocol == "file":  # a kill never leaves half a file under the real name
            os.makedirs(os.path.dirname(key), exist_ok=True)
            with open(key + ".tmp", "wb") as f:
                f.write(buf.getvalue())
            os.replace(key + ".tmp", key)
        else:  # S3 objects appear whole or not at all
            storage.filesystem(url, options).pipe_file(key, buf.getvalue())
    except OSError as err:
        raise storage.StorageError(storage.explain(err, url, options)) from err


def state_of(
    cfg: TrainConfig,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: LRScheduler,
    epoch: int,
    classes: Sequence[str],
    metrics: dict,
    scaler: torch.amp.GradScaler | None = None,
) -> dict:
    """What :func:`save` writes at the end of an epoch (``model`` is the bare module)."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,
        "config": asdict(cfg),
        "classes": list(classes),
        "metrics": metrics,
    }


def load(folder: str, options: dict | None = None) -> dict | None:
    """The checkpoint dict in ``folder``, or None if there is none yet."""
    import torch

    url = path(folder)
    try:
        raw = storage.filesystem(url, options).cat_file(storage.split_url(url)[1])
    except FileNotFoundError:
        return None
    except Exception as err:  # noqa: BLE001 - one clear message for every backend error
        raise storage.StorageError(storage.explain(err, url, options)) from err
    try:
        return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated, corrupt, or not torch.save's format
        raise ValueError(
            f"{url} is not a readable checkpoint ({type(err).__name__}: {err})"
        ) from err


def check_resumable(state: dict, cfg: TrainConfig) -> None:
    """Refuse to resume from a checkpoint of another run (or one already past ``epochs``)."""
    where = path(cfg.checkpoint_url)
    changed = [
        f"{k}: {state['config'].get(k)!r} -> {getattr(cfg, k)!r}"
        for k in RESUME_FIELDS
        if state["config"].get(k) != getattr(cfg, k)
    ]
    if changed:
        raise ValueError(
            f"cannot resume from {where}: {'; '.join(changed)} (a changed split "
            "would leak validation images into training); keep them or start afresh"
        )
    if state["epoch"] >= cfg.epochs:
        raise ValueError(
            f"{where} is already at epoch {state['epoch']}; resume needs "
            f"epochs > {state['epoch']} (got epochs={cfg.epochs})"
        )


def resume(
    cfg: TrainConfig,
    options: dict | None,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: LRScheduler,
    scaler: torch.amp.GradScaler | None = None,
) -> int:
    """Load the run's checkpoint into the given objects; returns the epoch to start from."""
    state = load(cfg.checkpoint_url, options)
    if state is None:
        return 1
    check_resumable(state, cfg)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    log.info("resumed from %s at epoch %d", path(cfg.checkpoint_url), state["epoch"])
    return state["epoch"] + 1


def model_from(folder: str, options: dict | None = None) -> tuple[torch.nn.Module, dict]:
    """``(model, state)``: the trained model rebuilt on the CPU, in eval mode."""
    where = path(folder)
    state = load(folder, options)
    if state is None:
        raise FileNotFoundError(
            f"no checkpoint at {where}; train first (notebook 04) or check checkpoint_url"
        )
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise ValueError(
            f"{where} is not a checkpoint of helpers.train: it lacks {missing} "
            f"(expected a dict with {list(REQUIRED)})"
        )
    model = build_model(state["config"]["arch"], len(state["classes"]))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise ValueError(
            f"{where} does not fit a {state['config']['arch']} with "
            f"{len(state['classes'])} classes: {err}"
        ) from err
    return model.eval(), state


def cached_model(
    folder: str, options: dict | None = None
) -> tuple[torch.nn.Module, dict, torch.device]:
    """``(model, state, device)``, built once per process and checkpoint version and kept.

    The cache holds the last :data:`CACHE_SIZE` checkpoints: a retrained checkpoint (new ETag or
    mtime) is loaded again, and old models are dropped instead of piling up.
    """
    import torch

    key = (os.getpid(), folder, _version(folder, options))
    if key in _MODELS:
        _MODELS.move_to_end(key)
        return _MODELS[key]
    model, state = model_from(folder, options)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    _MODELS[key] = (model, state, device)
    while len(_MODELS) > CACHE_SIZE:
        _MODELS.popitem(last=False)
    _BUILDS["count"] += 1
    log.info("loaded %s on %s", path(folder), device)
    return _MODELS[key]


def builds() -> int:
    """How many models this process has built (run on workers with ``client.run``)."""
    return _BUILDS["count"]


def _version(folder: str, options: dict | None) -> str:
    url = path(folder)
    try:
        info = storage.filesystem(url, options).info(storage.split_url(url)[1])
    except FileNotFoundError:
        return ""
    return str(info.get("ETag") or info.get("mtime") or info.get("LastModified") or "")
