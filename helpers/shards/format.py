"""The dataset as tar shards in the WebDataset layout: fewer, larger GETs than one per image.

Each sample is two tar members with the same key, the original object key without its extension::

    Images/n02085620-Chihuahua/n02085620_10074.jpg   # the image bytes, exactly as stored
    Images/n02085620-Chihuahua/n02085620_10074.cls   # the label as ASCII digits: "0"

Samples are shuffled across breeds (seeded) and packed ``shard_size`` to a shard, one set of
shards per split, next to an index that the readers (:mod:`helpers.shards.stream`) plan every
epoch from::

    <data_url>/shards/train-000000.tar ... train-000249.tar, val-000000.tar ...
    <data_url>/shards/index.json

This module is the format: packing, reading and the index. :mod:`helpers.shards.write` writes
them (``helpers.prepare`` from the per-object layout already in S3, or straight from the official
``images.tar``)::

    python -m helpers.prepare shards s3://my-bucket/stanford-dogs [--shard-size 48]
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections.abc import Iterable, Iterator
from typing import Protocol

from helpers.config import FORMATS, allowed
from helpers.errors import ShardError, ShardIndexError
from helpers.s3 import storage

SHARDS = "shards"
INDEX = "index.json"
FORMAT = "webdataset-tar/1"
# 12,000 train images / 48 = 250 shards: ~4 for each of 64 loader processes (8 GPUs x 8 loaders),
# so every process streams whole shards and none waits on a single straggling GET.
DEFAULT_SHARD_SIZE = 48
# What reading a damaged shard raises: ours (ShardError), tarfile's own errors, EOF inside a member.
DAMAGED = (ShardError, tarfile.TarError, EOFError, OSError)
# What the reader accepts: a member (an image, a label, a PAX header) of at most 64 MiB, a shard
# of at most 1 GiB (it is held whole, ``prefetch`` + 1 of them per loader process). 48 Stanford
# Dogs photos make a few MB: anything past these bounds is not a shard of ours.
MAX_MEMBER_BYTES = 64 * 2**20
MAX_SHARD_BYTES = 2**30


class Listing(Protocol):
    """What the shards need of a dataset's listing (``helpers.data.Manifest`` is one): its URL,
    keys, classes, the official split if any, and each key's label."""

    url: str
    keys: tuple[str, ...]
    classes: tuple[str, ...]
    official: dict

    def label(self, key: str) -> int: ...


class Halves(Protocol):
    """What the shards need of a split (``helpers.data.Split`` is one)."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    source: str


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


def manifest_hash(manifest: Listing) -> str:
    """sha256 of a manifest's keys and official split (``helpers.data.Manifest``: its ``keys``
    and ``official``) as canonical JSON (sorted, no spaces)."""
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
        raise ShardError(
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


def read_shard(blob: bytes, name: str = "") -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {extension: bytes})`` per sample, in the shard's order.

    A damaged shard raises one of :data:`DAMAGED` after the samples read before the damage, an
    empty one :class:`ShardError`; ``name`` (the shard's) is named in the message.
    """
    key, members = None, {}
    try:
        for path, payload in tar_members(blob, name):
            folder, _, base = path.rpartition("/")
            stem, _, ext = base.partition(".")
            this = f"{folder}/{stem}" if folder else stem
            if this != key and key is not None:
                yield key, members
                members = {}
            key = this
            members[ext] = payload
    except DAMAGED:
        if key is not None:
            yield key, members  # the reader checks that the sample is whole
        raise
    if key is None:
        raise ShardError(f"{_where(name)} holds no samples")
    yield key, members


def tar_members(blob: bytes, name: str = "") -> Iterator[tuple[str, bytes]]:
    """``(name, bytes)`` of each regular file in an uncompressed tar, read straight from its
    512-byte headers: about 20 times cheaper per member than :mod:`tarfile`, which costs a loader
    process ~0.2 ms per image. ustar names with their prefix, PAX ``path`` records and GNU long
    names are honoured.

    The bytes are not trusted: a bad checksum, a size that is not octal digits (a negative one
    would never advance), a member over :data:`MAX_MEMBER_BYTES`, a shard over
    :data:`MAX_SHARD_BYTES`, malformed PAX records or data cut short (the end-of-archive marker
    missing too) raise :class:`ShardError` naming the shard (``name``) and the byte offset.
    Every header read moves on by 512 bytes at least, so the reader always ends.
    """
    where = _where(name)
    if len(blob) > MAX_SHARD_BYTES:
        raise ShardError(f"{where} is {len(blob)} bytes, over the {MAX_SHARD_BYTES} bytes allowed")
    pos, end, long_name = 0, len(blob), None
    while True:
        header = blob[pos : pos + 512]
        if len(header) < 512:  # a shard cut at a member's end too: it would read as a whole one
            raise ShardError(f"{where}: unexpected end of data, no header at byte {pos}")
        if header == _ZERO_BLOCK:
            return  # the end-of-archive marker
        if _checksum(header) != _octal(header[148:156], where, pos):
            raise ShardError(f"{where}: bad checksum in the header at byte {pos}")
        size, kind = _octal(header[124:136], where, pos), header[156:157]
        if size > MAX_MEMBER_BYTES:
            raise ShardError(
                f"{where}: a member of {size} bytes at byte {pos}, over the "
                f"{MAX_MEMBER_BYTES} bytes allowed"
            )
        start = pos + 512
        if start + size > end:
            raise ShardError(f"{where}: unexpected end of data inside the member at byte {pos}")
        payload, pos = blob[start : start + size], start + -(-size // 512) * 512
        if kind == b"x":  # PAX: records for the next member, of which only the path matters
            long_name = _pax_path(payload, where, start) or long_name
        elif kind == b"L":  # GNU: the next member's long name
            long_name = payload.rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif kind in (b"0", b"\0", b"7"):  # regular files (7: contiguous, read the same)
            yield long_name or _ustar_name(header), payload
            long_name = None
        elif kind != b"g":  # folders, links, ...: not samples
            long_name = None


_ZERO_BLOCK = bytes(512)


def _where(name: str) -> str:
    return f"shard {name}" if name else "a shard"


_OCTAL = frozenset(b"01234567")


def _checksum(header: bytes) -> int:
    return sum(header[:148]) + 8 * 32 + sum(header[156:])  # the field itself counts as spaces


def _octal(field: bytes, where: str, pos: int) -> int:
    """A header's number: octal digits, padded with NULs or spaces. GNU's base-256 (first byte
    0x80 or 0xff) only serves sizes of 8 GiB and more, far past :data:`MAX_MEMBER_BYTES`: it is
    refused with the rest (signs, underscores, other digits) rather than read by ``int``."""
    digits = field.rstrip(b"\0 ").lstrip(b" ")
    if not set(digits) <= _OCTAL:
        raise ShardError(f"{where}: not a tar header at byte {pos} (a number field {field!r})")
    return int(digits or b"0", 8)


def _ustar_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar":
        prefix = header[345:500].split(b"\0", 1)[0]
        name = prefix + b"/" + name if prefix else name
    return name.decode("utf-8", "surrogateescape")


def _pax_path(records: bytes, where: str, at: int) -> str | None:
    """The ``path`` of PAX records (``"<length> <keyword>=<value>\\n"`` each), if any; ``at`` is
    the records' byte offset in the shard, for the message."""
    path, pos = None, 0
    while pos < len(records):
        head = records[pos : pos + 20].split(b" ", 1)[0]
        length = int(head) if head.isdigit() else 0
        record = records[pos : pos + length]
        if length <= len(head) + 1 or len(record) < length or not record.endswith(b"\n"):
            raise ShardError(
                f"{where}: malformed PAX record at byte {at + pos}: {records[pos : pos + 40]!r}"
            )
        keyword, _, value = record[len(head) + 1 : -1].partition(b"=")
        if keyword == b"path":
            path = value.decode("utf-8", "surrogateescape")
        pos += length
    return path


def read_index(url: str, options: dict | None = None, shards_url: str | None = None) -> dict:
    """The shard index of the dataset at ``url``, its format checked (:func:`index_problem`);
    :class:`ShardIndexError` says how to write it."""
    path = storage.join(location(url, shards_url), INDEX)
    fs = storage.filesystem(path, options)
    with storage.explained(path, options):
        try:
            raw = fs.cat_file(storage.split_url(path)[1])
        except FileNotFoundError:
            raise ShardIndexError(
                f"no shard index at {storage.describe(path, options)}; write the shards with: "
                f"{rebuild_command(url)}"
            ) from None
    try:
        index = json.loads(raw)
    except (ValueError, RecursionError) as err:  # not JSON, not UTF-8, nested past the stack
        index, problem = None, f"not JSON ({err})"
    else:
        problem = index_problem(index)
    if problem:
        raise ShardIndexError(
            f"{path} is not a shard index this code can read: {problem}; rewrite it with: "
            f"{rebuild_command(url)}"
        )
    return index


# A shard's name in the index: it becomes part of a URL, so no "..", no "/", nothing but this.
SHARD_NAME = re.compile(r"(train|val)-[0-9]{6}\.tar")


def index_problem(index: object) -> str | None:
    """What makes ``index`` unreadable (None when nothing does): the format tag, the manifest's
    hash, the split's settings, the classes, and each split's shards: names of the form
    ``<split>-NNNNNN.tar`` (:data:`SHARD_NAME`) and image counts that are positive integers."""
    if not isinstance(index, dict):
        return f"a JSON {type(index).__name__}, not an object"
    if index.get("format") != FORMAT:
        return f"format {index.get('format')!r}, this code reads {FORMAT!r}"
    if not isinstance(index.get("manifest_sha256"), str):
        return f"manifest_sha256={index.get('manifest_sha256')!r}, not a sha256"
    fraction, seed = index.get("val_fraction"), index.get("seed")
    if type(fraction) not in (int, float) or not 0 < fraction < 1:
        return f"val_fraction={fraction!r}, not a fraction between 0 and 1"
    if type(seed) is not int:
        return f"seed={seed!r}, not a whole number"
    if index.get("split_source") not in ("official", "seeded"):
        return f"split_source={index.get('split_source')!r}, not 'official' or 'seeded'"
    classes = index.get("classes")
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        return f"classes={str(classes)[:80]}, not a list of class folders"
    splits = index.get("splits")
    for split in ("train", "val"):
        entry = splits.get(split) if isinstance(splits, dict) else None
        shards = entry.get("shards") if isinstance(entry, dict) else None
        if not isinstance(shards, list):
            return f"no split {split!r} with a list of shards"
        for shard in shards:
            problem = _shard_problem(shard, split)
            if problem:
                return problem
        listed = sum(shard["images"] for shard in shards)
        if entry.get("images", listed) != listed:
            return (
                f"split {split!r} says images={entry['images']!r} but its shards add up to {listed}"
            )
    return None


def _shard_problem(shard, split: str) -> str | None:
    if not isinstance(shard, dict):
        return f"a shard entry {str(shard)[:80]} of split {split!r} is not an object"
    name, images = shard.get("name"), shard.get("images")
    if not isinstance(name, str) or not SHARD_NAME.fullmatch(name) or name[: len(split)] != split:
        return f"shard name {name!r} in split {split!r}; allowed: {split}-NNNNNN.tar"
    if type(images) is not int or images < 1:
        return f"shard {name} has images={images!r}; allowed: a whole number >= 1"
    return None


def has_shards(url: str, options: dict | None = None, shards_url: str | None = None) -> bool:
    """Whether the dataset at ``url`` has a shard index (for ``data_format="auto"``)."""
    path = storage.join(location(url, shards_url), INDEX)
    return storage.filesystem(path, options).exists(storage.split_url(path)[1])


def check_index(
    index: dict,
    manifest: Listing,
    val_fraction: float | None = None,
    seed: int | None = None,
) -> None:
    """Refuse shards built from another manifest (``helpers.data.Manifest``: its ``url``,
    ``keys`` and ``official``), or from another split than the one asked for."""
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


def resolve_format(data_format: str, url: str, options: dict | None = None) -> str:
    """``"auto"`` -> ``"shards"`` where a shard index exists, else ``"objects"``."""
    allowed("data_format", data_format, FORMATS)
    if data_format == "auto":
        return "shards" if has_shards(url, options) else "objects"
    return data_format
