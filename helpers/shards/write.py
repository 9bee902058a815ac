"""Write the tar shards of :mod:`helpers.shards.format` for a manifest and its split.

Samples are shuffled across breeds (seeded), packed ``shard_size`` to a shard and PUT whole, one
set of shards per split; the index is written last, so a reader sees all shards or none. The
images come from a ``fetch(keys) -> {key: bytes}`` the caller gives: the objects already in S3
(:func:`from_objects`), or the official archive (``helpers.prepare``)::

    python -m helpers.prepare shards s3://my-bucket/stanford-dogs [--shard-size 48]
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Iterable
from contextlib import suppress

from helpers.errors import ParameterError, StorageError
from helpers.s3 import storage
from helpers.shards.format import (
    DEFAULT_SHARD_SIZE,
    FORMAT,
    INDEX,
    Halves,
    Listing,
    location,
    manifest_hash,
    pack_shard,
    sample_key,
)

log = logging.getLogger(__name__)

FETCH_CHUNK = 256  # objects per concurrent GET round while writing

Fetch = Callable[[list[str]], dict[str, bytes]]


def plan_shards(keys: Iterable[str], seed: int, shard_size: int) -> list[list[str]]:
    """The keys shuffled across classes (seeded) and cut into shards of ``shard_size``."""
    order = sorted(keys)
    random.Random(f"shards:{seed}").shuffle(order)
    return [order[i : i + shard_size] for i in range(0, len(order), shard_size)]


def from_objects(url: str, options: dict | None) -> Fetch:
    """A ``fetch`` of the objects under ``url``: concurrent GETs; a listed object that cannot be
    read is an error naming it (the manifest promised it)."""
    fs = storage.filesystem(url, options)
    root = storage.split_url(url)[1]

    def fetch(keys: list[str]) -> dict[str, bytes]:
        with storage.explained(url, options):
            got = fs.cat([f"{root}/{k}" for k in keys], on_error="return")
        for k in keys:
            if not isinstance(got.get(f"{root}/{k}"), bytes):
                raise StorageError(
                    f"cannot read {k!r} under {storage.describe(url, options)} "
                    f"({got.get(f'{root}/{k}')!r}); the manifest lists it: restore the object or "
                    "refresh the manifest (data.load_manifest(url, refresh=True))"
                )
        return {k: got[f"{root}/{k}"] for k in keys}

    return fetch


def write_shards(
    manifest: Listing,
    split: Halves,
    fetch: Fetch,
    options: dict | None = None,
    *,
    val_fraction: float,
    seed: int,
    shard_size: int = DEFAULT_SHARD_SIZE,
    shards_url: str | None = None,
) -> dict:
    """Shards of ``split`` (``helpers.data.Split``: its ``train``, ``val`` and ``source``) of
    ``manifest`` (``helpers.data.Manifest``), images from ``fetch``; returns the index.

    Objects are read ``FETCH_CHUNK`` at a time, each shard built in memory and written with one
    PUT. The old index goes first and the new one last: a reader sees all shards or none.
    """
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ParameterError(f"shard_size={shard_size!r}; allowed: a whole number of images >= 1")
    for key in manifest.keys:
        sample_key(key)  # refuse before writing anything
    where = location(manifest.url, shards_url)
    fs = storage.filesystem(where, options)
    root = storage.split_url(where)[1]
    with storage.explained(where, options):
        with suppress(FileNotFoundError):
            fs.rm_file(f"{root}/{INDEX}")  # readers never plan from half-rewritten shards
        index = {
            "format": FORMAT,
            "manifest_sha256": manifest_hash(manifest),
            "val_fraction": val_fraction,
            "seed": seed,
            "split_source": split.source,
            "shard_size": shard_size,
            "classes": list(manifest.classes),
            "splits": {},
        }
        for name, keys in (("train", split.train), ("val", split.val)):
            entries = _write_split(fs, root, name, keys, manifest, fetch, shard_size, seed)
            index["splits"][name] = {
                "split": name,
                "images": sum(e["images"] for e in entries),
                "shards": entries,
            }
        fs.pipe_file(f"{root}/{INDEX}", json.dumps(index, indent=1).encode())
        _remove_stale(fs, root, index)
    log.info(
        "wrote %s: %s",
        storage.describe(where, options),
        ", ".join(f"{n} {len(s['shards'])} shards" for n, s in index["splits"].items()),
    )
    return index


def _write_split(
    fs, root: str, name: str, keys, manifest, fetch: Fetch, shard_size: int, seed: int
) -> list[dict]:
    """Pack and PUT one split's shards, a few at a time; returns their index entries."""
    plan = plan_shards(keys, seed, shard_size)
    group = max(1, FETCH_CHUNK // shard_size)  # shards whose objects are fetched in one round
    entries = []
    for first in range(0, len(plan), group):
        blobs = fetch([k for shard in plan[first : first + group] for k in shard])
        tars = {}
        for i, shard in enumerate(plan[first : first + group], first):
            raw = pack_shard((k, manifest.label(k), blobs[k]) for k in shard)
            tars[f"{root}/{name}-{i:06d}.tar"] = raw
            entries.append({"name": f"{name}-{i:06d}.tar", "bytes": len(raw), "images": len(shard)})
        fs.pipe(tars)  # one PUT per shard, concurrently
    return entries


def _remove_stale(fs, root: str, index: dict) -> None:
    """Shards of an earlier, larger layout would only confuse people who list the folder."""
    keep = {e["name"] for s in index["splits"].values() for e in s["shards"]}
    with suppress(FileNotFoundError):
        stale = [p for p in fs.ls(root, detail=False) if p.endswith(".tar")]
        stale = [p for p in stale if p.rsplit("/", 1)[-1] not in keep]
        if stale:
            fs.rm(stale)
