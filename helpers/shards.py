"""The dataset as tar shards in the WebDataset layout: fewer, larger GETs than one per image.

Each sample is two tar members with the same key, the original object key without its extension::

    Images/n02085620-Chihuahua/n02085620_10074.jpg   # the image bytes, exactly as stored
    Images/n02085620-Chihuahua/n02085620_10074.cls   # the label as ASCII digits: "0"

Samples are shuffled across breeds (seeded) and packed ``shard_size`` to a shard, one set of
shards per split, next to an index that the readers (:mod:`helpers.stream`) plan every epoch from::

    <data_url>/shards/train-000000.tar ... train-000249.tar, val-000000.tar ...
    <data_url>/shards/index.json

Write them from the per-object layout already in S3 (:func:`write_shards`) or straight from the
official ``images.tar`` (:func:`write_shards_from_archive`)::

    python -m helpers.prepare shards s3://my-bucket/stanford-dogs [--shard-size 48]
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import suppress
from pathlib import Path

from helpers import data, storage

log = logging.getLogger(__name__)

SHARDS = "shards"
INDEX = "index.json"
FORMAT = "webdataset-tar/1"
# 12,000 train images / 48 = 250 shards: ~4 for each of 64 loader processes (8 GPUs x 8 loaders),
# so every process streams whole shards and none waits on a single straggling GET.
DEFAULT_SHARD_SIZE = 48
FETCH_CHUNK = 256  # objects per concurrent GET round while writing
# What reading a damaged shard raises: tarfile's own errors, or EOF inside a member.
DAMAGED = (tarfile.TarError, EOFError, OSError)


class ShardIndexError(storage.StorageError):
    """No shards, or shards of another manifest or split; the message says how to rebuild."""


def location(url: str, shards_url: str | None = None) -> str:
    """Where the shards of the dataset at ``url`` live: ``shards_url`` or ``<url>/shards``."""
    return shards_url or storage.join(url, SHARDS)


def rebuild_command(url: str, val_fraction: float | None = None, seed: int | None = None) -> str:
    cmd = f"python -m helpers.prepare shards {url}"
    if val_fraction is not None:
        cmd += f" --val-fraction {val_fraction}"
    if seed is not None:
        cmd += f" --seed {seed}"
    return cmd


def manifest_hash(manifest: data.Manifest) -> str:
    """sha256 of the manifest's keys and official split as canonical JSON (sorted, no spaces)."""
    doc = {
        "keys": list(manifest.keys),
        "official": {k: list(v) for k, v in manifest.official.items()},
    }
    return hashlib.sha256(
        json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


def sample_key(key: str) -> tuple[str, str]:
    """``Images/x/n_1.jpg`` -> (``Images/x/n_1``, ``jpg``): the WebDataset key and extension.

    A WebDataset key ends at the first dot of the file name, so a name with two dots would be
    read back as another key; refuse it rather than write shards that lose samples.
    """
    folder, _, name = key.rpartition("/")
    stem, dot, ext = name.partition(".")
    if not stem or not dot or not ext or "." in ext:
        raise ValueError(
            f"{key!r}: a sharded object's file name needs exactly one dot, before its "
            "extension (the WebDataset key ends at the first dot); rename the object"
        )
    return (f"{folder}/{stem}" if folder else stem), ext


def pack_shard(samples: Iterable[tuple[str, int, bytes]]) -> bytes:
    """A tar of ``(key, label, image bytes)`` samples: ``<key>.<ext>`` then ``<key>.cls``.

    Fixed times and owners, so the same samples always give the same bytes (and index sizes).
    """
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for key, label, blob in samples:
            stem, ext = sample_key(key)
            for name, payload in ((f"{stem}.{ext}", blob), (f"{stem}.cls", str(label).encode())):
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(payload), 0o444, 0
                tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def read_shard(blob: bytes) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {extension: bytes})`` per sample, in the shard's order.

    A damaged shard raises one of :data:`DAMAGED` after the samples read before the damage.
    """
    key, members = None, {}
    try:
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, _, name = member.name.rpartition("/")
                stem, _, ext = name.partition(".")
                this = f"{folder}/{stem}" if folder else stem
                if this != key and key is not None:
                    yield key, members
                    members = {}
                key = this
                members[ext] = tar.extractfile(member).read()
    except DAMAGED:
        if key is not None:
            yield key, members  # the reader checks that the sample is whole
        raise
    if key is not None:
        yield key, members


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
        official = {}
        if lists_tar:
            with tarfile.open(lists_tar) as tar:
                for name in ("train", "test"):
                    raw = tar.extractfile(f"{name}_list.mat").read()
                    official[name] = ["Images/" + f for f in data.read_mat_list(raw)]
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


def read_index(url: str, options: dict | None = None, shards_url: str | None = None) -> dict:
    """The shard index of the dataset at ``url``; :class:`ShardIndexError` says how to write it."""
    path = storage.join(location(url, shards_url), INDEX)
    fs = storage.filesystem(path, options)
    try:
        index = json.loads(fs.cat_file(storage.split_url(path)[1]))
    except FileNotFoundError:
        raise ShardIndexError(
            f"no shard index at {storage.describe(path, options)}; write the shards with: "
            f"{rebuild_command(url)}"
        ) from None
    except Exception as err:  # noqa: BLE001
        raise storage.StorageError(storage.explain(err, path, options)) from err
    if index.get("format") != FORMAT:
        raise ShardIndexError(
            f"{path} is format {index.get('format')!r}, this code reads {FORMAT!r}; rewrite it "
            f"with: {rebuild_command(url)}"
        )
    return index


def has_shards(url: str, options: dict | None = None, shards_url: str | None = None) -> bool:
    """Whether the dataset at ``url`` has a shard index (for ``data_format="auto"``)."""
    path = storage.join(location(url, shards_url), INDEX)
    return storage.filesystem(path, options).exists(storage.split_url(path)[1])


def check_index(
    index: dict,
    manifest: data.Manifest,
    val_fraction: float | None = None,
    seed: int | None = None,
) -> None:
    """Refuse shards built from another manifest, or from another split than the one asked for."""
    built, now = index["manifest_sha256"], manifest_hash(manifest)
    if built != now:
        raise ShardIndexError(
            f"the shards of {manifest.url} were built from manifest sha256 {built}, but its "
            f"manifest is now sha256 {now}; rebuild them with: "
            f"{rebuild_command(manifest.url, index['val_fraction'], index['seed'])}"
        )
    if index["split_source"] == "official":
        return  # the official lists fix the split whatever val_fraction and seed say
    for name, asked in (("val_fraction", val_fraction), ("seed", seed)):
        if asked is not None and asked != index[name]:
            raise ShardIndexError(
                f"the shards of {manifest.url} hold the split of {name}={index[name]}, not "
                f"{name}={asked}; use {name}={index[name]} or rebuild them with: "
                f"{rebuild_command(manifest.url, val_fraction, seed)}"
            )
