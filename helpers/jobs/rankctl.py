"""What runs in a worker process beside a DDP rank: its stop switch, its heartbeat, its signals.

A running Dask task cannot be interrupted from outside (``client.cancel`` only forgets it). So:

- each rank registers its thread under its job's name while it runs (:func:`registered`);
- :func:`stop` raises :class:`~helpers.errors.Stopped` in the rank's thread
  (``PyThreadState_SetAsyncExc``). It lands at the next Python bytecode: between steps, when a
  DataLoader wait returns (every 5 s at most), or when a collective returns because a peer
  closed its process group; never inside an import, which it waits for. A rank stuck in C for
  longer than :data:`helpers.jobs.control.STOP_GRACE_S` is ended by restarting its worker. A
  stop is sent only while the rank's thread runs the rank (a lock decides), and one still
  pending when the rank ends is withdrawn: it never lands in Dask's thread pool, whose threads
  are not replaced;
- a watchdog beside each rank stops it when its task is no longer wanted: cancelled, or its
  client gone (a notebook kernel that died, a client that left a remote cluster), within
  :data:`WATCH_S`, so no rank trains on with nobody to report to;
- :func:`beat` (every training step) stamps the time; :func:`progress` reports its age, so the
  job tells a hung rank from a slow one; :func:`stacks` shows where a quiet rank is;
- SIGTERM (a node drained, a pod evicted: a grace period, then SIGKILL) and a worker closing
  (its nanny told to stop) set a flag the training loop reads with :func:`stop_requested`, to
  write a checkpoint at the current step before the worker goes (:class:`RankGuard`).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

from distributed.diagnostics.plugin import WorkerPlugin

from helpers.errors import Cancelled, Stopped

log = logging.getLogger(__name__)

WATCH_S = 2.0  # how often a rank's watchdog asks whether its task is still wanted
GRACE_S = 30.0  # how long a signalled or closing worker waits for its rank's checkpoint
IMPORT_WAIT_S = 0.05  # a stop waits for the rank's import to finish, checking this often

_LOCK = threading.Lock()  # a stop is sent, and a rank ends, one at a time
_RANKS: dict[str, dict] = {}  # job -> {"thread", "beat", "steps", "stop", "running"}
_STOPPED: list[str] = []  # jobs told to stop, newest last: a rank starting late stops at once
_TERM: dict = {"at": 0.0, "exit": False}  # when SIGTERM (or a close) came; exit once ranks end


@contextmanager
def registered(job: str) -> Iterator[dict]:
    """Register the calling thread as ``job``'s rank in this process while the block runs, with
    a watchdog that stops it when its task is no longer wanted. Leaving the block (or
    :func:`release`) ends all stopping: a stop still pending is withdrawn."""
    if job in _STOPPED or _over(job):
        raise Cancelled(f"{job} was stopped or over before this rank started")
    entry = {"thread": threading.get_ident(), "beat": 0.0, "steps": 0, "stop": False,
             "running": True, "done": threading.Event()}  # fmt: skip
    with _LOCK:
        _RANKS[job] = entry
    _watch(job, entry)
    try:
        yield entry
    finally:
        release(job, entry)
        with _LOCK:
            _RANKS.pop(job, None)
        if _TERM["exit"] and not _RANKS:  # SIGTERM came while it ran: now the worker goes
            threading.Timer(1.0, os._exit, (128 + signal.SIGTERM,)).start()  # its error sent


def release(job: str, entry: dict | None = None) -> None:
    """No stop for ``job``'s rank from now on (it is cleaning up, or done); one already sent
    and not yet raised is withdrawn. Call it from the rank's own thread."""
    entry = entry or _RANKS.get(job)
    if entry is None or not entry["running"]:
        return
    with _LOCK:
        entry["running"] = False
        entry["done"].set()
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(entry["thread"]), None)


def _over(job: str) -> bool:
    """Whether the client marked ``job``'s attempt over (a Dask Event; False outside Dask)."""
    try:
        from distributed import Event, get_client

        return Event(f"{job}-over", client=get_client()).is_set()
    except ValueError:  # no worker or client here: a plain process, nothing to ask
        return False


def _watch(job: str, entry: dict) -> None:
    """Stop ``job``'s rank once the worker no longer wants its task (cancelled, released, its
    client gone): a daemon thread that reads the worker's task state every :data:`WATCH_S`."""
    try:
        from distributed import get_worker

        worker = get_worker()
        key = worker.get_current_task()
    except ValueError:  # not in a Dask task: nothing to watch
        return

    def watch() -> None:
        while not entry["done"].wait(WATCH_S):
            task = worker.state.tasks.get(key)
            if task is None or task.state not in ("executing", "long-running"):
                log.warning("%s: its task is %s; stopping the rank", job,
                            task.state if task else "gone")  # fmt: skip
                stop(job)
                return

    threading.Thread(target=watch, name=f"watch-{job}", daemon=True).start()


def stop(job: str) -> bool:
    """Stop ``job``'s rank in this process (run it with ``client.run``); True if one ran."""
    with _LOCK:
        if job not in _STOPPED:
            _STOPPED[:] = [*_STOPPED[-99:], job]
        entry = _RANKS.get(job)
        if entry is None or entry["stop"] or not entry["running"]:
            return False
        if _importing(entry["thread"]):  # later: an import cut short can poison the process
            threading.Timer(IMPORT_WAIT_S, stop, (job,)).start()
            return True
        entry["stop"] = True
        sent = ctypes.pythonapi.PyThreadState_SetAsyncExc(
            ctypes.c_ulong(entry["thread"]), ctypes.py_object(Stopped)
        )
    log.warning("stopping DDP job %s in this worker (%d thread)", job, sent)
    return bool(sent)


def _importing(thread: int) -> bool:
    """Whether ``thread`` is inside an import. A stop must not land there: Python forgets the
    half-imported module, but not what its C code registered, so importing it again fails for
    the life of the process (torch: "duplicate registrations for aten...")."""
    frame = sys._current_frames().get(thread)
    while frame is not None:
        if frame.f_code.co_filename == "<frozen importlib._bootstrap>":
            return True
        frame = frame.f_back
    return False


def running() -> list[str]:
    """The jobs with a rank running in this process (run with ``client.run``)."""
    with _LOCK:
        return sorted(job for job, entry in _RANKS.items() if entry["running"])


def exit_soon(delay_s: float = 0.2) -> int:
    """End this worker process in ``delay_s`` (after ``client.run`` has its answer): the last
    resort for a rank stuck in C. Returns the process id."""
    threading.Timer(delay_s, os._exit, (70,)).start()
    log.warning("ending worker process %d: its DDP rank ignored the stop", os.getpid())
    return os.getpid()


def beat() -> None:
    """The calling rank made progress (a training or validation step)."""
    ident = threading.get_ident()
    for entry in list(_RANKS.values()):
        if entry["thread"] == ident:
            entry["beat"] = time.monotonic()
            entry["steps"] += 1


def progress(job: str) -> dict | None:
    """``{"age_s": seconds since the last beat (None before the first), "steps"}``, or None
    when ``job`` runs no rank here (run with ``client.run``)."""
    entry = _RANKS.get(job)
    if entry is None:
        return None
    age = time.monotonic() - entry["beat"] if entry["beat"] else None
    return {"age_s": age, "steps": entry["steps"], "terminating": bool(_TERM["at"])}


def stacks(job: str, depth: int = 12) -> str | None:
    """Where ``job``'s rank is now: its thread's Python stack, innermost last (``depth`` frames),
    or None when it runs no rank here (run with ``client.run``)."""
    entry = _RANKS.get(job)
    frame = sys._current_frames().get(entry["thread"]) if entry else None
    if frame is None:
        return None
    return "".join(traceback.format_stack(frame)[-depth:])


def watch_sigterm() -> bool:
    """On SIGTERM, let this worker's rank checkpoint first (run with ``client.run``: it executes
    in the main thread, the only one that may set handlers). The signal is noted
    (:func:`stop_requested`); a handler that was there (Dask's own, in a worker started without a
    nanny) then runs at once and closes the worker, whose :class:`RankGuard` waits for the
    checkpoint; without one, the process exits once its rank has ended, or after
    :data:`GRACE_S`."""
    if threading.current_thread() is not threading.main_thread():
        return False
    previous = signal.getsignal(signal.SIGTERM)
    if getattr(previous, "__name__", "") == "_noted":
        return True

    def _noted(signum, frame):
        if _TERM["at"]:
            return
        _TERM["at"] = time.monotonic()
        if callable(previous):  # in the main thread, as a signal handler must be
            previous(signum, frame)
            return
        _TERM["exit"] = True
        if not _RANKS:
            os._exit(128 + signum)
        threading.Timer(GRACE_S, os._exit, (128 + signum,)).start()  # a rank that never ends

    signal.signal(signal.SIGTERM, _noted)
    return True


def stop_requested() -> bool:
    """True once this worker process has been told to go (SIGTERM, or closing)."""
    return bool(_TERM["at"])


class RankGuard(WorkerPlugin):
    """A worker closing (its nanny told to stop, Dask's SIGTERM handler, a scale-down) first
    lets its rank write a checkpoint at the current step: it sets :func:`stop_requested` and
    waits for the rank to end, at most :data:`GRACE_S`."""

    name = "helpers-rank-guard"

    async def teardown(self, worker) -> None:
        if not running():
            return
        _TERM["at"] = _TERM["at"] or time.monotonic()
        log.warning("worker closing: its DDP rank checkpoints first (at most %.0f s)", GRACE_S)
        deadline = time.monotonic() + GRACE_S
        while running() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
