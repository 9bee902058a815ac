"""Where a loader's time goes: per-image cost of each stage, and CPU seconds per pass.

Two views for the loading benchmark's record, so a missed target says what limits it:

- :func:`stage_costs`: in this one process, milliseconds per image to fetch (a whole shard, a
  batch of objects concurrently, or a local file), unpack, decode (draft on and off) and
  transform, for the shard path, the per-object path and local files;
- :class:`CpuMeter`: CPU seconds a pass cost the loader (this process and its reaped loader
  processes) and the S3 server process, next to the wall time: on 2 cores, a pass whose CPU
  adds up to 2 x its wall time is CPU-bound, and the server's share is what S3 costs.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

from helpers.loading import transforms
from helpers.loading.objects import S3ImageDataset
from helpers.s3 import storage
from helpers.shards import format as shard_format
from helpers.shards import read as shardread


def _ms(seconds: float, n: int) -> float:
    return round(seconds / max(1, n) * 1000, 3)


def _decode_transform(items: list[tuple[str, bytes]], tf, size: int) -> dict[str, float]:
    """ms per image: decode with draft, without draft, with TorchCodec (full size, its CPU
    decoder: the candidate of :mod:`bench.decoders`), and transform (of the draft decode)."""
    import torch

    from helpers.loading.gpudecode import batch_decoder

    out: dict[str, float] = {}
    codec = batch_decoder("torchcodec")  # the GPU path's binding, with its CPU decoder
    tensors = [torch.frombuffer(bytearray(blob), dtype=torch.uint8) for _, blob in items]
    start = time.perf_counter()
    for t in tensors:
        codec([t], "cpu")
    out["decode_torchcodec"] = _ms(time.perf_counter() - start, len(items))
    for label, draft in (("decode_draft", size), ("decode_full", None)):
        start = time.perf_counter()
        imgs = [transforms.decode_image(blob, key, draft) for key, blob in items]
        out[label] = _ms(time.perf_counter() - start, len(items))
    start = time.perf_counter()
    for img in imgs:
        tf(img)
    out["transform"] = _ms(time.perf_counter() - start, len(imgs))
    return out


def stage_costs(
    url: str,
    options: dict,
    keys,
    shard_names: list[str],
    local: Path,
    tf,
    size: int,
    batch_size: int,
    images: int = 96,
) -> dict[str, dict[str, float]]:
    """ms per image of each stage of each path, on about ``images`` images, one process."""
    keys = list(keys)[:images]
    shards_url = shard_format.location(url)
    out = {}
    # shard path: whole-shard GETs as the stream makes them (presigned), then tar parsing
    start, blobs = time.perf_counter(), []
    signed = shardread.presign(shards_url, options, list(shard_names))
    with shardread.Prefetcher(shards_url, options, list(shard_names), 0, signed) as fetched:
        for _, blob in fetched:
            blobs.append(blob)
            if sum(b.count(b".cls") for b in blobs) >= images:
                break
    fetched_s = time.perf_counter() - start
    start = time.perf_counter()
    items = [(k, m["jpg"]) for b in blobs for k, m in shard_format.read_shard(b)]
    unpacked = time.perf_counter() - start
    out["shards"] = {"fetch": _ms(fetched_s, len(items)), "unpack": _ms(unpacked, len(items))}
    out["shards"] |= _decode_transform(items, tf, size)
    # per-object path: a batch's GETs concurrently, as the dataset makes them
    ds = S3ImageDataset(url, keys, None, options)
    root = storage.split_url(url)[1]
    start, items = time.perf_counter(), []
    for i in range(0, len(keys), batch_size):
        got = ds._fetch([f"{root}/{k}" for k in keys[i : i + batch_size]])
        items += [(k, got[f"{root}/{k}"]) for k in keys[i : i + batch_size]]
    out["objects"] = {"fetch": _ms(time.perf_counter() - start, len(items))}
    out["objects"] |= _decode_transform(items, tf, size)
    # local files
    start = time.perf_counter()
    items = [(k, (local.parent / k).read_bytes()) for k in keys]
    out["local"] = {"fetch": _ms(time.perf_counter() - start, len(items))}
    out["local"] |= _decode_transform(items, tf, size)
    return out


def describe(costs: dict[str, dict[str, float]]) -> str:
    """``shards: fetch 0.40 + unpack 0.02 + decode 2.1 (full 2.1, TorchCodec 1.4) + transform
    1.9 ms/img; ...`` (a record from before TorchCodec was measured shows no TorchCodec)."""
    parts = []
    for path, c in costs.items():
        extra = f" + unpack {c['unpack']:.2f}" if "unpack" in c else ""
        codec = f", TorchCodec {c['decode_torchcodec']:.2f}" if "decode_torchcodec" in c else ""
        parts.append(
            f"{path}: fetch {c['fetch']:.2f}{extra} + decode {c['decode_draft']:.2f} "
            f"(full {c['decode_full']:.2f}{codec}) + transform {c['transform']:.2f} ms/img"
        )
    return "; ".join(parts)


def _proc_cpu(pid: int) -> float:
    """CPU seconds of process ``pid`` and its reaped children (0.0 if it cannot be read)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime + cutime + cstime) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds of this process plus its reaped children, and of the server ``pid``, over a
    block: ``with CpuMeter(pid) as m: ...; m.result``."""

    def __init__(self, server_pid: int | None):
        self.pid = server_pid
        self.result: dict[str, float] = {}

    def _now(self) -> tuple[float, float]:
        t = os.times()
        mine = t.user + t.system + t.children_user + t.children_system
        return mine, _proc_cpu(self.pid) if self.pid else 0.0

    def __enter__(self) -> CpuMeter:
        self._start = self._now()
        return self

    def __exit__(self, *exc) -> None:
        end = self._now()
        self.result = {
            "cpu_loader_s": round(end[0] - self._start[0], 2),
            "cpu_server_s": round(end[1] - self._start[1], 2),
        }


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
