"""Write the tar shards of :mod:`helpers.shards`: from the objects in S3 or the official archive.

Samples are shuffled across breeds (seeded), packed ``shard_size`` to a shard and PUT whole, one
set of shards per split; the index is written last, so a reader sees all shards or none::

    python -m helpers.prepare shards s3://my-bucket/stanford-dogs [--shard-size 48]
"""

from __future__ import annotations

import json
import logging
import random
import tarfile
import tempfile
from collections.abc import Callable, Iterable
from contextlib import suppress
from pathlib import Path

from helpers import data, shards, storage
from helpers.shards import (
    DEFAULT_SHARD_SIZE,
    FORMAT,
    INDEX,
    location,
    manifest_hash,
    pack_shard,
    sample_key,
)

log = logging.getLogger(__name__)

FETCH_CHUNK = 256  # objects per concurrent GET round while writing


def plan_shards(keys: Iterable[str], seed: int, shard_size: int) -> list[list[str]]:
    """The keys shuffled across classes (seeded) and cut into shards of ``shard_size``."""
    order = sorted(keys)
    random.Random(f"shards:{seed}").shuffle(order)
    return [order[i : i + shard_size] for i in range(0, len(order), shard_size)]


def _write_split(fs, root: str, name: str, keys, manifest, fetch, shard_size: int, seed: int):
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


def _write(manifest, fetch: Callable, options, val_fraction, seed, shard_size, shards_url) -> dict:
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size={shard_size!r}; allowed: a whole number of images >= 1")
    for key in manifest.keys:
        sample_key(key)  # refuse before writing anything
    where = location(manifest.url, shards_url)
    fs = storage.filesystem(where, options)
    root = storage.split_url(where)[1]
    with suppress(FileNotFoundError):
        fs.rm_file(f"{root}/{INDEX}")  # readers never plan from an index of half-rewritten shards
    split = data.split(manifest, val_fraction, seed)
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


def _remove_stale(fs, root: str, index: dict) -> None:
    """Shards of an earlier, larger layout would only confuse people who list the folder."""
    keep = {e["name"] for s in index["splits"].values() for e in s["shards"]}
    with suppress(FileNotFoundError):
        stale = [p for p in fs.ls(root, detail=False) if p.endswith(".tar")]
        stale = [p for p in stale if p.rsplit("/", 1)[-1] not in keep]
        if stale:
            fs.rm(stale)


def write_shards(
    url: str,
    options: dict | None = None,
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    shard_size: int = DEFAULT_SHARD_SIZE,
    shards_url: str | None = None,
    manifest: data.Manifest | None = None,
) -> dict:
    """Shard the per-object dataset at ``url`` (its manifest, or a fresh listing); the index.

    Objects are read ``FETCH_CHUNK`` at a time with concurrent GETs, each shard built in memory
    and written with one PUT. The index is written last, so a reader sees all shards or none.
    """
    manifest = manifest or data.load_manifest(url, options)
    fs = storage.filesystem(url, options)
    root = storage.split_url(url)[1]

    def fetch(keys: list[str]) -> dict[str, bytes]:
        try:
            got = fs.cat([f"{root}/{k}" for k in keys], on_error="return")
        except Exception as err:  # noqa: BLE001 - every backend error becomes one clear message
            raise storage.StorageError(storage.explain(err, url, options)) from err
        for k in keys:
            if not isinstance(got.get(f"{root}/{k}"), bytes):
                raise storage.StorageError(
                    f"cannot read {k!r} under {storage.describe(url, options)} "
                    f"({got.get(f'{root}/{k}')!r}); the manifest lists it: restore the object or "
                    "refresh the manifest (data.load_manifest(url, refresh=True))"
                )
        return {k: got[f"{root}/{k}"] for k in keys}

    return _write(manifest, fetch, options, val_fraction, seed, shard_size, shards_url)


def write_shards_from_archive(
    images_tar: str | Path,
    url: str,
    options: dict | None = None,
    *,
    lists_tar: str | Path | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    shard_size: int = DEFAULT_SHARD_SIZE,
    shards_url: str | None = None,
    spool_dir: str | None = None,
) -> dict:
    """Shards (and ``manifest.json``) straight from the official ``images.tar``: no objects.

    The archive is read once as a stream (gzip or a pipe are fine). It is sorted by breed and
    shards must mix breeds, so its images are spooled to one local temporary file (the archive's
    size on disk in ``spool_dir``, never in memory) and packed from there.
    """
    with tempfile.TemporaryFile(dir=spool_dir) as spool:
        where: dict[str, tuple[int, int]] = {}
        with tarfile.open(images_tar, mode="r|*") as tar:
            for member in tar:
                if member.isfile():
                    blob = tar.extractfile(member).read()
                    where[_archive_key(member.name, images_tar)] = (spool.tell(), len(blob))
                    spool.write(blob)
        if not where:
            raise ValueError(f"{images_tar}: no images in the archive")
        lists = data.official_lists(lists_tar) if lists_tar else {}
        official = {name: keys for name, (_, keys) in lists.items()}
        manifest = data.make_manifest(url, sorted(where), official)

        def fetch(keys: list[str]) -> dict[str, bytes]:
            out = {}
            for k in keys:
                spool.seek(where[k][0])
                out[k] = spool.read(where[k][1])
            return out

        data.write_manifest(manifest, options)  # the readers check the shards against it
        return _write(manifest, fetch, options, val_fraction, seed, shard_size, shards_url)


def _archive_key(name: str, images_tar) -> str:
    parts = name.lstrip("./").split("/")
    if len(parts) != 3 or parts[0] != "Images" or "-" not in parts[1]:
        raise ValueError(
            f"{images_tar}: member {name!r} is not in the Stanford Dogs layout "
            "Images/<wnid>-<breed>/<file>.jpg"
        )
    return "/".join(parts)


def ensure_shards(
    url: str, options: dict | None = None, *, val_fraction: float = 0.2, seed: int = 0
) -> dict:
    """The shard index of ``url``: the existing one when it was built from the current manifest
    and split, else the shards written afresh (the demo's "make them if missing")."""
    try:
        index = shards.read_index(url, options)
        shards.check_index(index, data.load_manifest(url, options), val_fraction, seed)
        return index
    except shards.ShardIndexError as err:
        log.info("writing the shards of %s (%s)", url, str(err).split(";")[0])
    return write_shards(url, options, val_fraction=val_fraction, seed=seed)
