"""End-to-end check of the GPU path: cluster="auto" -> dask-cuda, DDP over NCCL, live metrics.

Trains ResNet50 for a few steps through the same functions notebook 04 uses, on a synthetic
dataset in a local folder (no S3 needed), and prints what each rank reports. Runs on CPU too
(LocalCluster + gloo), so it is tested where there is no GPU.

    python bench/gpu_smoke.py [--steps 20 --image-size 128]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from helpers import cluster, ddp, monitor, prepare, train  # noqa: E402
from helpers.config import TrainConfig  # noqa: E402


def run(
    steps: int = 20,
    image_size: int = 128,
    batch_size: int = 64,
    per_breed: int = 60,
    workers: int | None = None,
) -> dict:
    """Train 1 epoch of at most ``steps`` steps per rank; returns rank 0's record and events."""
    with tempfile.TemporaryDirectory(prefix="gpu-smoke-") as tmp:
        url = str(Path(tmp) / "dogs")
        prepare.write_synthetic(url, None, 10, per_breed)
        with cluster.make_client("auto", workers) as client:
            watch = monitor.Monitor(client, "smoke")
            cfg = TrainConfig(
                data_url=url,
                image_size=image_size,
                batch_size=batch_size,
                epochs=1,
                max_steps=steps,
                log_every=5,
                loader_workers=4,
                topic="smoke",
                checkpoint_url=str(Path(tmp) / "ckpt"),
            )
            start = time.perf_counter()
            history = ddp.run(client, train.train_rank, cfg, None, timeout_s=120)
            elapsed = time.perf_counter() - start
            time.sleep(0.5)
            events = len(watch.records)
            gpus = monitor.gpu_stats()
            watch.close()
    record = history[0][-1]
    return {
        "ranks": len(history),
        "device": record["device"],
        "elapsed_s": round(elapsed, 1),
        "train_img_per_s": round(record["train_img_per_s"], 1),
        "data_wait": round(record["data_wait"], 3),
        "val_top1": record["val_top1"],
        "param_sums_equal": len({round(h[-1]["param_sum"], 3) for h in history}) == 1,
        "events": events,
        "gpus": gpus,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--per-breed", type=int, default=60)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("helpers").setLevel(logging.INFO)
    result = run(args.steps, args.image_size, args.batch_size, args.per_breed)
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
