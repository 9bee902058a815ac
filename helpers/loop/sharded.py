"""The training state sharded, as FSDP's ranks hold it: every rank writes its own shard.

``torch.distributed.checkpoint`` (DCP) saves each rank's shards of the parameters and the
optimizer's state in parallel, one file per rank plus its ``.metadata``, and loads them back
into ranks sharded the same way, or into one whole model in one process (inference). A save
goes to a new folder, ``<checkpoint_url>/sharded/<UTC time>/``, never over an older one: a
local folder through DCP's own writer, ``s3://`` through its fsspec writer (with this project's
S3 settings). Rank 0 writes the small rest of the state (epoch, data position, scheduler,
config, classes, metrics) last, as ``meta.pt`` (:mod:`helpers.loop.whole`'s sealed format):
a folder counts once it has one, so a save cut short is never resumed from. Then the oldest
beyond the newest ``keep`` go, with any unfinished folder older than the newest finished one.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from helpers.errors import CheckpointError, DaskDLError
from helpers.loop import parallel, whole
from helpers.s3 import retry, storage

if TYPE_CHECKING:  # names for annotations only: importing costs nothing at run time
    import torch

    from helpers.loop.state import TrainState

log = logging.getLogger(__name__)

FOLDER = "sharded"  # under checkpoint_url
META = "meta.pt"  # written last, by rank 0: the save is complete


def _stamp(device: torch.device) -> str:
    """Rank 0's UTC time in microseconds, the same string on every rank (a broadcast)."""
    import time

    import torch
    import torch.distributed as dist

    now = torch.tensor([time.time_ns() // 1000], dtype=torch.int64, device=device)
    if dist.is_initialized():
        dist.broadcast(now, 0)
    return datetime.fromtimestamp(now.item() / 1e6, timezone.utc).strftime("%Y%m%dT%H%M%S%f")


def _writer(url: str, options: dict | None):
    import torch.distributed.checkpoint as dcp

    protocol, key = storage.split_url(url)
    if protocol == "file":
        return dcp.FileSystemWriter(key)  # synced files, renamed into place
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    return FsspecWriter(url, sync_files=False, **storage.s3fs_kwargs(options))


def _reader(url: str, options: dict | None):
    import torch.distributed.checkpoint as dcp

    protocol, key = storage.split_url(url)
    if protocol == "file":
        return dcp.FileSystemReader(key)
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    return FsspecReader(url, **storage.s3fs_kwargs(options))


def save(folder: str, options: dict | None, trained: TrainState, meta: dict, keep: int = 2) -> str:
    """Every rank's shard of ``trained`` and rank 0's ``meta`` in a new folder under
    ``folder``; returns its URL. A collective: every rank calls it."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    device = next(trained.model.parameters()).device
    url = storage.join(folder, FOLDER, _stamp(device))
    with _dcp_errors("write", url, options):
        parallel.resharded(trained.model)  # after an evaluation the root's are whole
        # One copy of each buffer is saved, from any rank: make it rank 0's on all of them
        parallel.broadcast_buffers(trained.model)
        dcp.save(trained.sharded_state_dict(), storage_writer=_writer(url, options))
    if not dist.is_initialized() or dist.get_rank() == 0:  # DCP has written every shard
        with storage.explained(url, options):
            whole.write(storage.join(url, META), options, whole.seal(meta))
            _prune(folder, options, keep)
    return url


def _folders(folder: str, options: dict | None) -> tuple[list[str], set[str]]:
    """``(all, complete)``: the keys of the save folders under ``folder``, oldest first, and
    those with their ``meta.pt``."""
    root = storage.join(folder, FOLDER)
    fs, key, where = _fs(root, options)
    fs.invalidate_cache(key)  # others wrote here: no listing from this process's cache
    try:
        found = retry.retrying(lambda: fs.ls(key, detail=False), where)
    except FileNotFoundError:
        return [], set()
    keys = sorted(f"{key}/{p.rstrip('/').rsplit('/', 1)[-1]}" for p in found)
    done = {k for k in keys if retry.retrying(lambda k=k: fs.exists(f"{k}/{META}"), where)}
    return keys, done


def _fs(url: str, options: dict | None):
    """``(filesystem, key, description)`` of ``url``."""
    return (
        storage.filesystem(url, options),
        storage.split_url(url)[1],
        storage.describe(url, options),
    )


def _url(folder: str, key: str) -> str:
    """The URL of ``key`` (a save folder's) on ``folder``'s storage."""
    return storage.join(folder, FOLDER, key.rsplit("/", 1)[-1])


def _prune(folder: str, options: dict | None, keep: int) -> None:
    keys, done = _folders(folder, options)
    finished = [k for k in keys if k in done]
    newest, kept = (finished[-1] if finished else ""), set(finished[-keep:])
    fs, _, where = _fs(folder, options)
    for key in keys:
        if key not in kept and key < newest:  # older than the newest finished one
            try:
                retry.retrying(lambda k=key: fs.rm(k, recursive=True), where)
            except FileNotFoundError:
                pass  # gone already: a retried rm whose first answer was lost


def newest(folder: str, options: dict | None = None) -> str:
    """The URL of the newest complete save under ``folder`` ("" if there is none)."""
    with storage.explained(folder, options):
        keys, done = _folders(folder, options)
    finished = [k for k in keys if k in done]
    return _url(folder, finished[-1]) if finished else ""


def latest(folder: str, options: dict | None = None) -> tuple[str, dict] | None:
    """``(url, meta)`` of the newest complete save under ``folder``, or None."""
    url = newest(folder, options)
    if not url:
        return None
    fs, key, where = _fs(storage.join(url, META), options)
    with storage.explained(url, options):
        raw = retry.retrying(lambda: fs.cat_file(key), where)
    return url, whole.unseal(raw, storage.join(url, META))


def load_into(trained: TrainState, url: str, options: dict | None) -> None:
    """The save at ``url`` into ``trained``, each rank its own shards. A collective."""
    import torch.distributed.checkpoint as dcp

    state = trained.sharded_state_dict()  # the shapes and places to load into
    with _dcp_errors("read", url, options):
        dcp.load(state, storage_reader=_reader(url, options))
    trained.load_sharded_state_dict(state)


def load_model(model: torch.nn.Module, url: str, options: dict | None) -> None:
    """The save at ``url`` gathered into ``model``, whole, in this one process (no ranks)."""
    import torch.distributed.checkpoint as dcp

    state = {"model": model.state_dict()}
    with _dcp_errors("read", url, options), warnings.catch_warnings():
        # DCP's note that it loads in one process, without ranks: what we asked for
        warnings.filterwarnings("ignore", message=".*in a single process", category=UserWarning)
        dcp.load(state, storage_reader=_reader(url, options))
    model.load_state_dict(state["model"])


@contextlib.contextmanager
def _dcp_errors(doing: str, url: str, options: dict | None) -> Iterator[None]:
    """DCP's errors (gathered from every rank) as one :class:`CheckpointError` naming the
    folder and saying what went wrong (the storage's error explained)."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    try:
        yield
    except DaskDLError:
        raise
    except (Exception, CheckpointException) as err:  # noqa: BLE001 - DCP's, or the storage's
        failures = getattr(err, "failures", None) or {}  # rank -> (exception, traceback)
        first = next(iter(failures.values()), None)
        cause = first[0] if isinstance(first, tuple) and first else err
        raise CheckpointError(
            f"could not {doing} the sharded checkpoint: {storage.explain(cause, url, options)}"
        ) from err
