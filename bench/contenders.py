"""The loaders :mod:`bench_loading` compares, each built on equal terms.

Every contender reads the same training images of the same embedded S3 server (or a local
copy of them), decodes with ``transforms.decode_image`` (draft on or off, as asked) and
applies the one transform object it is given, in ``workers`` loader processes with the same
batch size, ``prefetch_factor`` and collate function, no disk cache, and workers started afresh
each pass (the shard stream needs that for its epochs; torch's default for the others).
``build(endpoint, draft)`` returns a fresh DataLoader, so one contender can be pointed at the
counting proxy for one pass and straight at the server for the timed ones.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from helpers import data
from helpers.loading import dataloader, transforms
from helpers.s3 import server as s3server
from helpers.s3 import storage
from helpers.shards import format as shard_format
from helpers.shards.stream import Reading, ShardStream, Share

REGION = "us-east-1"


@dataclass
class Settings:
    """What every contender shares."""

    manifest: data.Manifest
    keys: tuple[str, ...]  # the training split: what every contender reads
    options: dict  # storage options of the server (direct endpoint)
    transform: Any  # the one transform object, shared
    image_size: int
    batch_size: int
    workers: int
    prefetch: int  # DataLoader prefetch_factor
    shuffle_buffer: int = 256
    seed: int = 0


@dataclass
class Contender:
    """One loader under test; ``drafts``: the draft settings it can run with."""

    key: str
    name: str
    build: Callable[[str, bool], Any]  # (endpoint url, draft) -> DataLoader
    drafts: tuple[bool, ...] = (True, False)
    env: Callable[[str], dict[str, str | None]] = field(default=lambda endpoint: {})
    images: int = 0  # images per pass


def loader(s: Settings, dataset, shuffle: bool):
    """A DataLoader with the shared settings (the shard stream's: ``dataloader.stream_loader``)."""
    from torch.utils.data import DataLoader

    return DataLoader(
        dataset,
        batch_size=s.batch_size,
        shuffle=shuffle,
        num_workers=s.workers,
        collate_fn=dataloader.collate,
        persistent_workers=False,
        prefetch_factor=s.prefetch if s.workers else None,
    )


def at(options: dict, endpoint: str) -> dict:
    """The storage options with another endpoint (the proxy's, or the server's own)."""
    return {**options, "endpoint_url": endpoint}


def shards(s: Settings) -> Contender:
    """The project's streaming shards: ``ShardStream`` + ``dataloader.stream_loader``."""

    def build(endpoint: str, draft: bool):
        options = at(s.options, endpoint)
        index = shard_format.read_index(s.manifest.url, options)
        shard_format.check_index(index, s.manifest)
        share = Share(batch_size=s.batch_size, seed=s.seed)
        reading = Reading(
            transforms.decode_image,
            s.transform,
            image_size=s.image_size,
            draft=draft,
            shuffle_buffer=s.shuffle_buffer,
        )
        ds = ShardStream(index, s.manifest.url, "train", options, share, reading)
        return dataloader.stream_loader(ds, s.workers, prefetch=s.prefetch)

    return Contender("shards", "shards, helpers.shards.stream", build, images=len(s.keys))


def objects(s: Settings) -> Contender:
    """The project's per-object dataset (a batch's GETs concurrent), no disk cache."""
    from helpers.loading.objects import S3ImageDataset

    def build(endpoint: str, draft: bool):
        ds = S3ImageDataset(
            s.manifest.url,
            s.keys,
            [s.manifest.label(k) for k in s.keys],
            at(s.options, endpoint),
            s.transform,
            draft=s.image_size if draft else None,
        )
        return loader(s, ds, shuffle=True)

    return Contender("objects", "per-object, helpers.loading.objects", build, images=len(s.keys))


def _read_file(draft: int | None, path: str):
    with open(path, "rb") as f:
        return transforms.decode_image(f.read(), path, draft)


def imagefolder(s: Settings, root: Path) -> Contender:
    """torchvision's ``ImageFolder`` over a local copy: the ceiling (no network)."""
    from torchvision.datasets import ImageFolder

    def build(endpoint: str, draft: bool):
        read = functools.partial(_read_file, s.image_size if draft else None)
        ds = ImageFolder(str(root), transform=s.transform, loader=read)
        if tuple(ds.classes) != s.manifest.classes:
            raise RuntimeError(f"ImageFolder found classes {ds.classes}, not the manifest's")
        return loader(s, ds, shuffle=True)

    return Contender("imagefolder", "local-disk ImageFolder", build, images=len(s.keys))


def copy_to_local(s: Settings, root: Path, chunk: int = 128) -> Path:
    """The training images copied to ``root/Images/<class>/<file>`` (for ImageFolder)."""
    fs = storage.filesystem(s.manifest.url, s.options)
    prefix = storage.split_url(s.manifest.url)[1]
    for start in range(0, len(s.keys), chunk):
        part = s.keys[start : start + chunk]
        blobs = fs.cat([f"{prefix}/{k}" for k in part])
        for key in part:
            (root / key).parent.mkdir(parents=True, exist_ok=True)
            (root / key).write_bytes(blobs[f"{prefix}/{key}"])
    return root / "Images"


def credentials_env(endpoint: str) -> dict[str, str | None]:
    """What the AWS SDKs (boto3, the CRT) need to sign for the embedded server."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ENDPOINT_URL_S3": endpoint,  # botocore prefers it to AWS_ENDPOINT_URL when set
        "AWS_ACCESS_KEY_ID": s3server.DUMMY_CREDENTIALS["key"],
        "AWS_SECRET_ACCESS_KEY": s3server.DUMMY_CREDENTIALS["secret"],
        "AWS_SESSION_TOKEN": None,  # a real session's token would not match the dummy keys
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
    }


def _s3t_sample(tf, draft: int | None, class_to_idx: dict, reader):
    key = reader.key
    img = transforms.decode_image(reader.read(), key, draft)
    return tf(img), class_to_idx[data.class_folder(key)]


def s3torchconnector(s: Settings) -> Contender:
    """AWS's ``s3torchconnector`` map-style dataset over the same objects (one GET each)."""
    from s3torchconnector import S3ClientConfig, S3MapDataset

    bucket, prefix = storage.split_url(s.manifest.url)[1].split("/", 1)
    uris = [f"s3://{bucket}/{prefix}/{k}" for k in s.keys]
    classes = {c: i for i, c in enumerate(s.manifest.classes)}

    def build(endpoint: str, draft: bool):
        sample = functools.partial(
            _s3t_sample, s.transform, s.image_size if draft else None, classes
        )
        ds = S3MapDataset.from_objects(
            uris,
            region=REGION,
            endpoint=endpoint,
            transform=sample,
            s3client_config=S3ClientConfig(force_path_style=True),
        )
        return loader(s, ds, shuffle=True)

    return Contender(
        "s3torchconnector",
        "s3torchconnector S3MapDataset",
        build,
        env=credentials_env,
        images=len(uris),
    )


def _wds_sample(tf, draft: int | None, sample: dict):
    img = transforms.decode_image(sample["jpg"], sample["__key__"], draft)
    return tf(img), int(sample["cls"])


def webdataset(s: Settings, shard_names: list[str]) -> Contender:
    """``webdataset`` over the same train shards, streamed by curl from presigned URLs."""
    import webdataset as wds

    where = storage.join(s.manifest.url, "shards")
    root = storage.split_url(where)[1]

    def build(endpoint: str, draft: bool):
        fs = storage.filesystem(where, at(s.options, endpoint))
        urls = [fs.sign(f"{root}/{n}", expiration=6 * 3600) for n in shard_names]
        ds = (
            wds.WebDataset(
                urls,
                shardshuffle=len(urls),
                seed=s.seed,
                empty_check=False,
                workersplitter=wds.split_by_worker,
            )
            .shuffle(s.shuffle_buffer)
            .map(functools.partial(_wds_sample, s.transform, s.image_size if draft else None))
        )
        return loader(s, ds, shuffle=False)

    return Contender("webdataset", "webdataset, same shards", build, images=len(s.keys))


def dask_pytorch_ddp(s: Settings, limit: int) -> Contender:
    """``dask_pytorch_ddp.data.S3ImageFolder``: boto3 per image, its own PIL decode (no draft);
    timed on a seeded subset of ``limit`` training images (img/s is a rate)."""
    from dask_pytorch_ddp.data import S3ImageFolder
    from torch.utils.data import Subset

    bucket, prefix = storage.split_url(s.manifest.url)[1].split("/", 1)
    train = {f"{prefix}/{k}" for k in s.keys}
    with _environment(credentials_env(s.options["endpoint_url"])):  # it lists in __init__
        full = S3ImageFolder(bucket, f"{prefix}/Images/", transform=s.transform)
    if tuple(full.classes) != s.manifest.classes:
        raise RuntimeError(f"S3ImageFolder found classes {full.classes}, not the manifest's")
    idx = [i for i, f in enumerate(full.all_files) if f in train]
    if 0 < limit < len(idx):
        idx = sorted(random.Random(s.seed).sample(idx, limit))
    ds = Subset(full, idx)

    def build(endpoint: str, draft: bool):
        return loader(s, ds, shuffle=True)

    return Contender(
        "dask_pytorch_ddp",
        "dask_pytorch_ddp S3ImageFolder",
        build,
        drafts=(False,),
        env=credentials_env,
        images=len(idx),
    )


class _environment:
    """Set (None: unset) environment variables for a block, then restore them."""

    def __init__(self, values: dict[str, str | None]):
        self.values, self.saved = values, {}

    def __enter__(self):
        import os

        self.saved = {k: os.environ.get(k) for k in self.values}
        for k, v in self.values.items():
            _setenv(k, v)

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            _setenv(k, v)


def _setenv(name: str, value: str | None) -> None:
    import os

    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


environment = _environment
