"""The dataset a notebook trains on: where it is stored, how it is laid out, how it splits.

Where: :func:`connect` turns the notebooks' ``s3_endpoint`` parameter into storage options (the
embedded server, AWS, or any S3-compatible endpoint). Layout, as in the official ``images.tar``::

    <prefix>/Images/n02085620-Chihuahua/n02085620_10074.jpg   # folder = class = wnid-breed
    <prefix>/train_list.mat, <prefix>/test_list.mat           # optional: the official split
    <prefix>/manifest.json                                    # the cached listing (ours)

A dataset is listed once into ``manifest.json``; every rank and loader process reads that one
object and computes the same split from it (:func:`split`). :func:`dataset` is the lazy
per-object dataset over some of its keys (:mod:`helpers.loading.objects`); the training loaders
and the shards (:mod:`helpers.shards`) are given the manifest and the split.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from helpers.errors import ParameterError, StorageError
from helpers.loading.objects import S3ImageDataset
from helpers.loading.transforms import eval_transform, train_transform
from helpers.s3 import server, storage

if TYPE_CHECKING:  # names for annotations only: importing costs nothing at run time
    import os

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MANIFEST = "manifest.json"


def breed(folder: str) -> str:
    """``n02085620-Chihuahua`` -> ``Chihuahua`` (the part after the WordNet id)."""
    return folder.split("-", 1)[1].replace("_", " ") if "-" in folder else folder


def class_folder(key: str) -> str:
    """``.../Images/n02085620-Chihuahua/n02085620_10074.jpg`` -> ``n02085620-Chihuahua``."""
    return key.rsplit("/", 2)[-2]


@dataclass(frozen=True)
class Manifest:
    """The listing of a dataset: keys relative to ``url``, classes, the official split if any."""

    url: str
    keys: tuple[str, ...]
    classes: tuple[str, ...]  # class folders, sorted: the label of a class is its index
    official: dict[str, tuple[str, ...]] = field(default_factory=dict)  # "train"/"test" -> keys

    @property
    def breeds(self) -> list[str]:
        return [breed(c) for c in self.classes]

    def label(self, key: str) -> int:
        """The class index of ``key``: its folder's place among :attr:`classes`."""
        return self._class_index[class_folder(key)]

    @cached_property
    def _class_index(self) -> dict[str, int]:  # a dict once, not a list search per key
        return {c: i for i, c in enumerate(self.classes)}

    def to_json(self) -> str:
        return json.dumps({"keys": self.keys, "official": self.official}, indent=0)


def list_images(url: str, options: dict | None = None) -> Manifest:
    """List ``<url>/Images/*/*`` once; raises :class:`storage.StorageError` naming what is wrong."""
    images = storage.join(url, "Images")
    storage.check_readable(images, options)
    fs = storage.filesystem(url, options)
    root = storage.split_url(url)[1]
    keys = sorted(
        p[len(root) + 1 :]
        for p in fs.find(storage.split_url(images)[1])
        if p.lower().endswith(IMAGE_SUFFIXES)
    )
    if not keys:
        raise StorageError(f"no images under {storage.describe(images, options)}")
    return make_manifest(url, keys, _official_split(url, options))


def make_manifest(url: str, keys: Sequence[str], official: dict) -> Manifest:
    """A manifest for ``keys`` (relative to ``url``); classes are derived from the folders."""
    classes = tuple(sorted({class_folder(k) for k in keys}))
    return Manifest(url, tuple(keys), classes, {k: tuple(v) for k, v in official.items()})


def load_manifest(url: str, options: dict | None = None, refresh: bool = False) -> Manifest:
    """The cached listing at ``<url>/manifest.json`` if there is one, else a fresh listing.

    Many processes (ranks, loader workers) then share one listing instead of relisting 20,580 keys.
    """
    fs = storage.filesystem(url, options)
    path = storage.split_url(storage.join(url, MANIFEST))[1]
    raw = None
    if not refresh:
        with storage.explained(url, options):
            try:
                raw = fs.cat_file(path)
            except FileNotFoundError:
                pass
    if raw is None:
        return list_images(url, options)
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as err:  # not JSON, not UTF-8, nested past the stack
        doc, problem = None, f"not JSON ({err})"
    else:
        problem = manifest_problem(doc)
    if problem:
        raise StorageError(
            f"{storage.describe(storage.join(url, MANIFEST), options)} is not a manifest this "
            f"code can read: {problem}; list the dataset afresh with "
            f"data.load_manifest({url!r}, refresh=True)"
        )
    return make_manifest(url, doc["keys"], doc.get("official", {}))


def manifest_problem(doc: object) -> str | None:
    """What makes a ``manifest.json`` document unreadable (None when nothing does): ``keys`` a
    non-empty list of ``<folder>/<class>/<file>`` keys without ``..``, ``official`` lists of
    keys by split name."""
    if not isinstance(doc, dict):
        return f"a JSON {type(doc).__name__}, not an object"
    keys, official = doc.get("keys"), doc.get("official", {})
    if not isinstance(keys, list) or not keys:
        return f"keys={str(keys)[:80]}, not a list of image keys"
    lists = list(official.values()) if isinstance(official, dict) else [None]
    for listed in [keys, *lists]:
        if not isinstance(listed, list):
            return f"official={str(official)[:80]}, not lists of keys by split"
        bad = [k for k in listed if not _is_key(k)][:1]
        if bad:
            return f"key {str(bad[0])[:80]!r}; allowed: <folder>/<class>/<file>, no '..'"
    return None


def _is_key(key) -> bool:
    parts = key.split("/") if isinstance(key, str) else []
    return len(parts) >= 2 and all(p not in ("", ".", "..") for p in parts)


def write_manifest(manifest: Manifest, options: dict | None = None) -> None:
    fs = storage.filesystem(manifest.url, options)
    fs.pipe_file(
        storage.split_url(storage.join(manifest.url, MANIFEST))[1], manifest.to_json().encode()
    )


def _official_split(url: str, options: dict | None) -> dict[str, list[str]]:
    """Read ``train_list.mat``/``test_list.mat`` next to ``Images/`` when they exist."""
    fs = storage.filesystem(url, options)
    out = {}
    for name in ("train", "test"):
        path = storage.split_url(storage.join(url, f"{name}_list.mat"))[1]
        try:
            raw = fs.cat_file(path)
        except FileNotFoundError:
            continue
        out[name] = ["Images/" + f for f in read_mat_list(raw)]
    return out


def read_mat_list(raw: bytes) -> list[str]:
    """The ``file_list`` of an official ``*_list.mat`` file: ``wnid-breed/wnid_n.jpg`` strings."""
    import numpy as np
    from scipy.io import loadmat

    cells = loadmat(io.BytesIO(raw))["file_list"].ravel()  # (N, 1) cells of 1-element arrays
    return [str(np.asarray(c).ravel()[0]) for c in cells]


def official_lists(lists_tar: str | Path) -> dict[str, tuple[bytes, list[str]]]:
    """The official split in ``lists.tar``: ``"train"``/``"test"`` -> (the ``.mat`` file's bytes,
    the keys it lists)."""
    import tarfile

    with tarfile.open(lists_tar) as tar:
        raws = {name: tar.extractfile(f"{name}_list.mat").read() for name in ("train", "test")}
    return {name: (raw, ["Images/" + f for f in read_mat_list(raw)]) for name, raw in raws.items()}


@dataclass(frozen=True)
class Split:
    train: tuple[str, ...]
    val: tuple[str, ...]
    source: str  # "official" or "seeded"


def split(manifest: Manifest, val_fraction: float = 0.2, seed: int = 0) -> Split:
    """Train/validation keys: the official lists when present, else a seeded stratified split.

    The seeded split ranks each class's keys by a hash of (seed, key), so it is the same on every
    rank and whatever order the listing came back in.
    """
    if not 0 < val_fraction < 1:
        raise ParameterError(f"val_fraction={val_fraction}; allowed: strictly between 0 and 1")
    present = set(manifest.keys)
    if "train" in manifest.official and "test" in manifest.official:
        train = tuple(k for k in manifest.official["train"] if k in present)
        val = tuple(k for k in manifest.official["test"] if k in present)
        return Split(train, val, "official")
    by_class = defaultdict(list)
    for k in manifest.keys:
        by_class[class_folder(k)].append(k)
    train, val = [], []
    for folder in sorted(by_class):
        ranked = sorted(
            by_class[folder], key=lambda k: hashlib.sha1(f"{seed}:{k}".encode()).digest()
        )
        n_val = max(1, round(len(ranked) * val_fraction)) if len(ranked) > 1 else 0
        val += ranked[:n_val]
        train += ranked[n_val:]
    return Split(tuple(sorted(train)), tuple(sorted(val)), "seeded")


def archive_key(name: str, images_tar: str | os.PathLike) -> str:
    """The key of ``images.tar``'s member ``name``: ``Images/<wnid>-<breed>/<file>``; refuses a
    member in another layout, naming it."""
    parts = name.lstrip("./").split("/")
    if len(parts) != 3 or parts[0] != "Images" or "-" not in parts[1]:
        raise ParameterError(
            f"{images_tar}: member {name!r} is not in the Stanford Dogs layout "
            "Images/<wnid>-<breed>/<file>.jpg"
        )
    return "/".join(parts)


def dataset(
    manifest: Manifest,
    keys: Sequence[str],
    options: dict | None,
    image_size: int,
    train: bool,
    on_error: str = "skip",
    cache_dir: str | None = None,
) -> S3ImageDataset:
    """The lazy dataset over ``keys`` of ``manifest`` (one GET per image, when indexed), with
    their labels and the training or evaluation transforms at ``image_size``.

    ``cache_dir``: a local folder that keeps fetched objects (compressed, as stored), so epochs
    after the first read local disk instead of S3; shared by every process on the host.
    """
    tf = train_transform(image_size) if train else eval_transform(image_size)
    labels = [manifest.label(k) for k in keys]
    return S3ImageDataset(
        manifest.url, keys, labels, options, tf, on_error, draft=image_size, cache_dir=cache_dir
    )


def connect(endpoint: str, data_dir: str | os.PathLike = ".s3data") -> dict:
    """Storage options for the notebooks' ``s3_endpoint`` parameter.

    - ``"embedded"``: reuse the server already serving ``data_dir`` (``make s3``) or start one
      that lives as long as this process;
    - ``""``: AWS itself, or ``AWS_ENDPOINT_URL`` when set;
    - ``"http(s)://host:port"``: that S3-compatible endpoint.
    """
    import atexit

    if endpoint == "embedded":
        running = server.running_options(data_dir)  # its endpoint and credentials
        if running is None:
            embedded = server.EmbeddedS3(data_dir).start()
            atexit.register(embedded.stop)
            return embedded.storage_options
        return running
    if endpoint and not endpoint.startswith(("http://", "https://")):
        raise ParameterError(
            f"s3_endpoint={endpoint!r}; allowed: 'embedded', '' (AWS or "
            "AWS_ENDPOINT_URL), or an http(s):// URL"
        )
    return storage.storage_options(endpoint or None)
