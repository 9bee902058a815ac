"""Bookkeeping of a training loop: running metrics, throughput windows, the records it sends.

Kept apart from the loop (``helpers.train``) so the loop reads as the PyTorch it is. The running
sums stay on the device and ``.item()`` syncs once per ``log_every`` window, never per step.
Records go to the job's Dask event topic (:func:`publish`), where the notebook's monitor
(``helpers.monitor``) collects them.
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import TYPE_CHECKING

from helpers.show.lines import progress_line

if TYPE_CHECKING:  # names for annotations only: importing costs nothing at run time
    import torch

    from helpers.config import Rank, TrainConfig

log = logging.getLogger(__name__)


class KeyLog:
    """What a rank trained on, step by step: ``<folder>/rank-<r>.log``, one line a step,
    ``attempt epoch step key key...`` (a shard stream's repeats marked ``+``). Appended across
    attempts and resumed runs, so the last line of each (epoch, step) is what the finished run
    trained on there: a straight run's log must read the same. Nothing without a folder."""

    def __init__(self, folder: str, rank: Rank):
        import os

        self.rank, self.path = rank, os.path.join(folder, f"rank-{rank.rank}.log") if folder else ""
        if folder:
            os.makedirs(folder, exist_ok=True)

    def write(self, epoch: int, step: int, keys: list[str]) -> None:
        if self.path:  # opened a line at a time: a killed worker keeps what it logged
            with open(self.path, "a") as f:
                f.write(f"{self.rank.attempt} {epoch} {step} {' '.join(keys)}\n")


def publish(topic: str, record: dict) -> None:
    """Send ``record`` to every client subscribed to ``topic`` (Dask's ``log_event``, about
    2 ms, no extra service); nothing outside a Dask worker."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return
    worker.log_event(topic, record)


class StepMeter:
    """Running loss and accuracy on the device, throughput and data wait per ``log_every`` window.

    The sums stay on the device: ``.item()`` syncs once per window, never per step.
    """

    def __init__(self, device, epoch: int, steps: int, cfg: TrainConfig, rank: Rank):
        import torch

        self.epoch, self.steps, self.cfg, self.rank = epoch, steps, cfg, rank
        self.loss = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device)
        self.seen = self.window_seen = 0
        self.wait = self.window_wait = 0.0
        self.next_batch_s = self.wait_s = 0.0  # the epoch's data wait, and its first stage
        self.start = self.window_start = self.tick = time.perf_counter()
        self.step_s: list[float] = []  # each step's time, data wait included

    def fetched(self) -> None:
        """Call when the loader has handed over a batch: the time since the last step went to
        waiting for it (the rest of the data wait is moving it to the device)."""
        self.next_batch_s += time.perf_counter() - self.tick

    def waited(self) -> None:
        """Call when a batch is on the device: the time since the last step was data wait."""
        waited = time.perf_counter() - self.tick
        self.window_wait += waited
        self.wait_s += waited

    def add(
        self, step: int, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, lr: float
    ) -> None:
        """Count one optimizer step; publish a record at the end of each window."""
        self.loss += loss.detach() * len(labels)
        self.correct += (logits.argmax(1) == labels).sum()
        self.window_seen += len(labels)
        self.step_s.append(time.perf_counter() - self.tick)
        if (step + 1) % self.cfg.log_every == 0 or step + 1 == self.steps:
            self._publish(step, lr)
        self.tick = time.perf_counter()

    def skipped(self) -> None:
        """Call after a step that trained on nothing (a placeholder): it counts nowhere."""
        self.tick = time.perf_counter()

    def _publish(self, step: int, lr: float) -> None:
        self.seen, self.wait = self.seen + self.window_seen, self.wait + self.window_wait
        now = time.perf_counter()
        record = {
            "kind": "step",
            "rank": self.rank.rank,
            "epoch": self.epoch,
            "step": step + 1,
            "steps": self.steps,
            "loss": self.loss.item() / max(self.seen, 1),
            "acc": self.correct.item() / max(self.seen, 1),
            "lr": lr,
            "img_per_s": self.window_seen * self.rank.world_size / (now - self.window_start),
            "data_wait": self.window_wait / (now - self.window_start),
            "time": time.time(),
        }
        publish(self.cfg.topic, record)
        if self.rank.rank == 0:
            log.info(progress_line(record, elapsed=now - self.start))
        self.window_seen, self.window_wait, self.window_start = 0, 0.0, now

    def summary(self, device: torch.device) -> dict:
        """The epoch's record so far: who, where, and the training numbers."""
        elapsed = time.perf_counter() - self.start
        return {
            "kind": "epoch",
            "epoch": self.epoch,
            "rank": self.rank.rank,
            "world_size": self.rank.world_size,
            "device": str(device),
            "time": time.time(),
            "train_loss": self.loss.item() / max(self.seen, 1),
            "train_acc": self.correct.item() / max(self.seen, 1),
            "train_images": self.seen,
            "train_img_per_s": self.seen * self.rank.world_size / elapsed,
            "data_wait": self.wait / elapsed,
            "wait_next_batch_s": self.next_batch_s,  # waiting for the loader's next batch
            "wait_to_device_s": self.wait_s - self.next_batch_s,  # copy (GPU: decode, augment)
            "epoch_s": elapsed,
            "median_step_s": statistics.median(self.step_s) if self.step_s else None,
        }
