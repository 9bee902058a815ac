"""Training metrics from the workers to the notebook, outside the training loop.

Workers publish small dict records through Dask's event API (``log_event``, about 2 ms, no extra
service; :func:`helpers.loop.meter.publish`). The notebook's :class:`Monitor` subscribes to the
topic, keeps every record, turns them into a DataFrame, and redraws live plots while a job runs:
a subscribe handler's ``print`` never reaches a notebook cell, so the handler only collects and
the cell redraws.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from helpers.runs import TensorBoardRun
from helpers.show.lines import epoch_line, progress_line, restart_line

if TYPE_CHECKING:  # names for annotations only: importing costs nothing at run time
    from concurrent.futures import Future

    import pandas as pd

log = logging.getLogger(__name__)


def gpu_stats() -> list[dict]:
    """Utilisation and memory of the GPUs this worker sees (run with ``client.run``)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver: no GPUs to report
        return []
    out = []
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            out.append(_one_gpu(pynvml, i))
    except pynvml.NVMLError as err:  # e.g. MIG slices report no utilisation
        log.debug("GPU sampling stopped: %s", err)
    finally:
        pynvml.nvmlShutdown()
    return out


def _one_gpu(pynvml, i: int) -> dict:
    h = pynvml.nvmlDeviceGetHandleByIndex(i)
    mem = pynvml.nvmlDeviceGetMemoryInfo(h)
    util = pynvml.nvmlDeviceGetUtilizationRates(h).gpu
    return {"gpu": i, "util": util, "mem_gb": mem.used / 1e9, "time": time.time()}


class Monitor:
    """Collects the records published on ``topic`` (and, with GPUs, samples their use). With
    ``run_dir``, also writes them there as a TensorBoard run (:mod:`helpers.runs`), with
    ``config`` (the job's ``TrainConfig``) as its hparams; :meth:`close` finishes the run."""

    def __init__(self, client, topic: str = "training", run_dir=None, config: Any = None):
        self.client, self.topic = client, topic
        self.records: list[dict] = []
        self.gpu: list[dict] = []
        self._lock = threading.Lock()
        self.run = TensorBoardRun(run_dir, config) if run_dir else None
        client.subscribe_topic(topic, self._on_event)

    def _on_event(self, event) -> None:
        _, record = event  # (timestamp, msg)
        with self._lock:
            self.records.append(dict(record))
        if self.run is not None:
            self.run.record(record)

    def frame(self, kind: str | None = None) -> pd.DataFrame:
        """The records so far as a DataFrame (``kind``: "step" or "epoch")."""
        import pandas as pd

        with self._lock:
            rows = [r for r in self.records if kind is None or r.get("kind") == kind]
        return pd.DataFrame(rows)

    def latest_line(self) -> str:
        """Rank 0's latest progress record as one line (what its log shows)."""
        with self._lock:
            last = next((r for r in reversed(self.records) if r.get("rank") == 0), None)
        if last is None:
            return "waiting for the first record..."
        return epoch_line(last) if last["kind"] == "epoch" else progress_line(last)

    def restarts(self) -> list[dict]:
        """The job's automatic restarts so far, each with ``at``: how far training was (in
        epochs, the curves' x axis) at rank 0's last step record before it."""
        out, at = [], 0.0
        with self._lock:
            for r in self.records:
                if r.get("kind") == "step" and r.get("rank") == 0:
                    at = r["epoch"] - 1 + r["step"] / r["steps"]
                elif r.get("kind") == "restart":
                    out.append({**r, "at": at})
        return out

    def notices(self) -> list[str]:
        """What the cell's output tells beside the plot, in order: each automatic restart, and
        where every rank was when a job hung or a collective failed."""
        from helpers.jobs.control import show_stacks

        restarts = iter(self.restarts())
        out = []
        with self._lock:
            kinds = [r for r in self.records if r.get("kind") in ("restart", "stacks")]
        for r in kinds:
            if r["kind"] == "restart":
                out.append(restart_line(next(restarts)))
            else:
                out.append(f"{r['error'].splitlines()[0]}\nWhere each rank was:\n"
                           f"{show_stacks(r['stacks'])}")  # fmt: skip
        return out

    def sample_gpus(self) -> None:
        for worker, stats in self.client.run(gpu_stats).items():
            for s in stats:
                self.gpu.append({"worker": worker, **s})
                if self.run is not None:
                    self.run.gpu(self.gpu[-1])

    def follow(
        self, job: Future, refresh_s: float = 2.0, gpus: bool = False, draw: Callable | None = None
    ) -> Any:
        """Redraw ``draw(monitor)`` (it returns Axes) in the cell's output until ``job`` is done:
        when records came (checked every ``refresh_s``), once per epoch's end however fast.

        ``job`` is a :class:`helpers.jobs.control.Job` (:func:`helpers.ddp.start`) or a
        ``concurrent.futures.Future``; returns its result, raising its error. Interrupting the
        cell (Jupyter's stop button: KeyboardInterrupt) cancels the job: every rank stops and
        the cluster is free again within seconds.
        """
        try:
            return self._follow(job, refresh_s, gpus, draw)
        except KeyboardInterrupt:
            if hasattr(job, "stop"):  # a Job: stop its ranks, not only this cell
                log.warning("interrupted: cancelling the job")
                job.cancel()
            raise

    def _follow(self, job, refresh_s: float, gpus: bool, draw) -> Any:
        from IPython.display import display

        handle = display(None, display_id=True) if draw else None
        told, shown = 0, (0, 0)
        while True:
            finished = job.done() or _wait(job, refresh_s)
            if gpus and not finished:  # a job that ended may have lost the cluster with it
                self.sample_gpus()
            for line in self.notices()[told:]:  # in the cell's output, beside the plot
                log.warning(line)
                told += 1
            if handle is not None:
                shown = self._redraw(handle, draw, shown)
            if finished:
                return job.result()

    def _redraw(self, handle, draw: Callable, shown: tuple[int, int]) -> tuple[int, int]:
        """Draw the records as they were at each epoch's end not shown yet, then all of them:
        every epoch shows, however fast the job ran between two refreshes. ``shown``: (epoch
        records, records) drawn so far; returns the new one."""
        import copy

        with self._lock:
            records = list(self.records)
        ends = [i + 1 for i, r in enumerate(records) if r.get("kind") == "epoch"]
        drawn = shown[1]
        for n in [*ends[shown[0] :], len(records)]:
            if n > drawn:
                view = copy.copy(self)  # what draw() reads, as it was after n records
                view.records = records[:n]
                fig = _figure(draw(view))
                handle.update(fig)
                _close(fig)
                drawn = n
        return len(ends), drawn

    def close(self) -> None:
        """Stop listening; a TensorBoard run gets its hparams and is closed."""
        self.client.unsubscribe_topic(self.topic)
        if self.run is not None:
            self.run.close()

    def save(self, path: str) -> None:
        """Keep the metrics with the run (CSV)."""
        self.frame().to_csv(path, index=False)


def _wait(job, seconds: float) -> bool:
    from concurrent.futures import TimeoutError as FuturesTimeout  # not the builtin before 3.11

    try:
        job.exception(timeout=seconds)
        return True
    except (FuturesTimeout, TimeoutError):
        return False
    except Exception:  # noqa: BLE001 - cancelled, or its error: finished either way
        return True


def _figure(drawn):
    """The figure of what a plot helper returned: an Axes, an array or list of them."""
    first = (
        drawn.flat[0]
        if hasattr(drawn, "flat")
        else (drawn[0] if isinstance(drawn, (list, tuple)) else drawn)
    )
    return first.figure


def _close(fig) -> None:
    import matplotlib.pyplot as plt

    plt.close(fig)
