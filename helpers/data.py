"""The Stanford Dogs layout, its splits, and a lazy PyTorch Dataset over S3 (or local) objects.

Layout, as in the official ``images.tar``::

    <prefix>/Images/n02085620-Chihuahua/n02085620_10074.jpg   # folder = class = wnid-breed
    <prefix>/train_list.mat, <prefix>/test_list.mat           # optional: the official split
    <prefix>/manifest.json                                    # the cached listing (ours)

The dataset lists once (or reads the manifest), then fetches and decodes an image only when it is
indexed; a batch's objects are fetched concurrently.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field

from helpers import storage

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MANIFEST = "manifest.json"


class BadImageError(ValueError):
    """An object that is not a decodable image; the message names its key."""


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


def make_manifest(url: str, keys, official: dict) -> Manifest:
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


def shard(keys, rank: int, world_size: int) -> tuple[str, ...]:
    """Rank ``rank``'s share of ``keys``: disjoint across ranks, together all of them."""
    return tuple(keys[rank::world_size])


def decode_image(data: bytes, key: str, draft: int | None = None):
    """Bytes -> RGB PIL image, whatever the mode (L, CMYK, RGBA, P) or the name's suffix.

    ``draft`` lets the JPEG decoder scale by 1/2, 1/4 or 1/8 while decoding (the DCT does it for
    free) as long as both sides stay >= ``draft``: a 500 px photo trained at 128 px decodes at
    half scale, a quarter of the pixels. Raises :class:`BadImageError` naming ``key`` for
    anything that is not an image.
    """
    from PIL import Image

    if not data:
        raise BadImageError(f"{key}: empty object (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
        if draft and img.format == "JPEG":
            img.draft("RGB", (draft, draft))
        img.load()  # decode now: a truncated file fails here, not inside a transform
    except Exception as err:  # noqa: BLE001 - PIL raises many types for bad data
        raise BadImageError(f"{key}: not a readable image ({type(err).__name__}: {err})") from err
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img.convert("RGB")


def train_transform(image_size: int):
    """Standard training augmentation (torchvision's classification recipe), ending in uint8.

    Normalisation happens on the device, inside the model (``helpers.train``): the loader ships
    a quarter of the bytes of float32 and the CPU skips two passes over every image.
    """
    from torchvision import transforms as T

    return T.Compose(
        [
            T.RandomResizedCrop(image_size, scale=(0.25, 1.0), antialias=True),
            T.RandomHorizontalFlip(),
            T.PILToTensor(),
        ]
    )


def eval_transform(image_size: int):
    """Resize the short side to 8/7 of ``image_size`` and take the centre crop, uint8."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Resize(round(image_size * 8 / 7), antialias=True),
            T.CenterCrop(image_size),
            T.PILToTensor(),
        ]
    )


class S3ImageDataset:
    """Map-style dataset over image objects, fetched and decoded only when indexed.

    Picklable and fork-safe: it holds a URL, keys and options, never a filesystem; each process
    makes its own on first use. The DataLoader calls ``__getitems__`` with a whole batch of
    indices, whose objects are fetched concurrently (one round trip of latency per batch, not per
    image). Bad objects are skipped with a warning naming the key (``on_error="skip"``) or raise
    (``on_error="raise"``).
    """

    def __init__(
        self,
        url: str,
        keys,
        classes,
        options: dict | None = None,
        transform=None,
        on_error: str = "skip",
        draft: int | None = None,
        cache_dir: str | None = None,
    ):
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error={on_error!r}; allowed: 'skip', 'raise'")
        self.url, self.keys, self.options = url, list(keys), dict(options or {})
        self.classes = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.transform, self.on_error, self.draft = transform, on_error, draft
        self.root = storage.split_url(url)[1]
        self.cache_dir = cache_dir

    def __len__(self) -> int:
        return len(self.keys)

    def label(self, i: int) -> int:
        """The class index of item ``i`` (-1 when the dataset was built without classes)."""
        return self.class_to_idx.get(class_folder(self.keys[i]), -1)

    def __getitem__(self, i: int):
        items = self.__getitems__([i])  # raises for a bad image when on_error="raise"
        return items[0] if items else None

    def __getitems__(self, indices: list[int]) -> list:
        return [(x, y) for _, x, y in self.samples(indices)]

    def samples(self, indices: list[int]) -> list[tuple]:
        """``(index, image, label)`` for each readable index: the batch fetched concurrently."""
        paths = [f"{self.root}/{self.keys[i]}" for i in indices]
        blobs = self._fetch(paths)
        out = []
        for i, path in zip(indices, paths, strict=True):
            sample = self._sample(i, blobs.get(path))
            if sample is not None:
                out.append((i, *sample))
        return out

    def _fetch(self, paths: list[str]) -> dict:
        """Bytes (or the exception) per path: local cache first, then one concurrent S3 round."""
        cached = {p: self._cache_read(p) for p in paths} if self.cache_dir else {}
        missing = [p for p in paths if cached.get(p) is None]
        if missing:
            fs = storage.filesystem(self.url, self.options)
            try:
                fetched = fs.cat(missing, on_error="return")  # concurrent GETs, no HEAD first
            except Exception as err:  # noqa: BLE001
                raise storage.StorageError(storage.explain(err, self.url, self.options)) from err
            if self.cache_dir:
                for p, blob in fetched.items():
                    if isinstance(blob, bytes):
                        self._cache_write(p, blob)
            cached.update(fetched)
        return cached

    def _cache_file(self, path: str) -> str:
        import os

        name = hashlib.sha1(f"{self.url}|{path}".encode()).hexdigest()
        return os.path.join(self.cache_dir, name[:2], name)

    def _cache_read(self, path: str) -> bytes | None:
        try:
            with open(self._cache_file(path), "rb") as f:
                return f.read()
        except OSError:
            return None

    def _cache_write(self, path: str, blob: bytes) -> None:
        """Atomic (write then rename): loader processes on one host share the folder safely."""
        import os
        import tempfile

        target = self._cache_file(path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target))
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.replace(tmp, target)

    def _sample(self, i: int, blob):
        key = self.keys[i]
        try:
            if isinstance(blob, FileNotFoundError):
                raise BadImageError(f"{key}: listed but missing from {self.url}")
            if isinstance(blob, Exception):
                raise storage.StorageError(storage.explain(blob, self.url, self.options))
            img = decode_image(blob, key, self.draft)
        except BadImageError as err:
            if self.on_error == "raise":
                raise
            log.warning("skipping %s", err)
            return None
        x = self.transform(img) if self.transform else img
        return x, self.label(i)


def collate(batch: list):
    """``default_collate`` without the skipped samples; ``None`` when the whole batch was bad."""
    from torch.utils.data import default_collate

    batch = [b for b in batch if b is not None]
    return default_collate(batch) if batch else None


def make_dataset(
    manifest: Manifest,
    keys,
    options: dict | None,
    image_size: int,
    train: bool,
    on_error: str = "skip",
    cache_dir: str | None = None,
) -> S3ImageDataset:
    """A dataset over ``keys`` of ``manifest`` with the training or evaluation transforms.

    ``cache_dir``: a local folder that keeps fetched objects (compressed, as stored), so epochs
    after the first read local disk instead of S3; shared by every process on the host.
    """
    tf = train_transform(image_size) if train else eval_transform(image_size)
    return S3ImageDataset(
        manifest.url,
        keys,
        manifest.classes,
        options,
        tf,
        on_error,
        draft=image_size,
        cache_dir=cache_dir or None,
    )


def make_loader(
    dataset,
    batch_size: int,
    num_workers: int = 2,
    shuffle: bool = False,
    sampler=None,
    drop_last: bool = False,
    pin_memory: bool = False,
):
    """A DataLoader with worker processes that prefetch whole batches; see :func:`collate`."""
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
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
    )


def image_stats(url: str, keys, options: dict | None = None) -> list[dict]:
    """Size and mean colour of some images: a small, picklable result for a Dask task."""
    import numpy as np

    ds = S3ImageDataset(url, keys, [], options)  # its fetch: cache-free, one concurrent round
    out = []
    for i, img, _ in ds.samples(list(range(len(keys)))):  # bad images are skipped and logged
        key = keys[i]
        r, g, b = np.asarray(img.reduce(4), dtype="float32").reshape(-1, 3).mean(0) / 255
        out.append(
            {
                "key": key,
                "breed": breed(class_folder(key)),
                "width": img.width,
                "height": img.height,
                "red": r,
                "green": g,
                "blue": b,
            }
        )
    return out


def time_loader(loader, max_batches: int | None = None) -> dict:
    """Iterate a loader and measure it: images, seconds, img/s (first batch included)."""
    import time

    n, start = 0, time.perf_counter()
    for i, batch in enumerate(loader):
        if batch is not None:
            n += len(batch[1])
        if max_batches is not None and i + 1 >= max_batches:
            break
    seconds = time.perf_counter() - start
    return {"images": n, "seconds": round(seconds, 2), "img_per_s": round(n / seconds, 1)}


def loader_throughput(
    manifest: Manifest,
    keys,
    options: dict | None,
    image_size: int,
    batch_size: int,
    num_workers: int,
    max_batches: int | None = None,
) -> dict:
    """Build a training loader where this runs (e.g. inside a Dask worker) and time it."""
    import torch

    threads = torch.get_num_threads()  # the setting outlives this task on a Dask worker
    torch.set_num_threads(1)  # the loader's processes do the work; keep this one light
    try:
        ds = make_dataset(manifest, keys, options, image_size, train=True)
        loader = make_loader(ds, batch_size, num_workers, shuffle=True)
        return time_loader(loader, max_batches)
    finally:
        torch.set_num_threads(threads)
