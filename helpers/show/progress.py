"""Progress where people wait: tqdm's bar in a live notebook, one plain log line otherwise.

``progress(items_or_total, desc)`` wraps an iterable (each item counts one) or counts up to a
total through ``update(n)``. Where it shows:

- in a kernel a Jupyter server started for a notebook (it sets ``JPY_SESSION_NAME``): tqdm's
  notebook bar (``tqdm.auto``), which the reader sees move;
- anywhere else (papermill, scripts, workers, logs): a log record every ``every_s`` seconds and
  one at the end, ``upload [256/1200] 21% 85.3 img/s eta 0:00:11``, never a carriage-return bar.

``DASK_DL_PROGRESS=bar`` or ``=log`` forces one of the two. ``callback(done, total)`` is called
after every update as well (``total`` is 0 when unknown), for callers that show it their own way.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from helpers.errors import ParameterError

log = logging.getLogger(__name__)

Callback = Callable[[int, int], None]


def use_bar() -> bool:
    """Whether progress shows as tqdm's notebook bar (see the module docstring)."""
    forced = os.environ.get("DASK_DL_PROGRESS", "")
    if forced in ("bar", "log"):
        return forced == "bar"
    if not os.environ.get("JPY_SESSION_NAME"):  # papermill's kernels have no Jupyter session
        return False
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return type(get_ipython()).__name__ == "ZMQInteractiveShell"


class Progress:
    """Counts done units of ``total`` (0: unknown); a context manager, iterable when it wraps
    an iterable."""

    def __init__(
        self,
        items: Iterable[Any] | int,
        desc: str,
        callback: Callback | None = None,
        unit: str = "it",
        every_s: float = 5.0,
    ):
        self.items = None if isinstance(items, int) else items
        if isinstance(items, int):
            self.total = items
        else:
            self.total = len(items) if hasattr(items, "__len__") else 0
        self.desc, self.unit, self.every_s, self.callback = desc, unit, every_s, callback
        self.done = self._logged_done = 0
        self._start = self._logged = time.perf_counter()
        self._closed = False
        self._bar = None
        if use_bar():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total or None, desc=desc, unit=unit)

    def update(self, n: int = 1) -> None:
        """``n`` more units are done."""
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif time.perf_counter() - self._logged >= self.every_s:
            log.info("%s", self.line())
        if self.callback is not None:
            self.callback(self.done, self.total)

    def line(self) -> str:
        """One record: ``desc [done/total] pct rate eta``."""
        now = time.perf_counter()
        self._logged, self._logged_done = now, self.done
        elapsed = max(now - self._start, 1e-9)
        rate = self.done / elapsed
        if not self.total:
            return f"{self.desc} [{self.done}] {rate:.1f} {self.unit}/s"
        eta = (self.total - self.done) / rate if rate else 0.0
        return (
            f"{self.desc} [{self.done}/{self.total}] {100 * self.done / self.total:.0f}% "
            f"{rate:.1f} {self.unit}/s eta {datetime.timedelta(seconds=round(eta))}"
        )

    def close(self) -> None:
        """Finish: the bar stops, or the last line is logged (once)."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self._logged_done != self.done or not self.done:
            log.info("%s", self.line())

    def __iter__(self) -> Iterator[Any]:
        if self.items is None:
            raise ParameterError(
                f"progress({self.total}, ...) counts with update(); it wraps nothing to iterate"
            )
        try:
            for item in self.items:
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(
    items_or_total: Iterable[Any] | int,
    desc: str,
    callback: Callback | None = None,
    unit: str = "it",
    every_s: float = 5.0,
) -> Progress:
    """Track an iterable (``for x in progress(xs, "desc")``) or a total (``with progress(n, d)
    as p: p.update(k)``): a notebook bar or log lines, and ``callback(done, total)``."""
    return Progress(items_or_total, desc, callback, unit, every_s)
