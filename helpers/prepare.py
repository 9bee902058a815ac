"""Put a dataset in the Stanford Dogs layout into S3 (or a local folder).

Two sources, one layout (``<prefix>/Images/<wnid>-<breed>/<wnid>_<n>.jpg``):

- ``synthetic``: seeded, generated "dogs" with real Stanford folder names, each breed one big
  silhouette (``helpers.synthetic``: a colour histogram guesses them at chance);
- ``archive``: the official ``images.tar`` (and ``lists.tar``) from a local path.

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

from helpers import data, s3server, storage
from helpers.progress import Callback, progress
from helpers.synthetic import STANFORD_CLASSES, synthetic_image, synthetic_keys  # noqa: F401 - callers

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
    except storage.StorageError as err:
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
    try:
        fs.ls(bucket, detail=False)
    except FileNotFoundError:
        fs.mkdir(bucket)
    except Exception as err:  # noqa: BLE001
        raise storage.StorageError(storage.explain(err, url, options)) from err


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
            parts = member.name.lstrip("./").split("/")
            if len(parts) != 3 or parts[0] != "Images" or "-" not in parts[1]:
                raise ValueError(
                    f"{images_tar}: member {member.name!r} is not in the Stanford "
                    "Dogs layout Images/<wnid>-<breed>/<file>.jpg"
                )
            key = "/".join(parts)
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
        raise ValueError(f"{images_tar}: no images in the archive")
    official = {}
    for name, (raw, listed) in (data.official_lists(lists_tar) if lists_tar else {}).items():
        fs.pipe_file(f"{root}/{name}_list.mat", raw)
        official[name] = listed
    manifest = data.make_manifest(url, sorted(keys), official)
    data.write_manifest(manifest, options)
    log.info("uploaded %d images of %d breeds to %s", len(keys), len(manifest.classes), url)
    return manifest


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
    options = s3server.connect(args.endpoint, args.s3_dir)
    if args.command == "shards":
        _shards(args, options)
        return
    if args.command == "synthetic":
        m = ensure_synthetic(args.url, options, args.breeds, args.per_breed, args.seed)
    else:
        m = upload_archive(args.images_tar, args.url, options, args.lists)
    print(f"{args.url}: {len(m.keys)} images, {len(m.classes)} breeds")


def _shards(args, options: dict) -> None:
    from helpers import shards, shardwrite

    kw = {"val_fraction": args.val_fraction, "seed": args.seed, "shard_size": args.shard_size}
    if args.archive:
        _ensure_bucket(args.url, options)
        index = shardwrite.write_shards_from_archive(
            args.archive, args.url, options, **kw, lists_tar=args.lists
        )
    else:
        index = shardwrite.write_shards(args.url, options, **kw)
    for name, s in index["splits"].items():
        print(
            f"{shards.location(args.url)}: {name} {s['images']} images in {len(s['shards'])} shards"
        )


if __name__ == "__main__":
    main()
