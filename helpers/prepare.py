"""Put a dataset in the Stanford Dogs layout into S3 (or a local folder), and its shards.

Two sources, one layout (``<prefix>/Images/<wnid>-<breed>/<wnid>_<n>.jpg``):

- ``synthetic``: seeded, generated "dogs" with real Stanford folder names, each breed one big
  silhouette (:mod:`helpers.loading.synthetic`: a colour histogram guesses them at chance);
- ``archive``: the official ``images.tar`` (and ``lists.tar``) from a local path.

Then tar shards of it (:func:`ensure_shards`, :mod:`helpers.shards.write`), from the objects or
straight from the archive.

Command line::

    python -m helpers.prepare synthetic s3://dogs/silhouettes --endpoint embedded
    python -m helpers.prepare archive images.tar s3://my-bucket/stanford-dogs --lists lists.tar
    python -m helpers.prepare shards s3://my-bucket/stanford-dogs        # tar shards of it
"""

from __future__ import annotations

import argparse
import logging
import tarfile
from pathlib import Path

from helpers import data
from helpers.errors import ParameterError, ShardIndexError, StorageError
from helpers.loading.synthetic import synthetic_image, synthetic_keys
from helpers.s3 import storage
from helpers.shards import format as shard_format
from helpers.shards import write
from helpers.show.progress import Callback, progress

log = logging.getLogger(__name__)

UPLOAD_CHUNK = 128  # objects per concurrent PUT round


def write_synthetic(
    url: str,
    options: dict | None = None,
    n_breeds: int = 10,
    per_breed: int = 200,
    seed: int = 0,
    callback: Callback | None = None,
) -> data.Manifest:
    """Generate the synthetic dataset under ``url`` (deterministic for a seed) and its manifest.

    Progress (images uploaded): a notebook bar or log lines, and ``callback(done, total)``."""
    import numpy as np

    keys = synthetic_keys(n_breeds, per_breed)
    _ensure_bucket(url, options)
    fs = storage.filesystem(url, options)
    root = storage.split_url(url)[1]
    with progress(len(keys), f"synthetic {url}", callback, unit="img") as bar:
        for start in range(0, len(keys), UPLOAD_CHUNK):
            chunk = keys[start : start + UPLOAD_CHUNK]
            blobs = {}
            for key, label in chunk:
                rng = np.random.default_rng([seed, label, int(key.rsplit("_", 1)[1][:-4])])
                blobs[f"{root}/{key}"] = synthetic_image(label, n_breeds, rng)
            fs.pipe(blobs)  # concurrent PUTs
            bar.update(len(chunk))
    manifest = data.make_manifest(url, [k for k, _ in keys], {})
    data.write_manifest(manifest, options)
    log.info("wrote %d synthetic images of %d breeds to %s", len(keys), n_breeds, url)
    return manifest


def ensure_synthetic(
    url: str,
    options: dict | None = None,
    n_breeds: int = 10,
    per_breed: int = 200,
    seed: int = 0,
    callback: Callback | None = None,
) -> data.Manifest:
    """The dataset at ``url``: reuse what is there, generate it only if nothing is."""
    try:
        manifest = data.load_manifest(url, options)
    except StorageError as err:
        if "does not exist" not in str(err) and "nothing stored" not in str(err):
            raise
        return write_synthetic(url, options, n_breeds, per_breed, seed, callback)
    if len(manifest.classes) != n_breeds or len(manifest.keys) != n_breeds * per_breed:
        log.warning(
            "%s already holds %d images of %d breeds; using them as they are",
            url,
            len(manifest.keys),
            len(manifest.classes),
        )
    return manifest


def _ensure_bucket(url: str, options: dict | None) -> None:
    protocol, path = storage.split_url(url)
    fs = storage.filesystem(url, options)
    if protocol != "s3":
        fs.makedirs(path, exist_ok=True)
        return
    bucket = path.split("/", 1)[0]
    with storage.explained(url, options):
        try:
            fs.ls(bucket, detail=False)
        except FileNotFoundError:
            fs.mkdir(bucket)


def upload_archive(
    images_tar: str | Path,
    url: str,
    options: dict | None = None,
    lists_tar: str | Path | None = None,
    callback: Callback | None = None,
) -> data.Manifest:
    """Stream the official ``images.tar`` (and ``lists.tar``) into ``url`` in the same layout.

    Progress (images uploaded, of 20,580 for the official archive): ``callback(done, 0)``."""
    _ensure_bucket(url, options)
    fs = storage.filesystem(url, options)
    root = storage.split_url(url)[1]
    keys, blobs = [], {}
    bar = progress(0, f"upload {url}", callback, unit="img")  # streamed: the count is unknown
    with bar, tarfile.open(images_tar, mode="r|*") as tar:  # 750 MB never sits in memory
        for member in tar:
            if not member.isfile():
                continue
            key = data.archive_key(member.name, images_tar)
            blobs[f"{root}/{key}"] = tar.extractfile(member).read()
            keys.append(key)
            if len(blobs) >= UPLOAD_CHUNK:
                fs.pipe(blobs)
                bar.update(len(blobs))
                blobs = {}
        if blobs:
            fs.pipe(blobs)
            bar.update(len(blobs))
    if not keys:
        raise ParameterError(f"{images_tar}: no images in the archive")
    official = {}
    for name, (raw, listed) in (data.official_lists(lists_tar) if lists_tar else {}).items():
        fs.pipe_file(f"{root}/{name}_list.mat", raw)
        official[name] = listed
    manifest = data.make_manifest(url, sorted(keys), official)
    data.write_manifest(manifest, options)
    log.info("uploaded %d images of %d breeds to %s", len(keys), len(manifest.classes), url)
    return manifest


def ensure_shards(
    url: str,
    options: dict | None = None,
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    write_missing: bool = True,
) -> dict:
    """The shard index of ``url``: the existing one when it was built from the current manifest
    and split, else (``write_missing``) the shards written afresh from the objects (the demo's
    "make them if missing"); without ``write_missing``, an error that says how to write them."""
    try:
        index = shard_format.read_index(url, options)
        shard_format.check_index(index, data.load_manifest(url, options), val_fraction, seed)
        return index
    except ShardIndexError as err:
        if not write_missing:
            raise
        log.info("writing the shards of %s (%s)", url, str(err).split(";")[0])
    return write_shards(url, options, val_fraction=val_fraction, seed=seed)


def write_shards(
    url: str,
    options: dict | None = None,
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    shard_size: int = shard_format.DEFAULT_SHARD_SIZE,
    manifest: data.Manifest | None = None,
) -> dict:
    """Shard the per-object dataset at ``url`` (its manifest, or ``manifest``); the index."""
    manifest = manifest or data.load_manifest(url, options)
    return write.write_shards(
        manifest,
        data.split(manifest, val_fraction, seed),
        write.from_objects(url, options),
        options,
        val_fraction=val_fraction,
        seed=seed,
        shard_size=shard_size,
    )


def shards_from_archive(
    images_tar: str | Path,
    url: str,
    options: dict | None = None,
    *,
    lists_tar: str | Path | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    shard_size: int = shard_format.DEFAULT_SHARD_SIZE,
    spool_dir: str | None = None,
) -> dict:
    """Shards (and ``manifest.json``) straight from the official ``images.tar``: no objects.

    The archive is read once as a stream (gzip or a pipe are fine). It is sorted by breed and
    shards must mix breeds, so its images are spooled to one local temporary file (the archive's
    size on disk in ``spool_dir``, never in memory) and packed from there.
    """
    import tempfile

    _ensure_bucket(url, options)
    with tempfile.TemporaryFile(dir=spool_dir) as spool:
        where: dict[str, tuple[int, int]] = {}
        with tarfile.open(images_tar, mode="r|*") as tar:
            for member in tar:
                if member.isfile():
                    blob = tar.extractfile(member).read()
                    where[data.archive_key(member.name, images_tar)] = (spool.tell(), len(blob))
                    spool.write(blob)
        if not where:
            raise ParameterError(f"{images_tar}: no images in the archive")
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
        split = data.split(manifest, val_fraction, seed)
        return write.write_shards(
            manifest,
            split,
            fetch,
            options,
            val_fraction=val_fraction,
            seed=seed,
            shard_size=shard_size,
        )


def main(argv: list[str] | None = None) -> None:
    """Put a Stanford-Dogs-layout dataset into S3 or a folder."""
    parser = argparse.ArgumentParser(prog="python -m helpers.prepare", description=main.__doc__)
    parser.add_argument(
        "--endpoint",
        default="",
        help="'embedded', an http(s):// S3 endpoint, or '' for AWS / AWS_ENDPOINT_URL",
    )
    parser.add_argument("--s3-dir", default=".s3data", help="data folder of the embedded server")
    sub = parser.add_subparsers(dest="command", required=True)
    syn = sub.add_parser("synthetic", help="generate the synthetic dogs")
    syn.add_argument("url")
    syn.add_argument("--breeds", type=int, default=10)
    syn.add_argument("--per-breed", type=int, default=200)
    syn.add_argument("--seed", type=int, default=0)
    arc = sub.add_parser("archive", help="upload the official images.tar")
    arc.add_argument("images_tar")
    arc.add_argument("url")
    arc.add_argument("--lists", default=None, help="the official lists.tar (train/test split)")
    shd = sub.add_parser("shards", help="write tar shards (helpers.shards) of a dataset")
    shd.add_argument("url")
    shd.add_argument("--shard-size", type=int, default=48, help="images per shard")
    shd.add_argument("--val-fraction", type=float, default=0.2)
    shd.add_argument("--seed", type=int, default=0)
    shd.add_argument("--archive", default=None, help="from images.tar: shards only, no objects")
    shd.add_argument("--lists", default=None, help="with --archive: the official lists.tar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    options = data.connect(args.endpoint, args.s3_dir)
    if args.command == "shards":
        kw = {"val_fraction": args.val_fraction, "seed": args.seed, "shard_size": args.shard_size}
        if args.archive:
            index = shards_from_archive(args.archive, args.url, options, lists_tar=args.lists, **kw)
        else:
            index = write_shards(args.url, options, **kw)
        for name, s in index["splits"].items():
            where = shard_format.location(args.url)
            print(f"{where}: {name} {s['images']} images in {len(s['shards'])} shards")
        return
    if args.command == "synthetic":
        m = ensure_synthetic(args.url, options, args.breeds, args.per_breed, args.seed)
    else:
        m = upload_archive(args.images_tar, args.url, options, args.lists)
    print(f"{args.url}: {len(m.keys)} images, {len(m.classes)} breeds")


if __name__ == "__main__":
    main()
