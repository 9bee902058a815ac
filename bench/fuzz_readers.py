"""Fuzz the readers of untrusted bytes: every case yields what it read or raises a named error.

Cases are mutations of good inputs, fed to the readers the loaders run on them:

- shards (header bytes, size fields, type flags, truncations, PAX and GNU records, zero
  blocks, names, random bytes) to :func:`helpers.shards.format.read_shard`;
- shard indexes (a value swapped for an awkward one, a key dropped, the JSON text cut or
  flipped) to :func:`~helpers.shards.format.read_index` and
  :func:`~helpers.shards.format.check_index`;
- manifests (the same mutations) to :func:`helpers.data.load_manifest`;
- images (zero bytes, cut short, bytes flipped, a PNG under a ``.jpg`` key, CMYK, a header
  declaring huge dimensions) to :func:`helpers.loading.transforms.decode_image` and
  :func:`helpers.loading.gpudecode.keep_jpeg`;
- given an S3 server (:class:`Served`), a :class:`~helpers.shards.stream.ShardStream` epoch
  over a mutated shard stored there.

A case ends one of four ways: it yielded something (samples, an index, a manifest, an image),
it raised an error of the project's (:class:`~helpers.errors.DaskDLError`: named), it ran past
its time (``signal.setitimer`` raises :class:`Hang` in the main thread), or it raised anything
else. A reader is sound when hangs, other errors and silent cases (nothing read, nothing
raised) stay at 0. ``tests/shards/test_fuzz.py`` runs this for seconds; this script for longer,
writing a benchmark record (:mod:`bench.record`)::

    python -m bench.fuzz_readers [--seconds 120] [--seed 0]
"""

from __future__ import annotations

import argparse
import io
import json
import random
import signal
import struct
import tarfile
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from helpers.errors import DaskDLError

LIMIT_S = 1.0  # a case running longer has hung
STREAM_SHARE = 0.05  # of the cases, when a server is given: an epoch costs ~30 other cases
OUTCOMES = ("yielded", "named", "hangs", "other", "silent")


class Hang(BaseException):
    """A case ran past its time. A ``BaseException``, so that no ``except Exception`` in the
    readers (a decoder's, a retry's) can take it for a bad input."""


@dataclass
class Tally:
    """What the cases did, by outcome and by reader; the first few unsound ones, described."""

    counts: Counter = field(default_factory=Counter)
    by_reader: dict = field(default_factory=dict)
    unsound: list = field(default_factory=list)
    slowest: tuple = (0.0, "")

    def add(self, reader: str, mutation: str, outcome: str, seconds: float, why: str) -> None:
        self.counts["cases"] += 1
        self.counts[outcome] += 1
        self.by_reader.setdefault(reader, Counter())[outcome] += 1
        said = f"{reader} / {mutation}: {outcome}: {why}"
        if outcome in ("hangs", "other", "silent") and len(self.unsound) < 20:
            self.unsound += [said] if said not in self.unsound else []  # 20 distinct at most
        if seconds > self.slowest[0]:
            self.slowest = (round(seconds, 3), f"{reader} / {mutation}")

    def summary(self) -> dict:
        return {
            **{k: self.counts[k] for k in ("cases", *OUTCOMES)},
            "by_reader": {r: dict(c) for r, c in sorted(self.by_reader.items())},
            "slowest_case_s": self.slowest[0],
            "slowest_case": self.slowest[1],
            "unsound": self.unsound,
        }


def run_case(call: Callable[[], int], limit_s: float = LIMIT_S) -> tuple[str, str]:
    """``(outcome, why)`` of ``call()``, which returns how many things it read."""

    def alarm(signum, frame):
        raise Hang(f"still running after {limit_s} s")

    before = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, limit_s)
    try:
        got = call()
        signal.setitimer(signal.ITIMER_REAL, 0)
    except Hang as err:
        return "hangs", str(err)
    except DaskDLError as err:
        return "named", f"{type(err).__name__}: {err}"[:300]
    except Exception as err:  # noqa: BLE001 - what the fuzz is looking for
        return "other", f"{type(err).__name__}: {err}"[:300]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)
    return ("yielded", "") if got else ("silent", "read nothing and raised nothing")


# Inputs: good ones, made here (small and seeded), then mutated.


def images() -> dict[str, bytes]:
    """Small good images of every kind a dataset may hold, by a key naming the kind."""
    from PIL import Image

    rng = random.Random(0)
    rgb = Image.frombytes("RGB", (40, 30), bytes(rng.randrange(256) for _ in range(3600)))
    out = {}
    for key, img, fmt in (
        ("Images/n1-a/rgb_1.jpg", rgb, "JPEG"),
        ("Images/n1-a/cmyk_1.jpg", rgb.convert("CMYK"), "JPEG"),
        ("Images/n1-a/grey_1.jpg", rgb.convert("L"), "JPEG"),
        ("Images/n1-a/png_1.jpg", rgb.convert("RGBA"), "PNG"),  # a PNG named .jpg
        ("Images/n1-a/palette_1.png", rgb.convert("P"), "PNG"),
    ):
        buf = io.BytesIO()
        img.save(buf, fmt)
        out[key] = buf.getvalue()
    return out


def shard(blobs: dict[str, bytes]) -> bytes:
    """A shard of ``blobs`` as :func:`helpers.shards.format.pack_shard` writes it, one with a
    name long enough for a PAX record."""
    from helpers.shards.format import pack_shard

    samples = [(key, 0, blob) for key, blob in blobs.items()]
    samples.append(("Images/n1-a/" + "long" * 30 + "_1.jpg", 0, next(iter(blobs.values()))))
    return pack_shard(samples)


def index(classes: list[str], sha256: str, names: dict[str, list[int]]) -> dict:
    """An index as :func:`helpers.shards.write.write_shards` writes it: ``names`` maps a split
    to its shards' image counts."""
    from helpers.shards.format import FORMAT

    splits = {
        split: {
            "split": split,
            "images": sum(counts),
            "shards": [
                {"name": f"{split}-{i:06d}.tar", "bytes": 10240, "images": n}
                for i, n in enumerate(counts)
            ],
        }
        for split, counts in names.items()
    }
    return {
        "format": FORMAT,
        "manifest_sha256": sha256,
        "val_fraction": 0.2,
        "seed": 0,
        "split_source": "seeded",
        "shard_size": 3,
        "classes": classes,
        "splits": splits,
    }


# Mutations: each takes the good bytes (or document) and a seeded rng.


def _headers(blob: bytes) -> list[int]:
    """The offsets of the headers of a good tar."""
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        return [m.offset for m in tar] + [m.offset_data + -(-m.size // 512) * 512 for m in tar][-1:]


def _sealed(header: bytes | bytearray) -> bytes:
    """``header`` with a checksum that matches it."""
    header = bytearray(header)
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def _member(name: bytes, payload: bytes, kind: bytes = b"0") -> bytes:
    header = bytearray(512)
    header[: len(name[:100])] = name[:100]
    header[124:136] = b"%011o\0" % len(payload)
    header[156:157] = kind
    header[257:263] = b"ustar\0"
    return _sealed(header) + payload + bytes(-len(payload) % 512)


SIZES = (
    b"-0000001000\0",
    b"-0000000007\0",
    b"77777777777\0",
    b"00000001_00\0",
    b"+0000000007\0",
    b"0x1f\0\0\0\0\0\0\0\0",
    b"\x80\0\0\0\0\0\0\0\0\0\x10\0",  # GNU base-256
    b"\xff" * 12,
    b"            ",
    b"9" * 11 + b"\0",
)
PAX = (
    b"99 path=a.jpg\n",
    b"13 path=a.jpg\n",
    b"2 \n",
    b"12 path=a.jpg",
    b"18 path=../../x.jpg\n",
    b"16 path=\xff\xfe.jpg\n",
    b"0 path=x\n",
    b"100000000000000000000 path=x\n",
    b"11 size=-5\n",
    b"",
)


def mutate_shard(blob: bytes, rng: random.Random) -> tuple[str, bytes]:
    """A damaged copy of the shard ``blob``, and what was done to it."""
    heads = _headers(blob)
    at = rng.choice(heads[:-1])
    kind = rng.choice(
        ("header bytes", "size field", "type flag", "truncation", "pax", "gnu long name")
        + ("zero blocks", "name", "random bytes", "member dropped")
    )
    if kind == "header bytes":
        header = bytearray(blob[at : at + 512])
        for _ in range(rng.randint(1, 8)):
            header[rng.randrange(512)] = rng.randrange(256)
        header = _sealed(header) if rng.random() < 0.7 else bytes(header)
        return kind, blob[:at] + header + blob[at + 512 :]
    if kind in ("size field", "type flag", "name"):
        header = bytearray(blob[at : at + 512])
        if kind == "size field":
            size = int(header[124:135], 8)
            fresh = b"%011o\0" % max(0, size + rng.randint(-600, 600))
            header[124:136] = rng.choice((*SIZES, fresh))
        elif kind == "type flag":
            header[156] = rng.choice(b"01234567xgLKAV\0\xff")
        else:
            name = rng.choice((b"nodot", b"a..b.jpg", b"../../etc/passwd", b"\xff\xfe", b""))
            header[:100] = name.ljust(100, b"\0")
        return kind, blob[:at] + _sealed(header) + blob[at + 512 :]
    if kind == "truncation":
        cut = rng.choice((rng.randrange(len(blob)), rng.choice(heads), at + rng.randrange(512)))
        return kind, blob[:cut]
    if kind in ("pax", "gnu long name"):
        payload = rng.choice(PAX) if kind == "pax" else rng.randbytes(rng.randint(0, 700))
        inserted = _member(b"././@LongLink", payload, b"x" if kind == "pax" else b"L")
        return kind, blob[:at] + inserted + blob[at:]
    if kind == "zero blocks":
        zeros = bytes(512 * rng.randint(1, 3))
        keep = rng.random() < 0.5
        return kind, blob[:at] + zeros + blob[at if keep else at + len(zeros) :]
    if kind == "member dropped":
        i = heads.index(at)
        return kind, blob[:at] + blob[heads[i + 1] :]
    out = bytearray(blob)
    for _ in range(rng.randint(1, 16)):
        out[rng.randrange(len(out))] = rng.randrange(256)
    return kind, bytes(out)


AWKWARD = (None, True, 0, -1, 2.5, 1e308, "", "../x", "train-000000.tar\n", [], {}, "x" * 300)


def mutate_document(doc, rng: random.Random) -> tuple[str, bytes]:
    """A damaged copy of the JSON document ``doc`` (an index, a manifest), as bytes."""
    kind = rng.choice(("value", "value", "key dropped", "text cut", "text flipped", "not json"))
    if kind in ("value", "key dropped"):
        doc = json.loads(json.dumps(doc))
        parent, key = _somewhere(doc, rng)
        if kind == "key dropped" and isinstance(parent, dict):
            del parent[key]
        else:
            parent[key] = rng.choice(AWKWARD)
        return kind, json.dumps(doc).encode()
    text = json.dumps(doc).encode()
    if kind == "text cut":
        return kind, text[: rng.randrange(len(text))]
    if kind == "text flipped":
        out = bytearray(text)
        for _ in range(rng.randint(1, 4)):
            out[rng.randrange(len(out))] = rng.randrange(256)
        return kind, bytes(out)
    return kind, rng.choice((b"", b"[]", b"null", b"[" * 100_000, b"\xff\xfe{}", b'{"a": NaN}'))


def _somewhere(doc, rng: random.Random):
    """A random ``(container, key)`` in ``doc``, at any depth."""
    parent, key = doc, rng.choice(list(doc))
    while isinstance(parent[key], (dict, list)) and parent[key] and rng.random() < 0.7:
        parent = parent[key]
        key = rng.choice(list(parent)) if isinstance(parent, dict) else rng.randrange(len(parent))
    return parent, key


def mutate_image(blobs: dict[str, bytes], rng: random.Random) -> tuple[str, str, bytes]:
    """``(what was done, key, bytes)``: one of ``blobs`` damaged, or left whole."""
    key = rng.choice(list(blobs))
    blob = blobs[key]
    kind = rng.choice(("whole", "zero bytes", "cut short", "bytes flipped", "huge dimensions"))
    if kind == "zero bytes":
        return kind, key, b""
    if kind == "cut short":
        return kind, key, blob[: rng.randrange(len(blob))]
    if kind == "bytes flipped":
        out = bytearray(blob)
        for _ in range(rng.randint(1, 8)):
            out[rng.randrange(len(out))] = rng.randrange(256)
        return kind, key, bytes(out)
    if kind == "huge dimensions":
        side = rng.choice((9000, 12000, 30000, 65500))
        return kind, key, _resized_header(blob, side, rng.choice((side, 100)))
    return kind, key, blob


def _resized_header(blob: bytes, width: int, height: int) -> bytes:
    """``blob`` (a JPEG or PNG) whose header declares ``width`` x ``height``, its data as it was."""
    if blob.startswith(b"\x89PNG"):
        ihdr = b"IHDR" + struct.pack(">II", width, height) + blob[24:29]
        return blob[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + blob[33:]
    sof = blob.index(b"\xff\xc0")  # baseline JPEG: height then width, after length and precision
    return blob[: sof + 5] + struct.pack(">HH", height, width) + blob[sof + 9 :]


# Readers: each case is (reader, mutation, a call returning how many things it read).


@dataclass
class Good:
    """The good inputs, and a folder where documents are written for the readers to read."""

    folder: Path
    images: dict[str, bytes]
    shard: bytes
    listing: object  # helpers.data.Manifest
    index: dict
    manifest: dict

    @classmethod
    def make(cls, folder: Path) -> Good:
        from helpers import data
        from helpers.shards.format import manifest_hash

        blobs = images()
        keys = [f"Images/n{c}-x/n{c}_{i}.jpg" for c in range(1, 4) for i in range(5)]
        listing = data.make_manifest(str(folder / "data"), keys, {})
        doc = json.loads(listing.to_json())
        idx = index(list(listing.classes), manifest_hash(listing), {"train": [3, 3], "val": [2]})
        (folder / "data").mkdir(parents=True, exist_ok=True)
        (folder / "shards").mkdir(parents=True, exist_ok=True)
        return cls(folder, blobs, shard(blobs), listing, idx, doc)


def shard_case(good: Good, rng: random.Random):
    from helpers.shards.format import read_shard

    mutation, blob = mutate_shard(good.shard, rng)
    return "read_shard", mutation, lambda: sum(1 for _ in read_shard(blob, "train-000000.tar"))


def index_case(good: Good, rng: random.Random):
    from helpers.shards.format import check_index, read_index

    mutation, text = mutate_document(good.index, rng)
    (good.folder / "shards" / "index.json").write_bytes(text)

    def call() -> int:
        check_index(read_index(str(good.folder)), good.listing, 0.2, 0)
        return 1

    return "read_index+check_index", mutation, call


def manifest_case(good: Good, rng: random.Random):
    from helpers.data import load_manifest

    mutation, text = mutate_document(good.manifest, rng)
    (good.folder / "data" / "manifest.json").write_bytes(text)
    return "load_manifest", mutation, lambda: len(load_manifest(str(good.folder / "data")).keys)


def image_case(good: Good, rng: random.Random):
    from helpers.loading.gpudecode import keep_jpeg
    from helpers.loading.transforms import decode_image

    mutation, key, blob = mutate_image(good.images, rng)
    kind = key.rsplit("/", 1)[1].split("_")[0]
    if rng.random() < 0.5:
        draft = rng.choice((None, 32, 224))
        return "decode_image", f"{kind}, {mutation}", lambda: bool(decode_image(blob, key, draft))
    return "keep_jpeg", f"{kind}, {mutation}", lambda: bool(keep_jpeg(blob, key))


class Served:
    """A sharded dataset on an S3 server (its ``url``, storage ``options`` and shard ``index``),
    for whole stream epochs over a mutated copy of its first train shard, stored beside it."""

    def __init__(self, url: str, options: dict, index: dict):
        from helpers.s3 import storage
        from helpers.shards.format import location

        self.url, self.options = url, options
        entry = index["splits"]["train"]["shards"][0]
        fs = storage.filesystem(url, options)
        self.blob = fs.cat_file(f"{storage.split_url(location(url))[1]}/{entry['name']}")
        self.where = storage.join(url, "fuzz")
        self.one = json.loads(json.dumps(index))  # an index of that one shard, renamed
        self.one["splits"]["train"] = {
            "split": "train",
            "images": entry["images"],
            "shards": [{**entry, "name": "train-000000.tar"}],
        }
        self.put(self.blob)
        self.epoch()  # first use pays for the imports and the S3 client, not the first case

    def put(self, blob: bytes) -> None:
        from helpers.s3 import storage

        fs = storage.filesystem(self.where, self.options)
        fs.pipe_file(f"{storage.split_url(self.where)[1]}/train-000000.tar", blob)

    def epoch(self) -> int:
        from helpers.loading.transforms import decode_image, eval_transform
        from helpers.shards.stream import Reading, ShardStream, Share

        how = Reading(decode_image, eval_transform(32), image_size=32)
        ds = ShardStream(
            self.one,
            self.url,
            "train",
            self.options,
            Share(batch_size=4),
            how,
            shards_url=self.where,
        )
        return sum(1 for _ in ds)


def stream_case(served: Served, rng: random.Random):
    mutation, blob = mutate_shard(served.blob, rng)
    served.put(blob)  # before the clock starts: a PUT is not what is tested
    return "ShardStream epoch", mutation, served.epoch


def fuzz(
    seconds: float, seed: int = 0, served: Served | None = None, limit_s: float = LIMIT_S
) -> Tally:
    """Mutated cases for ``seconds``, seeded; a share of them stream epochs if ``served``."""
    import logging
    import warnings

    rng, tally = random.Random(seed), Tally()
    readers = (shard_case, index_case, manifest_case, image_case)
    quiet = logging.getLogger("helpers")
    level, quiet.level = quiet.level, logging.CRITICAL  # damage is named: thousands of warnings
    try:
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's decompression-bomb warnings, before refusal
            good = Good.make(Path(tmp))
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                if served is not None and rng.random() < STREAM_SHARE:
                    reader, mutation, call = stream_case(served, rng)
                else:
                    reader, mutation, call = rng.choice(readers)(good, rng)
                began = time.monotonic()
                outcome, why = run_case(call, limit_s)
                tally.add(reader, mutation, outcome, time.monotonic() - began, why)
    finally:
        quiet.level = level
    return tally


def main(argv: list[str] | None = None) -> None:
    """Fuzz the readers for ``--seconds`` (stream epochs on an embedded S3 server); write the
    record and print its targets."""
    from bench import record
    from helpers import prepare
    from helpers.s3.server import EmbeddedS3

    parser = argparse.ArgumentParser(prog="python -m bench.fuzz_readers", description=__doc__)
    parser.add_argument("--seconds", type=float, default=120.0, help="how long to fuzz")
    parser.add_argument("--seed", type=int, default=0, help="the mutations' seed")
    parser.add_argument("--out", default=str(record.RESULTS), help="where the record goes")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, EmbeddedS3(Path(tmp) / "s3") as server:
        url, options = "s3://fuzz/tiny", server.storage_options
        prepare.write_synthetic(url, options, 3, 5, seed=0)
        idx = prepare.write_shards(url, options, val_fraction=0.2, seed=0, shard_size=3)
        began = time.monotonic()
        tally = fuzz(args.seconds, args.seed, Served(url, options, idx))
        took = time.monotonic() - began
    summary = tally.summary()
    targets = [
        record.target("hangs (cases past their time)", summary["hangs"], "<=", 0),
        record.target("unnamed errors (not a DaskDLError)", summary["other"], "<=", 0),
        record.target("silent cases (nothing read, nothing raised)", summary["silent"], "<=", 0),
    ]
    passes = [{"reader": r, **c} for r, c in summary["by_reader"].items()]
    settings = {
        "seconds": args.seconds,
        "seed": args.seed,
        "limit_s": LIMIT_S,
        "stream_share": STREAM_SHARE,
    }
    rec = record.build(
        "fuzz_readers",
        settings,
        passes,
        targets,
        results={
            **summary,
            "seconds_run": round(took, 1),
            "cases_per_s": round(summary["cases"] / took),
        },
        notes=[
            "Stream epochs run in this process (no DataLoader process): the readers, not the fork."
        ],
    )
    print(record.write(rec, args.out))
    print({k: summary[k] for k in ("cases", *OUTCOMES)})
    for t in rec["targets"]:
        verdict = "met" if t["met"] else "MISSED"
        print(f"{t['name']}: {t['value']} {t['op']} {t['target']} -> {verdict}")
    for line in summary["unsound"]:
        print("  ", line)


if __name__ == "__main__":
    main()
