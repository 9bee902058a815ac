"""What runs in a worker process beside a DDP rank: its stop switch, its heartbeat, its signals.

A running Dask task cannot be interrupted from outside (``client.cancel`` only forgets it). So:

- each rank registers its thread under its job's key (:func:`registered`);
- :func:`stop`, sent by the notebook with ``client.run`` (which runs in the worker's event loop
  while the task's thread is busy), sets the job's stop flag and raises :class:`Stopped` in the
  rank's thread (``PyThreadState_SetAsyncExc``). It lands at the next Python bytecode: between
  steps, when a DataLoader wait returns (every 5 s at most), or when a collective returns
  because a peer closed its process group. A rank stuck in C for longer than
  :data:`helpers.jobs.control.STOP_GRACE_S` is ended by restarting its worker;
- :func:`beat` (every training step) stamps the time; :func:`progress` reports its age, so the
  job tells a hung rank from a slow one;
- SIGTERM (a node drained, a pod evicted: a grace period, then SIGKILL) sets a flag the
  training loop reads with :func:`stop_requested` to write a checkpoint before it goes.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from helpers.errors import Cancelled, Stopped

log = logging.getLogger(__name__)

_RANKS: dict[str, dict] = {}  # job key -> {"thread", "beat", "steps"}: this process's ranks
_STOPPED: list[str] = []  # jobs told to stop, newest last: a rank starting late stops at once
_TERM: dict = {"at": 0.0, "obey": None}  # when SIGTERM arrived (0: never), and what then


@contextmanager
def registered(job: str) -> Iterator[dict]:
    """Register the calling thread as ``job``'s rank in this process while the block runs."""
    if job in _STOPPED or _over(job):
        raise Cancelled(f"{job} was stopped or over before this rank started")
    entry = {"thread": threading.get_ident(), "beat": 0.0, "steps": 0, "stop": False}
    _RANKS[job] = entry
    try:
        yield entry
    finally:
        _RANKS.pop(job, None)
        if _TERM["at"]:  # SIGTERM came while the rank ran: obey it now that it has ended
            threading.Timer(1.0, _TERM["obey"]).start()  # once the task's error is sent


def _over(job: str) -> bool:
    """Whether the client marked ``job``'s attempt over (a Dask Event; False outside Dask)."""
    try:
        from distributed import Event, get_client

        return Event(f"{job}-over", client=get_client()).is_set()
    except ValueError:  # no worker or client here: a plain process, nothing to ask
        return False


def stop(job: str) -> bool:
    """Stop ``job``'s rank in this process (run it with ``client.run``); True if one ran."""
    if job not in _STOPPED:
        _STOPPED[:] = [*_STOPPED[-99:], job]
    entry = _RANKS.get(job)
    if entry is None or entry["stop"]:
        return False
    entry["stop"] = True
    done = ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(entry["thread"]), ctypes.py_object(Stopped)
    )
    log.warning("stopping DDP job %s in this worker (%d thread)", job, done)
    return bool(done)


def exit_soon(delay_s: float = 0.2) -> int:
    """End this worker process in ``delay_s`` (after ``client.run`` has its answer): the last
    resort for a rank stuck in C. Returns the process id."""
    threading.Timer(delay_s, os._exit, (70,)).start()
    log.warning("ending worker process %d: its DDP rank ignored the stop", os.getpid())
    return os.getpid()


def beat() -> None:
    """The calling rank made progress (a training or validation step)."""
    ident = threading.get_ident()
    for entry in _RANKS.values():
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


def watch_sigterm(grace_s: float = 30.0) -> bool:
    """On SIGTERM, let this worker's rank checkpoint first: the signal is noted
    (:func:`stop_requested`) and obeyed once the rank has ended, or after ``grace_s``. Run with
    ``client.run``: it executes in the main thread, the only one that may set handlers."""
    if threading.current_thread() is not threading.main_thread():
        return False
    previous = signal.getsignal(signal.SIGTERM)
    if getattr(previous, "__name__", "") == "_noted":
        return True

    def _noted(signum, frame):
        if not _TERM["at"]:
            _TERM["at"], _TERM["obey"] = time.monotonic(), functools.partial(_obey, previous)
            log.warning("SIGTERM: the DDP rank here checkpoints, then the worker goes")
            threading.Timer(grace_s if _RANKS else 0.1, _TERM["obey"]).start()

    signal.signal(signal.SIGTERM, _noted)
    return True


def _obey(previous) -> None:
    if callable(previous):
        previous(signal.SIGTERM, None)
    else:
        os._exit(128 + signal.SIGTERM)


def stop_requested() -> bool:
    """True once this worker process has been told to terminate (SIGTERM)."""
    return bool(_TERM["at"])
