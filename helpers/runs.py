"""A job's records as a TensorBoard run, written on the client by the notebook's monitor.

The ranks publish their records (``helpers.loop.meter``); :class:`helpers.monitor.Monitor`
receives them and, given a run folder, hands each to a :class:`TensorBoardRun`, so nothing in
the training loop changes. Written there, with TensorBoard's own event format:

- ``train/*``: rank 0's step records (loss, accuracy, learning rate, img/s, data wait), against
  the global step (epoch - 1) x steps per epoch + step;
- ``epoch/*``: the epoch records (training and validation loss and accuracy, img/s, data wait,
  seconds), against the epoch;
- ``restarts/*``: each automatic restart, as text (its cause and error) and as a count;
- ``gpu/<worker>/<gpu>/*``: utilisation and memory, as the monitor sampled them;
- the job's configuration, as text and as hparams (with its final validation accuracy).

One folder per job (:func:`run_dir`): beside a local checkpoint folder, under ``runs/``; under
the repository's ``build/runs/`` when the checkpoint is in S3. ``make tensorboard`` serves
``build/`` on 127.0.0.1: runs of the demo, the sweep and notebook 04 side by side.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

BUILD_RUNS = Path(__file__).resolve().parent.parent / "build" / "runs"
STEP_KEYS = {"loss": "loss", "acc": "accuracy", "lr": "learning_rate", "img_per_s": "img_per_s",
             "data_wait": "data_wait"}  # fmt: skip
EPOCH_KEYS = ("train_loss", "train_acc", "val_loss", "val_top1", "val_top5", "train_img_per_s",
              "data_wait", "epoch_s")  # fmt: skip


def run_dir(checkpoint_url: str, name: str = "", now: datetime.datetime | None = None) -> Path:
    """A new run folder for a job checkpointing to ``checkpoint_url``: ``<its parent>/runs/
    <its name>-<UTC time>`` for a local folder, ``build/runs/<name>-<UTC time>`` for S3 (or
    none)."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    stamp = now.strftime("%Y%m%d-%H%M%S")
    if checkpoint_url and "://" not in checkpoint_url:
        folder = Path(checkpoint_url)
        return folder.parent / "runs" / f"{name or folder.name}-{stamp}"
    tail = checkpoint_url.rstrip("/").rsplit("/", 1)[-1] if checkpoint_url else "job"
    return BUILD_RUNS / f"{name or tail}-{stamp}"


class TensorBoardRun:
    """Event files of one job in ``folder``; ``config`` (a dataclass or dict) as its hparams."""

    def __init__(self, folder: str | Path, config: Any = None):
        from torch.utils.tensorboard import SummaryWriter

        self.folder = Path(folder)
        self.writer = SummaryWriter(str(self.folder), flush_secs=10)
        self.config = _flat(config)
        self.final: dict[str, float] = {}
        self.gpu_samples = 0
        self._lock = threading.Lock()
        if self.config:
            table = "\n".join(f"| {k} | {v} |" for k, v in self.config.items())
            self.writer.add_text("config", f"| setting | value |\n| --- | --- |\n{table}")
        log.info("TensorBoard run: %s", self.folder)

    def record(self, r: dict) -> None:
        """Write one published record (those not understood are skipped)."""
        with self._lock:
            kind = r.get("kind")
            if kind == "step" and r.get("rank") == 0:
                step = (r["epoch"] - 1) * r["steps"] + r["step"]
                for key, tag in STEP_KEYS.items():
                    if r.get(key) is not None:
                        self.writer.add_scalar(f"train/{tag}", r[key], step, r.get("time"))
            elif kind == "epoch" and r.get("rank", 0) == 0:
                for key in EPOCH_KEYS:
                    if r.get(key) is not None:
                        self.writer.add_scalar(f"epoch/{key}", r[key], r["epoch"], r.get("time"))
                self.final = {f"final/{k}": r[k] for k in ("val_top1", "val_loss") if k in r}
                self.writer.flush()
            elif kind == "restart":
                from helpers.show.lines import restart_line

                self.writer.add_text("restarts/cause", restart_line(r, width=1000), r["attempt"])
                self.writer.add_scalar("restarts/count", r["attempt"], r["attempt"], r.get("time"))
                self.writer.flush()

    def gpu(self, sample: dict) -> None:
        """One GPU sample (``helpers.monitor.gpu_stats`` with its ``worker``)."""
        with self._lock:
            where = f"gpu/{sample['worker']}/{sample['gpu']}"
            self.writer.add_scalar(f"{where}/util", sample["util"], self.gpu_samples,
                                   sample.get("time"))  # fmt: skip
            self.writer.add_scalar(f"{where}/mem_gb", sample["mem_gb"], self.gpu_samples,
                                   sample.get("time"))  # fmt: skip
            self.gpu_samples += 1

    def close(self) -> None:
        """The hparams (with the final validation numbers), then every file flushed and closed."""
        with self._lock:
            if self.config:
                from torch.utils.tensorboard.summary import hparams

                for summary in hparams(self.config, self.final or {"final/val_top1": 0.0}):
                    self.writer.file_writer.add_summary(summary)
                for tag, value in self.final.items():
                    self.writer.add_scalar(tag, value)
            self.writer.close()


def _flat(config: Any) -> dict[str, Any]:
    """``config`` as hparams accept it: numbers, strings and booleans (the rest as text)."""
    if config is None:
        return {}
    items = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in items.items()}
