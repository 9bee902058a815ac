"""One-line records for people: a step's progress, an epoch's result, an automatic restart.

The training loop logs them on rank 0 and the notebook's monitor shows the latest above its live
plot, so both read the same line: ``epoch 1 [40/200] loss 1.23 acc 61.2% img/s 812 eta 0:01:10``.
"""

from __future__ import annotations

from datetime import timedelta


def progress_line(r: dict, elapsed: float | None = None) -> str:
    """``epoch 1 [40/200] loss 1.23 acc 61.2% img/s 812 data 3% eta 0:01:10`` (no eta without
    ``elapsed``)."""
    line = (
        f"epoch {r['epoch']} [{r['step']}/{r['steps']}] loss {r['loss']:.3f} "
        f"acc {100 * r['acc']:.1f}% img/s {r['img_per_s']:.0f} data {100 * r['data_wait']:.0f}%"
    )
    if elapsed is None:
        return line
    eta = elapsed / r["step"] * (r["steps"] - r["step"])
    return f"{line} eta {timedelta(seconds=round(eta))}"


def epoch_line(r: dict) -> str:
    return (
        f"epoch {r['epoch']} done: train loss {r['train_loss']:.3f} "
        f"val loss {r['val_loss']:.3f} top-1 {100 * r['val_top1']:.1f}% "
        f"top-5 {100 * r['val_top5']:.1f}% img/s {r['train_img_per_s']:.0f} "
        f"in {r['epoch_s']:.0f} s"
    )


def restart_line(r: dict, width: int = 140) -> str:
    """``restart 1 (worker lost) at epoch 0.50: WorkerLost: DDP rank 1: its worker tcp://...``
    (``at`` where :meth:`Monitor.restarts` puts it; cut to ``width`` characters)."""
    where = f" at epoch {r['at']:.2f}" if "at" in r else ""
    line = f"restart {r['attempt']} ({r['cause']}){where}: {r['error']}"
    return line if len(line) <= width else line[: width - 3] + "..."
