"""Read shards: whole-shard GETs ahead of the reader, then samples (:mod:`helpers.shards.stream`
and batch inference read them so).

A loader process GETs each of its shards whole (one request per shard, never one per image), a
background thread fetching up to ``depth`` shards ahead while the process decodes the current
one. Missing or damaged shards (:func:`helpers.shards.format.tar_members` trusts no header),
shards holding another number of samples than the index says, and malformed samples are
skipped, counted and named, never raised: the stream pads the epoch instead.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

from helpers.errors import StorageError, StorageUnavailable
from helpers.s3 import presigned, retry, storage
from helpers.shards import format as shard_format

log = logging.getLogger(__name__)


def presign(url: str, options: dict, names: list[str]) -> dict:
    """``{"at": time, "urls": {name: presigned GET URL}}`` for the shards ``names`` under an
    ``s3://`` ``url``, else ``{}``.

    Signed once per epoch in the training process, so that the loader processes (forked afresh
    every epoch) GET shards with plain HTTP: an S3 client costs each new process ~0.3 s of CPU
    (botocore's models and endpoint rules) and its first GET waits for that.
    """
    root = storage.split_url(url)[1]
    signed = presigned.sign(url, options, [f"{root}/{n}" for n in names])
    if not signed:
        return {}
    return {"at": time.time(), "urls": {n: signed[f"{root}/{n}"] for n in names}}


class Prefetcher:
    """GETs whole shards in a background thread, up to ``depth`` ahead of the reader; yields
    ``(name, bytes or the exception)`` in order. Use as a context manager.

    ``signed`` (:func:`presign`): shards with a fresh presigned URL are read by plain HTTP; a
    failed one (expired, refused) is read again through the S3 client, as the rest are.
    ``depth=0``: no thread, each shard GET only when the reader asks for it. ``cache``: shards
    found there are not fetched; the first shard fetched is kept there (the padding at the end
    of an epoch repeats a process's first samples: one shard, not another GET).
    """

    def __init__(
        self,
        url: str,
        options: dict,
        names: list[str],
        depth: int,
        signed: dict | None = None,
        cache: dict | None = None,
    ):
        self.url, self.options, self.names, self.depth = url, options, names, depth
        self.cache = cache
        fresh = signed and time.time() - signed["at"] < presigned.SIGNED_FOR_S - 600
        self.signed: dict[str, str] = signed["urls"] if fresh else {}
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="shard-prefetch", daemon=True)

    def __enter__(self) -> Prefetcher:
        if self.depth > 0:
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()  # the thread ends after the GET in flight; nobody waits for it

    def __iter__(self):
        for name in self.names:
            yield self.queue.get() if self.depth > 0 else (name, self._get(name))

    def _get(self, name: str):
        """The shard's bytes (or the exception): cache, presigned URL, else the S3 client."""
        if self.cache is not None and name in self.cache:
            return self.cache[name]
        item = self._signed_get(name)
        if item is None:
            root = storage.split_url(self.url)[1]
            try:
                fs = storage.filesystem(self.url, self.options)
                get = functools.partial(fs.cat_file, f"{root}/{name}")
                item = retry.retrying(get, storage.describe(self.url, self.options))
            except Exception as err:  # noqa: BLE001 - handed to the reader, who names it
                return err
        if self.cache is not None and not self.cache:
            self.cache[name] = item
        return item

    def _run(self) -> None:
        for name in self.names:
            if self.stop.is_set():
                return
            item = self._get(name)
            while not self.stop.is_set():
                try:
                    self.queue.put((name, item), timeout=0.2)
                    break
                except queue.Full:
                    pass

    def _signed_get(self, name: str) -> bytes | None:
        """The shard by its presigned URL; None when there is none or it failed."""
        url = self.signed.get(name)
        if url is None:
            return None
        try:
            with urllib.request.urlopen(url, timeout=60) as resp:  # noqa: S310 - our endpoint
                return resp.read(shard_format.MAX_SHARD_BYTES + 1)  # more: the reader refuses it
        except Exception as err:  # noqa: BLE001 - the S3 client tries again and names the error
            if retry.is_transient(err):  # sent again below: a retry like any other
                retry.count_retry()
            log.debug("presigned GET of %s failed (%s); retrying through s3fs", name, err)
            return None


def raw_samples(
    where: str,
    options: dict,
    parts: list[tuple[str, int, int]],
    *,
    classes: int,
    prefetch: int,
    stats: dict[str, int],
    warn: bool,
    rebuild: str,
    signed: dict | None = None,
    cache: dict | None = None,
    counts: dict[str, int] | None = None,
) -> Iterator[tuple[str, bytes, int, str]]:
    """``(key, image bytes, label, shard)`` of samples ``[first, end)`` of each ``(shard name,
    first, end)`` in ``parts``, shards GET whole ``prefetch`` ahead. Bad shards and members are
    skipped (and, with ``warn``, counted in ``stats`` and logged naming ``rebuild``), and so is
    a shard holding another number of samples than ``counts`` (the index's) says.
    ``signed``: presigned URLs (:func:`presign`) to GET the shards by; ``cache``: see
    :class:`Prefetcher`."""
    names = [name for name, _, _ in parts]
    with Prefetcher(where, options, names, prefetch, signed, cache) as fetched:
        for (_, first, end), (name, blob) in zip(parts, fetched, strict=True):
            url = storage.join(where, name)
            if isinstance(blob, StorageUnavailable):
                raise blob  # the server, not the shard: the job fails (or restarts)
            if isinstance(blob, BaseException) and not isinstance(blob, FileNotFoundError):
                raise StorageError(storage.explain(blob, url, options)) from blob  # refused...
            if isinstance(blob, BaseException):
                if warn:
                    stats["missing_shards"] += 1
                    log.warning(
                        "shard %s is missing (%s: %s); its %d samples here are "
                        "made up by padding. Rebuild the shards with: %s",
                        *(url, type(blob).__name__, blob, end - first, rebuild),
                    )
                continue
            report = _Report(url, stats, warn, rebuild, (counts or {}).get(name))
            yield from _shard_samples(blob, name, first, end, classes, report)


@dataclass
class _Report:
    """Where one shard's damage is counted (``stats``) and named (``url``, ``rebuild``), and
    how many samples its index entry says it holds (``expected``; None: not known)."""

    url: str
    stats: dict[str, int]
    warn: bool
    rebuild: str
    expected: int | None


def _shard_samples(blob: bytes, name: str, first: int, end: int, classes: int, report: _Report):
    """The whole samples ``[first, end)`` of one shard's bytes; damage ends it, counted."""
    pos = -1
    try:
        for pos, (key, members) in enumerate(shard_format.read_shard(blob, name)):
            if pos >= end:
                break  # one sample past the part: there is more than the index says if it ends
            if pos >= first:
                sample = _sample(key, members, name, classes, report.stats, report.warn)
                if sample is not None:
                    yield sample
    except shard_format.DAMAGED as err:
        if report.warn:
            report.stats["damaged_shards"] += 1
            log.warning(
                "shard %s is truncated or damaged after %d samples (%s); the rest "
                "is made up by padding. Rebuild the shards with: %s",
                *(report.url, pos + 1, err, report.rebuild),
            )
        return
    expected = report.expected
    fewer, more = pos + 1 < end, pos >= end and expected is not None and end >= expected
    if report.warn and expected is not None and (fewer or more):
        report.stats["damaged_shards"] += 1
        log.warning(
            "shard %s holds %s samples, its index entry says %d: %s. Rebuild the shards with: %s",
            report.url,
            pos + 1 if fewer else f"more than {expected}",
            expected,
            "the missing ones are made up by padding" if fewer else "the rest are not read",
            report.rebuild,
        )


def _sample(key: str, members: dict, shard: str, classes: int, stats: dict, warn: bool):
    """``(key.ext, bytes, label, shard)`` of a whole sample, else None (counted, logged)."""
    ext = next((e for e in members if e != "cls"), None)
    cls = members.get("cls", b"").strip()
    why = None
    if ext is None:
        why = "no image member"
    elif not cls.isdigit() or int(cls) >= classes:
        why = f"label {cls[:20]!r} is not a class index below {classes}"
    if why is None:
        return f"{key}.{ext}", members[ext], int(cls), shard
    if warn:
        stats["corrupt"] += 1
        log.warning("skipping %s of shard %s: %s", key, shard, why)
    return None
