"""Checkpoints: what a run saves and resumes from, and the model cache of inference.

Two kinds, one per strategy. Under DDP rank 0 writes the whole training state in one
``checkpoint.pt`` (:mod:`helpers.loop.whole`); under FSDP every rank writes its shards, in a new
folder ``sharded/<UTC time>/`` each time (:mod:`helpers.loop.sharded`). Either holds the
model, optimizer, scheduler, epoch and data position, config, class list and the epoch's
metrics; every rank resumes from the same one; inference rebuilds the whole model from either,
on one machine. A run resumes only a checkpoint of its own strategy. Loading never runs code:
``torch.load(weights_only=True)``, and DCP's tensors.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING

from helpers.config import STRATEGIES
from helpers.errors import CheckpointError, NotFound
from helpers.loop import sharded, whole
from helpers.loop.model import build_model
from helpers.s3 import storage

if TYPE_CHECKING:  # names for annotations only: importing costs nothing at run time
    import torch

    from helpers.config import Rank, TrainConfig
    from helpers.loop.state import TrainState

log = logging.getLogger(__name__)

REQUIRED = ("classes", "config")  # what inference needs from a checkpoint, and the weights
# What must not change between a run and its resumption: the split, the data, the model, and
# the batch (a position in an epoch is a count of batches; the learning rate scales with it).
RESUME_FIELDS = ("data_url", "arch", "image_size", "val_fraction", "seed", "batch_size")
CACHE_SIZE = 2  # models kept per process for inference (a ResNet-50 is ~100 MB)

_MODELS: OrderedDict[tuple, tuple] = OrderedDict()  # (pid, url, version) -> (model, state, dev)
_BUILDS = {"count": 0}  # models built in this process: tests check "once per worker"


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
    number of ranks (under FSDP, all but the model's and optimizer's shards)."""
    import torch

    return {
        **trained.state_dict(sharded=cfg.strategy == "fsdp"),
        "epoch": epoch,
        "step": step,
        "position": position,
        "world_size": world_size,
        "rng": torch.get_rng_state(),
        "config": asdict(cfg),
        "classes": list(classes),
        "metrics": metrics,
        "saved_at": time.time(),
    }


def save(
    cfg: TrainConfig, options: dict | None, trained: TrainState, rank: Rank, state: dict
) -> None:
    """The run's checkpoint in ``cfg.checkpoint_url``, the newest ``keep_checkpoints`` kept:
    rank 0 writes ``state`` whole (DDP), or every rank its shards and rank 0 ``state`` beside
    them (FSDP). Every rank calls it."""
    folder, keep = cfg.checkpoint_url, cfg.keep_checkpoints
    if cfg.strategy == "fsdp":
        sharded.save(folder, options, trained, state, keep)
    elif rank.rank == 0:
        whole.save(folder, options, state, keep)


def load(folder: str, options: dict | None = None, strategy: str | None = None) -> dict | None:
    """The newest checkpoint's record in ``folder``, or None if there is none: DDP's whole
    state, or FSDP's record with the URL of its shards (``"shards"``). ``strategy`` picks the
    kind; None: the newer of the two (inference). A checkpoint whose digest does not match
    raises :class:`~helpers.errors.CheckpointError`."""
    found = []
    if strategy in (None, "ddp"):
        found.append(whole.load(folder, options))
    if strategy in (None, "fsdp"):
        latest = sharded.latest(folder, options)
        found.append(latest[1] | {"shards": latest[0]} if latest else None)
    found = [s for s in found if s is not None]
    return max(found, key=lambda s: s.get("saved_at", 0.0)) if found else None


def _where(folder: str, strategy: str) -> str:
    if strategy == "fsdp":
        return f"{folder.rstrip('/')}/{sharded.FOLDER}/ (FSDP's shards)"
    return f"{whole.path(folder)} (DDP's whole model)"


def check_resume(
    cfg: TrainConfig, options: dict | None, world_size: int | None = None
) -> dict | None:
    """With ``resume=True``: the checkpoint to resume from, refused with an error naming both
    values if it is another strategy's, another run's, or already past ``epochs``; None when
    there is nothing to resume (the run starts afresh). Notebooks call it in their first cells,
    every rank again before loading."""
    if not cfg.resume:
        return None
    state = load(cfg.checkpoint_url, options, cfg.strategy)
    if state is None:
        other = next(s for s in STRATEGIES if s != cfg.strategy)
        exists = sharded.newest if other == "fsdp" else whole.exists
        if exists(cfg.checkpoint_url, options):
            raise CheckpointError(
                f"cannot resume with strategy={cfg.strategy!r} from {cfg.checkpoint_url}: it "
                f"holds a checkpoint of strategy={other!r}, {_where(cfg.checkpoint_url, other)}. "
                f"Resume it with strategy={other!r}, or give another checkpoint_url"
            )
        return None
    check_resumable(state, cfg, world_size)
    return state


def check_resumable(state: dict, cfg: TrainConfig, world_size: int | None = None) -> None:
    """Refuse to resume from a checkpoint of another run, of another number of ranks or batch
    size (its data position and learning rate would be wrong), or already past ``epochs``."""
    where = _where(cfg.checkpoint_url, cfg.strategy)
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

    if cfg.resume:
        state = check_resume(cfg, options, rank.world_size)
    else:
        state = load(cfg.checkpoint_url, options, cfg.strategy) if cfg.checkpoint_url else None
        if state is not None and not (restart and state["config"]["topic"] == cfg.topic):
            state = None  # not this job's: start afresh
        if state is not None:
            check_resumable(state, cfg, rank.world_size)
    if state is None:
        return 1, 0, None
    if "shards" in state:
        sharded.load_into(trained, state["shards"], options)
    trained.load_state_dict(state)
    if state.get("rng") is not None:
        torch.set_rng_state(state["rng"])
    step, where = state.get("step", 0), state.get("shards") or whole.path(cfg.checkpoint_url)
    log.info("resumed from %s at epoch %d step %d", where, state["epoch"], step)
    return state["epoch"] + 1, step, state.get("position")


def model_from(folder: str, options: dict | None = None) -> tuple[torch.nn.Module, dict]:
    """``(model, state)``: the trained model rebuilt whole on the CPU, in eval mode, from the
    newest checkpoint of either kind (FSDP's shards gathered here)."""
    state = load(folder, options)
    if state is None:
        raise NotFound(
            f"no checkpoint at {whole.path(folder)} or in {storage.join(folder, sharded.FOLDER)}/;"
            " train first (notebook 04) or check checkpoint_url"
        )
    where = state.get("shards") or whole.path(folder)
    needed = [*REQUIRED, *(() if "shards" in state else ("model",))]
    missing = [k for k in needed if k not in state]
    if missing:
        raise CheckpointError(
            f"{where} is not a checkpoint of helpers.train: it lacks {missing} "
            f"(expected a dict with {needed})"
        )
    model = build_model(state["config"]["arch"], len(state["classes"]))
    try:
        if "shards" in state:
            sharded.load_model(model, state["shards"], options)
        else:
            model.load_state_dict(state["model"])
    except (RuntimeError, CheckpointError) as err:  # shapes, or shards that would not load
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
    log.info("loaded the checkpoint in %s on %s", folder, device)
    return _MODELS[key]


def builds() -> int:
    """How many models this process has built (run on workers with ``client.run``)."""
    return _BUILDS["count"]


def _version(folder: str, options: dict | None) -> str:
    """What changes when a new checkpoint is written: the whole one's ETag or time, the newest
    shards' folder."""
    return f"{whole.version(folder, options)}|{sharded.newest(folder, options)}"
