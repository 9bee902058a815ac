"""Put a dataset in the Stanford Dogs layout into S3 (or a local folder).

Two sources, one layout (``<prefix>/Images/<wnid>-<breed>/<wnid>_<n>.jpg``):

- ``synthetic``: seeded, generated "dogs" with real Stanford folder names, each breed a learnable
  visual signature (a shape and a hue) under noise, position, scale and colour jitter;
- ``archive``: the official ``images.tar`` (and ``lists.tar``) from a local path.

Command line::

    python -m helpers.prepare synthetic s3://dogs/synthetic --endpoint embedded
    python -m helpers.prepare archive images.tar s3://my-bucket/stanford-dogs --lists lists.tar
"""

from __future__ import annotations

import argparse
import colorsys
import io
import logging
import math
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING

from helpers import data, s3server, storage
from helpers.progress import Callback, progress

if TYPE_CHECKING:  # names for annotations only: importing costs nothing at run time
    import numpy as np

log = logging.getLogger(__name__)

# Real Stanford Dogs class folders (WordNet id - breed), in the dataset's own order.
STANFORD_CLASSES = (
    "n02085620-Chihuahua",
    "n02085782-Japanese_spaniel",
    "n02085936-Maltese_dog",
    "n02086079-Pekinese",
    "n02086240-Shih-Tzu",
    "n02086646-Blenheim_spaniel",
    "n02086910-papillon",
    "n02087046-toy_terrier",
    "n02087394-Rhodesian_ridgeback",
    "n02088094-Afghan_hound",
    "n02088238-basset",
    "n02088364-beagle",
    "n02088466-bloodhound",
    "n02088632-bluetick",
    "n02089078-black-and-tan_coonhound",
    "n02089867-Walker_hound",
    "n02089973-English_foxhound",
    "n02090379-redbone",
    "n02090622-borzoi",
    "n02090721-Irish_wolfhound",
)
SHAPES = ("ellipse", "square", "triangle", "star", "ring", "cross")
UPLOAD_CHUNK = 128  # objects per concurrent PUT round


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple]:
    if shape == "triangle":
        pts = [(1, a) for a in (0, 120, 240)]
    elif shape == "star":
        pts = [(1 if i % 2 == 0 else 0.45, i * 36) for i in range(10)]
    elif shape == "cross":
        w = 0.35
        pts = [
            (math.hypot(x, y), math.degrees(math.atan2(y, x)))
            for x, y in ((w, 1), (w, w), (1, w), (1, -w), (w, -w), (w, -1), (-w, -1), (-w, -w),
                         (-1, -w), (-1, w), (-w, w), (-w, 1))
        ]  # fmt: skip
    else:  # square
        pts = [(1, a) for a in (45, 135, 225, 315)]
    return [
        (
            cx + r * m * math.cos(math.radians(a + angle)),
            cy + r * m * math.sin(math.radians(a + angle)),
        )
        for m, a in pts
    ]


def _draw(draw, shape: str, cx, cy, r, angle, color) -> None:
    box = (cx - r, cy - r * 0.8, cx + r, cy + r * 0.8)
    if shape == "ellipse":
        draw.ellipse(box, fill=color)
    elif shape == "ring":
        draw.ellipse(box, outline=color, width=max(3, int(r * 0.3)))
    else:
        draw.polygon(_polygon(shape, cx, cy, r, angle), fill=color)


def synthetic_image(label: int, n_classes: int, rng: np.random.Generator) -> bytes:
    """One JPEG of class ``label``: its shape and hue on a noisy background, plus distractors."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    side = rng.integers(200, 501)
    aspect = rng.uniform(0.7, 1.4)
    w, h = int(side * math.sqrt(aspect)), int(side / math.sqrt(aspect))
    # Background: a smooth low-saturation gradient plus sensor-like noise.
    base = np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0, 0.3), rng.uniform(0.3, 0.9)))
    coarse = base + rng.normal(0, 0.12, (4, 4, 3))
    bg = Image.fromarray((np.clip(coarse, 0, 1) * 255).astype("uint8")).resize(
        (w, h), Image.BICUBIC
    )
    img = np.asarray(bg, dtype=np.int16) + rng.normal(0, 12, (h, w, 3)).astype(np.int16)
    img = Image.fromarray(np.clip(img, 0, 255).astype("uint8"))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(1, 4)):  # grey distractors of any shape
        g = int(rng.integers(60, 200))
        shape, x, y = SHAPES[rng.integers(len(SHAPES))], rng.uniform(0, w), rng.uniform(0, h)
        size = rng.uniform(0.05, 0.15) * min(w, h)
        _draw(draw, shape, x, y, size, rng.uniform(0, 360), (g, g, g))
    hue = (label / n_classes + rng.normal(0, 0.015)) % 1.0
    color = tuple(
        int(c * 255) for c in colorsys.hsv_to_rgb(hue, rng.uniform(0.55, 1), rng.uniform(0.55, 1))
    )
    r = rng.uniform(0.18, 0.35) * min(w, h)
    x, y = rng.uniform(r, w - r), rng.uniform(r, h - r)
    _draw(draw, SHAPES[label % len(SHAPES)], x, y, r, rng.uniform(0, 360), color)
    if rng.uniform() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.5)))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=int(rng.integers(75, 96)))
    return buf.getvalue()


def synthetic_keys(n_breeds: int, per_breed: int) -> list[tuple[str, int]]:
    if not 1 <= n_breeds <= len(STANFORD_CLASSES):
        raise ValueError(f"n_breeds={n_breeds}; allowed: 1 to {len(STANFORD_CLASSES)}")
    if per_breed < 2:
        raise ValueError(f"images_per_breed={per_breed}; allowed: 2 or more")
    out = []
    for label, folder in enumerate(STANFORD_CLASSES[:n_breeds]):
        wnid = folder.split("-")[0]
        out += [(f"Images/{folder}/{wnid}_{10000 + i}.jpg", label) for i in range(per_breed)]
    return out


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
    if lists_tar:
        with tarfile.open(lists_tar) as tar:
            for name in ("train", "test"):
                raw = tar.extractfile(f"{name}_list.mat").read()
                fs.pipe_file(f"{root}/{name}_list.mat", raw)
                official[name] = ["Images/" + f for f in data.read_mat_list(raw)]
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    options = s3server.connect(args.endpoint, args.s3_dir)
    if args.command == "synthetic":
        m = ensure_synthetic(args.url, options, args.breeds, args.per_breed, args.seed)
    else:
        m = upload_archive(args.images_tar, args.url, options, args.lists)
    print(f"{args.url}: {len(m.keys)} images, {len(m.classes)} breeds")


if __name__ == "__main__":
    main()
