"""The per-object dataset: one S3 object per image, fetched and decoded only when indexed.

The teaching path of notebook 02 and the source of truth the shards are built from. A batch's
objects are fetched concurrently (one round trip of latency per batch, not per image).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Sequence

from helpers.errors import BadImageError, ParameterError, StorageError
from helpers.loading.transforms import decode_image
from helpers.s3 import presigned, retry, storage

log = logging.getLogger(__name__)

ON_ERROR = ("skip", "raise")


class S3ImageDataset:
    """Map-style dataset over image objects, fetched and decoded only when indexed.

    ``keys`` are relative to ``url``; ``labels`` (the same length) are their classes, or None
    when the images have none (label -1). Picklable and fork-safe: it holds a URL, keys and
    options, never a filesystem; each process makes its own on first use. The DataLoader calls
    ``__getitems__`` with a whole batch of indices, whose objects are fetched concurrently (one
    round trip of latency per batch, not per image). Bad objects are skipped with a warning
    naming the key (``on_error="skip"``) or raise (``on_error="raise"``). ``with_keys``: items
    are ``(image, label, key)`` (the training loaders: a rank can log what it trained on), else
    ``(image, label)``. ``cache_dir``: a local
    folder that keeps fetched objects (compressed, as stored), so epochs after the first read
    local disk instead of S3; shared by every process on the host.
    """

    def __init__(
        self,
        url: str,
        keys: Sequence[str],
        labels: Sequence[int] | None = None,
        options: dict | None = None,
        transform=None,
        on_error: str = "skip",
        draft: int | None = None,
        cache_dir: str | None = None,
        with_keys: bool = False,
    ):
        if on_error not in ON_ERROR:
            raise ParameterError(f"on_error={on_error!r}; allowed: 'skip', 'raise'")
        self.url, self.keys, self.options = url, list(keys), dict(options or {})
        self.labels = list(labels) if labels is not None else [-1] * len(self.keys)
        if len(self.labels) != len(self.keys):
            raise ParameterError(f"{len(self.labels)} labels for {len(self.keys)} keys")
        self.transform, self.on_error, self.draft = transform, on_error, draft
        self.with_keys = with_keys
        self.root = storage.split_url(url)[1]
        self.cache_dir = cache_dir
        self.versions = self._list_versions() if cache_dir else {}

    def _list_versions(self) -> dict[str, str]:
        """Each object's ETag (else size) from one listing (a LIST per 1,000 keys, no request
        per image): the cache's key, so a changed object is fetched again, not served stale."""
        fs = storage.filesystem(self.url, self.options)
        with storage.explained(self.url, self.options):
            found = fs.find(self.root, detail=True)
        return {p: str(i.get("ETag") or i.get("size") or "") for p, i in found.items()}

    def __len__(self) -> int:
        return len(self.keys)

    def label(self, i: int) -> int:
        """The class index of item ``i`` (-1 when the dataset was built without labels)."""
        return self.labels[i]

    def __getitem__(self, i: int):
        items = self.__getitems__([i])  # raises for a bad image when on_error="raise"
        return items[0] if items else None

    def __getitems__(self, indices: list[int]) -> list:
        if self.with_keys:
            return [(x, y, self.keys[i]) for i, x, y in self.samples(indices)]
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
        """Bytes (or the exception) per path: local cache first, then one concurrent S3 round,
        transient failures sent again (:func:`helpers.s3.retry.retry_each`)."""
        cached = {p: self._cache_read(p) for p in paths} if self.cache_dir else {}
        missing = [p for p in paths if cached.get(p) is None]
        if missing:
            where = storage.describe(self.url, self.options)
            fetched = retry.retry_each(missing, self._round, where)
            if self.cache_dir:
                for p, blob in fetched.items():
                    if isinstance(blob, bytes):
                        self._cache_write(p, blob)
            cached.update(fetched)
        return cached

    def _round(self, paths: list[str]) -> dict:
        """One concurrent GET per path: by presigned URL on kept-alive connections where the
        store allows it (:mod:`helpers.s3.presigned`: about half the CPU of s3fs per GET), the
        rest through s3fs. Bytes or the exception, per path."""
        got = presigned.get_many(presigned.sign(self.url, self.options, paths))
        rest = [p for p in paths if p not in got]
        if rest:
            fs = storage.filesystem(self.url, self.options)
            try:
                got.update(fs.cat(rest, on_error="return"))
            except Exception as err:  # noqa: BLE001 - the whole round failed
                if not retry.is_transient(err):
                    raise StorageError(storage.explain(err, self.url, self.options)) from err
                got.update(dict.fromkeys(rest, err))
        return got

    def _cache_file(self, path: str) -> str:
        version = self.versions.get(path, "")
        name = hashlib.sha1(f"{self.url}|{path}|{version}".encode()).hexdigest()
        return os.path.join(self.cache_dir, name[:2], name)

    def _cache_read(self, path: str) -> bytes | None:
        try:
            with open(self._cache_file(path), "rb") as f:
                return f.read()
        except OSError:
            return None

    def _cache_write(self, path: str, blob: bytes) -> None:
        """Atomic (write then rename): loader processes on one host share the folder safely."""
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
                raise StorageError(storage.explain(blob, self.url, self.options))
            img = self.decode(blob, key)
        except BadImageError as err:
            if self.on_error == "raise":
                raise
            log.warning("skipping %s", err)
            return None
        x = self.transform(img) if self.transform else img
        return x, self.label(i)

    def decode(self, blob: bytes, key: str) -> object:
        """An object's bytes as what the transform takes (a PIL image; under GPU decode, the
        bytes themselves); raises :class:`~helpers.errors.BadImageError` naming ``key``."""
        return decode_image(blob, key, self.draft)
