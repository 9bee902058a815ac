"""Read shards for :mod:`helpers.stream`: whole-shard GETs ahead of the reader, then samples.

A loader process GETs each of its shards whole (one request per shard, never one per image), a
background thread fetching up to ``depth`` shards ahead while the process decodes the current
one. Missing or damaged shards and malformed samples are skipped, counted and named, never
raised: the stream pads the epoch instead.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
from collections.abc import Iterator

from helpers import shards, storage

log = logging.getLogger(__name__)


class Prefetcher:
    """GETs whole shards in a background thread, up to ``depth`` ahead of the reader; yields
    ``(name, bytes or the exception)`` in order. Use as a context manager."""

    def __init__(self, url: str, options: dict, names: list[str], depth: int):
        self.url, self.options, self.names = url, options, names
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="shard-prefetch", daemon=True)

    def __enter__(self) -> Prefetcher:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()  # the thread ends after the GET in flight; nobody waits for it

    def __iter__(self):
        for _ in self.names:
            yield self.queue.get()

    def _run(self) -> None:
        root = storage.split_url(self.url)[1]
        for name in self.names:
            if self.stop.is_set():
                return
            try:
                fs = storage.filesystem(self.url, self.options)
                get = functools.partial(fs.cat_file, f"{root}/{name}")
                item = storage.retrying(get, self.url, self.options)
            except Exception as err:  # noqa: BLE001 - handed to the reader, which names the shard
                item = err
            while not self.stop.is_set():
                try:
                    self.queue.put((name, item), timeout=0.2)
                    break
                except queue.Full:
                    pass


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
) -> Iterator[tuple[str, bytes, int, str]]:
    """``(key, image bytes, label, shard)`` of samples ``[first, end)`` of each ``(shard name,
    first, end)`` in ``parts``, shards GET whole ``prefetch`` ahead. Bad shards and members are
    skipped (and, with ``warn``, counted in ``stats`` and logged naming ``rebuild``)."""
    names = [name for name, _, _ in parts]
    with Prefetcher(where, options, names, prefetch) as fetched:
        for (_, first, end), (name, blob) in zip(parts, fetched, strict=True):
            url = storage.join(where, name)
            if isinstance(blob, storage.StorageUnavailable):
                raise blob  # the server, not the shard: the job fails (or restarts)
            if isinstance(blob, BaseException):
                if warn:
                    stats["missing_shards"] += 1
                    log.warning(
                        "shard %s is missing or unreadable (%s: %s); its %d samples here are "
                        "made up by padding. Rebuild the shards with: %s",
                        *(url, type(blob).__name__, blob, end - first, rebuild),
                    )
                continue
            pos = -1
            try:
                for pos, (key, members) in enumerate(shards.read_shard(blob)):
                    if pos >= end:
                        break
                    if pos >= first:
                        sample = _sample(key, members, name, classes, stats, warn)
                        if sample is not None:
                            yield sample
            except shards.DAMAGED as err:
                if warn:
                    stats["damaged_shards"] += 1
                    log.warning(
                        "shard %s is truncated or damaged after %d samples (%s); the rest "
                        "is made up by padding. Rebuild the shards with: %s",
                        *(url, pos + 1, err, rebuild),
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
