"""Checkpoints: rank 0 writes them whole, every rank reads the same one, inference keeps a few.

A checkpoint is one ``checkpoint.pt`` in a folder (local or ``s3://``): model, optimizer,
scheduler, epoch, config, class list and the epoch's metrics. Loading uses
``torch.load(weights_only=True)``: tensors and plain containers only, never arbitrary code.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import tempfile
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from helpers.errors import CheckpointError, NotFound
from helpers.loop.model import build_model
from helpers.s3 import retry, storage

if TYPE_CHECKING:  # names for annotations only: importing costs nothing at run time
    import torch

    from helpers.config import Rank, TrainConfig
    from helpers.loop.state import TrainState

log = logging.getLogger(__name__)

NAME = "checkpoint.pt"
REQUIRED = ("model", "classes", "config")  # what inference needs from a checkpoint
# What must not change between a run and its resumption: the split, the data, the model, and
# the batch (a position in an epoch is a count of batches; the learning rate scales with it).
RESUME_FIELDS = ("data_url", "arch", "image_size", "val_fraction", "seed", "batch_size")
TRAILER = b"\nhelpers.checkpoint sha256:"  # then 64 hex digits: the digest of all before it
CACHE_SIZE = 2  # models kept per process for inference (a ResNet-50 is ~100 MB)

_MODELS: OrderedDict[tuple, tuple] = OrderedDict()  # (pid, url, version) -> (model, state, dev)
_BUILDS = {"count": 0}  # models built in this process: tests check "once per worker"


def path(folder: str) -> str:
    """The checkpoint's URL in ``folder``."""
    return storage.join(folder, NAME)


def save(folder: str, options: dict | None, state: dict, keep: int = 2) -> None:
    """Write ``state`` whole and verifiably; keep the ``keep`` newest checkpoints.

    The bytes end with a sha256 trailer that :func:`load` checks. A local file is written to a
    temporary name no one can guess (``.checkpoint.pt.<random>.tmp``, created exclusively: no
    link planted there is followed), synced, renamed over ``checkpoint.pt`` and the folder
    synced (a kill or a power cut leaves the previous one whole); an S3 object is one PUT, whole
    or absent. The previous checkpoint is first renamed ``checkpoint-<UTC time>.pt`` (S3: a
    server-side copy), and older ones beyond ``keep`` go. Every storage call is retried through
    transient failures, as reads are (:func:`helpers.s3.retry.retrying`).
    """
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    blob = buf.getvalue()
    blob += TRAILER + hashlib.sha256(blob).hexdigest().encode()
    url = path(folder)
    protocol, key = storage.split_url(url)
    fs = storage.filesystem(url, options)
    where = storage.describe(url, options)
    with storage.explained(url, options):
        if retry.retrying(lambda: fs.exists(key), where) and keep > 1:
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
            retry.retrying(lambda: fs.mv(key, key[: -len(".pt")] + f"-{stamp}.pt"), where)
        if protocol == "file":
            _write_local(key, blob)
        else:  # S3 objects appear whole or not at all
            retry.retrying(lambda: fs.pipe_file(key, blob), where)
        older = _versions(fs, key, where)
        for old in older[: max(0, len(older) - (keep - 1))]:
            try:
                retry.retrying(lambda old=old: fs.rm(old), where)
            except FileNotFoundError:
                pass  # gone already: a retried rm whose first answer was lost


def _write_local(key: str, blob: bytes) -> None:
    folder = os.path.dirname(key)
    os.makedirs(folder, exist_ok=True)
    # A random name, created exclusively (O_EXCL, mode 0600), in the checkpoint's own folder:
    # no one can plant a link where it will be, and the rename stays within one filesystem.
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(key)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, key)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # The rename itself is an entry in the folder: sync it, or a power cut may undo it.
    dir_fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _versions(fs, key: str, where: str) -> list[str]:
    """The older checkpoints beside ``key``, oldest first (their names sort by time)."""
    stem = key.rsplit("/", 1)[-1][: -len(".pt")]
    try:
        names = retry.retrying(lambda: fs.ls(key.rsplit("/", 1)[0], detail=False), where)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.rsplit("/", 1)[-1].startswith(f"{stem}-"))


def state_of(
    cfg: TrainConfig,
    trained: TrainState,
    epoch: int,
    classes: Sequence[str],
    metrics: dict,
    step: int = 0,
    position: dict | None = None,
    world_size: int = 1,
) -> dict:
    """What :func:`save` writes: the training state after ``epoch`` whole epochs and ``step``
    steps of the next, whose data position is ``position``, with the run's config, classes and
    number of ranks."""
    import torch

    return {
        **trained.state_dict(),
        "epoch": epoch,
        "step": step,
        "position": position,
        "world_size": world_size,
        "rng": torch.get_rng_state(),
        "config": asdict(cfg),
        "classes": list(classes),
        "metrics": metrics,
    }


def load(folder: str, options: dict | None = None) -> dict | None:
    """The newest checkpoint dict in ``folder`` (its digest checked), or None if there is none.

    ``checkpoint.pt`` missing while an older one exists (a kill between :func:`save`'s two
    renames) means the older one. A checkpoint whose digest does not match raises
    :class:`~helpers.errors.CheckpointError`.
    """
    url = path(folder)
    fs = storage.filesystem(url, options)
    key = storage.split_url(url)[1]
    where = storage.describe(url, options)
    with storage.explained(url, options):
        try:
            raw = retry.retrying(lambda: fs.cat_file(key), where)
        except FileNotFoundError:
            older = _versions(fs, key, where)
            if not older:
                return None
            url, raw = (
                f"{url.rsplit('/', 1)[0]}/{older[-1].rsplit('/', 1)[-1]}",
                retry.retrying(lambda: fs.cat_file(older[-1]), where),
            )
    return _verified(raw, url)


def _verified(raw: bytes, url: str) -> dict:
    import torch

    body, tail = raw[: -len(TRAILER) - 64], raw[-len(TRAILER) - 64 :]
    if tail.startswith(TRAILER):
        if hashlib.sha256(body).hexdigest().encode() != tail[len(TRAILER) :]:
            raise CheckpointError(
                f"{url} is corrupt: its sha256 does not match its contents (a damaged copy or "
                "a partial write); delete it to resume from the previous checkpoint"
            )
        raw = body
    try:
        return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated, corrupt, or not torch.save's format
        raise CheckpointError(
            f"{url} is not a readable checkpoint ({type(err).__name__}: {err})"
        ) from err


def check_resumable(state: dict, cfg: TrainConfig, world_size: int | None = None) -> None:
    """Refuse to resume from a checkpoint of another run, of another number of ranks or batch
    size (its data position and learning rate would be wrong), or already past ``epochs``."""
    where = path(cfg.checkpoint_url)
    changed = [
        f"{k}: {state['config'].get(k)!r} -> {getattr(cfg, k)!r}"
        for k in RESUME_FIELDS
        if k in state["config"] and state["config"][k] != getattr(cfg, k)
    ]
    saved_ranks = state.get("world_size")
    if world_size is not None and saved_ranks is not None and saved_ranks != world_size:
        changed.append(f"world_size: {saved_ranks} -> {world_size}")
    if changed:
        raise CheckpointError(
            f"cannot resume from {where}: {'; '.join(changed)}. The split, the data position "
            "within an epoch and the learning rate's scaling are those of the run that wrote it: "
            "resume with the same values (and as many ranks), or start afresh"
        )
    if state["epoch"] >= cfg.epochs:
        raise CheckpointError(
            f"{where} is already at epoch {state['epoch']}; resume needs "
            f"epochs > {state['epoch']} (got epochs={cfg.epochs})"
        )


def resume(
    cfg: TrainConfig, options: dict | None, trained: TrainState, rank: Rank, restart: bool = False
) -> tuple[int, int, dict | None]:
    """Load the run's checkpoint into ``trained``; returns ``(epoch, step, position)`` to start
    from: ``step`` steps into ``epoch`` at data ``position`` (None: its start).

    ``restart``: an automatic restart resumes only this job's own checkpoint (the same
    ``topic``), never one an earlier run left in the folder, unless ``cfg.resume``.
    """
    import torch

    state = load(cfg.checkpoint_url, options) if cfg.checkpoint_url else None
    if state is None or (restart and not cfg.resume and state["config"]["topic"] != cfg.topic):
        return 1, 0, None
    check_resumable(state, cfg, rank.world_size)
    trained.load_state_dict(state)
    if state.get("rng") is not None:
        torch.set_rng_state(state["rng"])
    step = state.get("step", 0)
    log.info("resumed from %s at epoch %d step %d", path(cfg.checkpoint_url), state["epoch"], step)
    return state["epoch"] + 1, step, state.get("position")


def model_from(folder: str, options: dict | None = None) -> tuple[torch.nn.Module, dict]:
    """``(model, state)``: the trained model rebuilt on the CPU, in eval mode."""
    where = path(folder)
    state = load(folder, options)
    if state is None:
        raise NotFound(
            f"no checkpoint at {where}; train first (notebook 04) or check checkpoint_url"
        )
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise CheckpointError(
            f"{where} is not a checkpoint of helpers.train: it lacks {missing} "
            f"(expected a dict with {list(REQUIRED)})"
        )
    model = build_model(state["config"]["arch"], len(state["classes"]))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise CheckpointError(
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
