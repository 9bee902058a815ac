"""The Stanford Dogs layout, its manifest (the cached listing), its splits, and the loader.

Layout, as in the official ``images.tar``::

    <prefix>/Images/n02085620-Chihuahua/n02085620_10074.jpg   # folder = class = wnid-breed
    <prefix>/train_list.mat, <prefix>/test_list.mat           # optional: the official split
    <prefix>/manifest.json                                    # the cached listing (ours)

A dataset is listed once into ``manifest.json``; every rank and loader process reads that one
object and computes the same split from it. The datasets themselves live in ``helpers.objects``
(one object per image) and ``helpers.shards`` (tar shards).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from helpers import storage

if TYPE_CHECKING:  # names for annotations only: importing costs nothing at run time
    import multiprocessing.context

    import torch
    from torch.utils.data import DataLoader, Dataset, Sampler

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
        return self.classes.index(class_folder(key))

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
        raise storage.StorageError(f"no images under {storage.describe(images, options)}")
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
    if not refresh:
        try:
            doc = json.loads(fs.cat_file(path))
            return make_manifest(url, doc["keys"], doc.get("official", {}))
        except FileNotFoundError:
            pass
        except Exception as err:  # noqa: BLE001
            raise storage.StorageError(storage.explain(err, url, options)) from err
    return list_images(url, options)


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
        raise ValueError(f"val_fraction={val_fraction}; allowed: strictly between 0 and 1")
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


def shard(keys: Sequence[str], rank: int, world_size: int) -> tuple[str, ...]:
    """Rank ``rank``'s share of ``keys``: disjoint across ranks, together all of them."""
    return tuple(keys[rank::world_size])


def collate(batch: list) -> tuple | None:
    """``default_collate`` without the skipped samples; ``None`` when the whole batch was bad."""
    from torch.utils.data import default_collate

    batch = [b for b in batch if b is not None]
    return default_collate(batch) if batch else None


# What a forkserver imports once, so that each loader process it forks has them already.
PRELOAD = ["torch", "torchvision.transforms.v2", "PIL.Image", "s3fs", "helpers.objects",
           "helpers.stream", "helpers.transforms", "helpers.gpudecode"]  # fmt: skip


def loader_context() -> multiprocessing.context.BaseContext | None:
    """Where loader processes come from: ``None`` (the default start method), except under the
    ``spawn`` start method, which Dask's worker processes run with. There each epoch's loader
    processes would start a fresh interpreter and import torch (seconds each, tens of seconds
    on a loaded machine); a forkserver, started once per worker process with :data:`PRELOAD`
    imported, forks them in milliseconds and, unlike a plain fork, copies none of the worker's
    threads (its event loop, gloo, s3fs)."""
    import multiprocessing

    if multiprocessing.get_start_method() != "spawn":
        return None
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return None  # Windows: spawn is all there is
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def make_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int = 2,
    shuffle: bool = False,
    sampler: Sampler | None = None,
    drop_last: bool = False,
    pin_memory: bool = False,
    generator: torch.Generator | None = None,
    persistent: bool = True,
) -> DataLoader:
    """A DataLoader with worker processes that prefetch whole batches; see :func:`collate`.

    ``generator`` seeds the worker processes (their augmentations) each time an epoch starts;
    with ``persistent=False`` they are started afresh each epoch, so a reseeded generator
    reproduces an epoch exactly (a resumed run), at the cost of starting them (a fork from
    :func:`loader_context`) each epoch.
    """
    from torch.utils.data import DataLoader

    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        drop_last=drop_last,
        pin_memory=pin_memory,
        generator=generator,
        persistent_workers=persistent and num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        multiprocessing_context=loader_context() if num_workers > 0 else None,
    )
