"""Calibrate notebook 04's demo: does ResNet-50 learn the synthetic dogs where colour cannot?

For one setting (image size, images per breed, epochs, per-rank batch, learning rate per 256
images, seed, shuffled pixels on or off) this does what notebook 04 does, and measures it:

1. generate the synthetic dogs (``helpers.prepare.write_synthetic``, 10 breeds) on an embedded
   S3 server and split them 80/20 (``helpers.data.split``);
2. score the colour baselines train -> val (``helpers.baseline``), on images decoded as
   validation sees them (``helpers.data.dataset`` at the training size), and chance;
3. train ResNet-50 from scratch through the real DDP path: ``helpers.ddp.run`` with
   ``helpers.train.train_rank`` on a 2-worker LocalCluster, one loader process and one thread
   per rank, a checkpoint each epoch, as the notebook runs it;
4. append one record (settings, seconds, val top-1 per epoch, baselines, chance, targets met)
   to ``bench/results/calibration.json``.

Targets (on 10 breeds): colour baseline <= 1.5x chance; ResNet-50's last-epoch top-1 >= 3x
chance (or, with ``--shuffle-pixels``, the control, <= 1.5x chance); training within
``TRAIN_BUDGET_S``. The machine may be shared: each record keeps the load average around it.

    python -m bench.calibrate_demo --image-size 64 --per-breed 200 --epochs 8 \\
        --batch-size 16 --lr 0.2 --seed 0 [--shuffle-pixels] [--warmup-epochs 1]
    python -m bench.calibrate_demo --report        # the table of every recorded run
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import record

REPO = Path(__file__).resolve().parent.parent

log = logging.getLogger("calibrate_demo")

RESULTS = REPO / "bench" / "results" / "calibration.json"
N_BREEDS = 10
WORLD_SIZE = 2
TRAIN_BUDGET_S = 420.0  # notebook 04's share of the demo's 12 minutes
COLOUR_MAX, CNN_MIN, CONTROL_MAX = 1.5, 3.0, 1.5  # multiples of uniform chance


def environment() -> dict[str, Any]:
    """Commit (and whether helpers/ or bench/ had uncommitted changes), date, machine, versions:
    ``bench.record``'s facts, in the shape of the runs already in calibration.json."""
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "helpers", "bench/calibrate_demo.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    versions = record.versions()
    return {
        "commit": (record.commit()["sha"] or "")[:7],
        "dirty": bool(dirty),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": record.machine(),
        "python": versions["python"],
        "torch": versions["torch"],
    }


def decoded(manifest, keys, options, image_size: int):
    """``keys`` fetched and decoded as validation sees them: uint8 ``(N, 3, S, S)`` and labels."""
    import torch

    from helpers import data

    ds = data.dataset(manifest, keys, options, image_size, train=False, on_error="raise")
    images, labels = [], []
    for start in range(0, len(ds), 128):
        for _, x, y in ds.samples(list(range(start, min(start + 128, len(ds))))):
            images.append(x)
            labels.append(y)
    return torch.stack(images), torch.tensor(labels)


def calibrate(settings: dict[str, Any]) -> dict[str, Any]:
    """One run: data, colour baselines, DDP training; the record (without the environment)."""
    from helpers import baseline, cluster, data, ddp, prepare, train
    from helpers.config import TrainConfig
    from helpers.loading import synthetic
    from helpers.s3 import server as s3server

    synthetic.SHAPE_AREA = tuple(settings["shape_area"])

    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="calibrate_") as tmp, s3server.EmbeddedS3(tmp) as s3:
        options = s3.storage_options
        url = "s3://dogs/synthetic"
        t = time.perf_counter()
        manifest = prepare.write_synthetic(
            url, options, N_BREEDS, settings["images_per_breed"], seed=settings["data_seed"]
        )
        timings["generate_s"] = time.perf_counter() - t

        t = time.perf_counter()
        split = data.split(manifest, 0.2, settings["seed"])
        train_x, train_y = decoded(manifest, split.train, options, settings["image_size"])
        val_x, val_y = decoded(manifest, split.val, options, settings["image_size"])
        colour = baseline.colour_baseline(train_x, train_y, val_x, val_y)
        chance = baseline.chance(val_y.tolist(), N_BREEDS)
        timings["baseline_s"] = time.perf_counter() - t
        log.info("colour baselines %s, chance %s", _pct(colour), _pct(chance))

        if settings["data_format"] == "shards":
            prepare.write_shards(url, options, seed=settings["seed"])
        cfg = TrainConfig(
            data_url=url,
            arch="resnet50",
            image_size=settings["image_size"],
            epochs=settings["epochs"],
            batch_size=settings["batch_size"],
            lr=settings["lr"],
            warmup_epochs=settings["warmup_epochs"],
            crop_scale=settings["crop_scale"],
            seed=settings["seed"],
            loader_workers=1,
            threads=1,
            checkpoint_url=str(Path(tmp) / "checkpoint"),
            shuffle_pixels=settings["shuffle_pixels"],
            data_format=settings["data_format"],
        )
        t = time.perf_counter()
        with cluster.make_client("local", WORLD_SIZE) as client:
            timings["cluster_s"] = time.perf_counter() - t
            load_before = os.getloadavg()
            t = time.perf_counter()
            history = ddp.run(client, train.train_rank, cfg, options)[0]
            timings["train_s"] = time.perf_counter() - t
            load_after = os.getloadavg()

    top1 = [e["val_top1"] for e in history]
    final = top1[-1] / chance["uniform"]
    targets = {
        f"colour best <= {COLOUR_MAX}x chance": colour["best"] <= COLOUR_MAX * chance["uniform"],
        f"train_s <= {TRAIN_BUDGET_S:.0f}": timings["train_s"] <= TRAIN_BUDGET_S,
    }
    if settings["shuffle_pixels"]:
        targets[f"control top-1 <= {CONTROL_MAX}x chance"] = final <= CONTROL_MAX
    else:
        targets[f"top-1 >= {CNN_MIN}x chance"] = final >= CNN_MIN
    return {
        "settings": settings | {"peak_lr": settings["lr"] * settings["batch_size"] * 2 / 256},
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "load_avg_1min": {"before_train": load_before[0], "after_train": load_after[0]},
        "val_top1": top1,
        "val_top5": [e["val_top5"] for e in history],
        "train_loss": [e["train_loss"] for e in history],
        "train_acc": [e["train_acc"] for e in history],
        "epoch_s": [round(e["epoch_s"], 1) for e in history],
        "colour_baseline": colour,
        "chance": chance,
        "top1_over_chance": final,
        "targets": targets,
    }


def _pct(d: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1%}" for k, v in d.items())


def append(run: dict[str, Any], path: Path = RESULTS) -> None:
    """Add ``run`` to the file's ``runs`` (the header says who wrote last, on what)."""
    doc = json.loads(path.read_text()) if path.exists() else {"runs": []}
    doc = {**run["environment"], "runs": doc["runs"] + [run]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)


def _num(value: float | None, spec: str) -> str:
    """``value`` formatted by ``spec``, or ``-`` where a stopped run has none."""
    return "-" if value is None else format(value, spec)


def _top1(run: dict[str, Any]) -> list[float]:
    """Validation top-1 per epoch: measured, else as read from a stopped run's checkpoints."""
    if "val_top1" in run:
        return run["val_top1"]
    return [e["val_top1"] for e in run.get("epochs_read_from_checkpoints", [])]


def _verdict(run: dict[str, Any]) -> str:
    """``all`` targets met, ``MISS``, or ``stopped`` for a run that did not finish."""
    if "status" in run:
        return "stopped"
    return "all" if all(run["targets"].values()) else "MISS"


def report(path: Path = RESULTS) -> str:
    """One line per recorded run: settings, seconds, top-1 per epoch, colour best, targets."""
    lines = [
        f"{'#':>2} {'commit':<8} {'size':>4} {'per':>4} {'ep':>3} {'bs':>3} {'lr':>5} {'wu':>4} "
        f"{'seed':>4} {'shuf':>4} {'train_s':>7} {'colour':>6} {'top-1 per epoch (%)':<40} ok"
    ]
    for i, r in enumerate(json.loads(path.read_text())["runs"], 1):
        s = r["settings"]
        epochs = " ".join(f"{100 * v:.0f}" for v in _top1(r))
        lines.append(
            f"{i:>2} {r['environment']['commit'][:8]:<8} {s['image_size']:>4} "
            f"{s['images_per_breed']:>4} {s['epochs']:>3} {s['batch_size']:>3} {s['lr']:>5} "
            f"{s['warmup_epochs']:>4} {s['seed']:>4} {'yes' if s['shuffle_pixels'] else 'no':>4} "
            f"{_num(r.get('seconds', {}).get('train_s'), '.0f'):>7} "
            f"{_num((r.get('colour_baseline') or {}).get('best'), '.1%'):>6} {epochs:<40} "
            f"{_verdict(r)}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from helpers.config import CROP_SCALE

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--per-breed", type=int, default=200, help="images per breed")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16, help="per rank (2 ranks)")
    parser.add_argument("--lr", type=float, default=0.2, help="per 256 images of global batch")
    parser.add_argument("--warmup-epochs", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="split and initial weights")
    parser.add_argument("--data-seed", type=int, default=0, help="the generated images")
    parser.add_argument("--shuffle-pixels", action="store_true", help="the colour-only control")
    parser.add_argument(
        "--shape-area",
        type=float,
        nargs=2,
        default=[0.2, 0.35],
        help="helpers.synthetic.SHAPE_AREA for the generated images",
    )
    parser.add_argument(
        "--crop-scale",
        type=float,
        default=CROP_SCALE,
        help="the training crops' smallest share of the area",
    )
    parser.add_argument("--data-format", default="objects", choices=["objects", "shards"])
    parser.add_argument("--note", default="", help="a word on why this run was made")
    parser.add_argument("--report", action="store_true", help="print the recorded runs, exit")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the JSON file of runs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run one calibration and append its record; or print the table of records."""
    args = parse_args(argv)
    if args.report:
        print(report(args.results))
        return
    import distributed  # noqa: F401 - sets up its loggers (INFO) on import; quiet them after

    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("distributed").setLevel(logging.ERROR)
    log.setLevel(logging.INFO)
    settings = {
        "image_size": args.image_size,
        "images_per_breed": args.per_breed,
        "n_breeds": N_BREEDS,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "global_batch": args.batch_size * WORLD_SIZE,
        "lr": args.lr,
        "warmup_epochs": args.warmup_epochs,
        "seed": args.seed,
        "data_seed": args.data_seed,
        "shuffle_pixels": args.shuffle_pixels,
        "shape_area": args.shape_area,
        "crop_scale": args.crop_scale,
        "data_format": args.data_format,
        "arch": "resnet50",
        "loader_workers": 1,
        "threads": 1,
        "note": args.note,
    }
    env = environment()
    started = time.perf_counter()
    run = calibrate(settings)
    run["seconds"]["total_s"] = round(time.perf_counter() - started, 1)
    run = {"environment": env, **run}
    append(run, args.results)
    log.info(
        "top-1 per epoch %s; colour best %.1f%%; %.0f s training; targets %s",
        " ".join(f"{100 * v:.1f}" for v in run["val_top1"]),
        100 * run["colour_baseline"]["best"],
        run["seconds"]["train_s"],
        run["targets"],
    )
    print(report(args.results))


if __name__ == "__main__":
    main()
