"""The training state in one file, as rank 0 writes it under DDP: ``checkpoint.pt``.

Its bytes are ``torch.save``'s with a sha256 trailer (:func:`seal`), checked when read
(:func:`unseal`, ``weights_only``: tensors and plain containers, never arbitrary code). A file
appears whole or not at all (:func:`write`): on S3 one PUT; on a local disk a synced temporary
file renamed into place. The previous checkpoints stay beside it as ``checkpoint-<UTC
time>.pt``, the newest few. FSDP's sharded checkpoints (:mod:`helpers.loop.sharded`) keep their
small record in such a file too.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
from datetime import datetime, timezone

from helpers.errors import CheckpointError
from helpers.s3 import retry, storage

NAME = "checkpoint.pt"
TRAILER = b"\nhelpers.checkpoint sha256:"  # then 64 hex digits: the digest of all before it


def path(folder: str) -> str:
    """The checkpoint's URL in ``folder``."""
    return storage.join(folder, NAME)


def seal(state: dict) -> bytes:
    """``state`` as ``torch.save``'s bytes, followed by their sha256."""
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    blob = buf.getvalue()
    return blob + TRAILER + hashlib.sha256(blob).hexdigest().encode()


def write(url: str, options: dict | None, blob: bytes) -> None:
    """``blob`` at ``url``, whole or not at all; retried through transient failures."""
    protocol, key = storage.split_url(url)
    if protocol == "file":
        _write_local(key, blob)
    else:  # S3 objects appear whole or not at all
        fs = storage.filesystem(url, options)
        retry.retrying(lambda: fs.pipe_file(key, blob), storage.describe(url, options))


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
    blob = seal(state)
    url = path(folder)
    key = storage.split_url(url)[1]
    fs = storage.filesystem(url, options)
    where = storage.describe(url, options)
    with storage.explained(url, options):
        if retry.retrying(lambda: fs.exists(key), where) and keep > 1:
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
            retry.retrying(lambda: fs.mv(key, key[: -len(".pt")] + f"-{stamp}.pt"), where)
        write(url, options, blob)
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
    return unseal(raw, url)


def unseal(raw: bytes, url: str) -> dict:
    """What :func:`seal` sealed, its digest checked (:class:`CheckpointError` if it does not
    match, or the bytes are not ``torch.save``'s)."""
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


def exists(folder: str, options: dict | None = None) -> bool:
    """Whether ``folder`` holds a checkpoint (``checkpoint.pt``, or only an older one)."""
    url = path(folder)
    fs, key = storage.filesystem(url, options), storage.split_url(url)[1]
    where = storage.describe(url, options)
    with storage.explained(url, options):
        return retry.retrying(lambda: fs.exists(key), where) or bool(_versions(fs, key, where))


def version(folder: str, options: dict | None) -> str:
    """The checkpoint's ETag or modification time ("" if there is none): a new one, a new model."""
    url = path(folder)
    try:
        info = storage.filesystem(url, options).info(storage.split_url(url)[1])
    except FileNotFoundError:
        return ""
    return str(info.get("ETag") or info.get("mtime") or info.get("LastModified") or "")
