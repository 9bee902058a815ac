"""A DDP job's life on the client: watch its ranks, stop them, say why it failed, restart it.

:class:`Job` is what :func:`helpers.ddp.start` returns: a ``concurrent.futures.Future``'s
``result()``/``done()``/``exception()``, plus ``cancel()`` that really stops the ranks
(:mod:`helpers.jobs.rankctl` says how) and ``restarts``, one record per automatic restart.
:func:`supervise` watches one attempt: the failing rank's own error, a dead worker, a hung rank;
:func:`restart_cause` says which errors a restart can fix.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from helpers.errors import (
    Cancelled,
    ClusterBusy,
    RankHung,
    SchedulerLost,
    StorageUnavailable,
    Terminated,
    WorkerLost,
)
from helpers.jobs import rankctl

if TYPE_CHECKING:  # names for annotations only: importing costs nothing at run time
    from distributed import Client

log = logging.getLogger(__name__)

STOP_GRACE_S = 3.0  # a rank that ignores its stop this long is ended by restarting its worker
HANG_STACK_DEPTH = 12  # frames of each rank's stack shown when a job hangs


def scheduler_lost(client: Client, job: str) -> SchedulerLost | None:
    """The error to raise if ``client`` has lost its scheduler (a status the client sets the
    moment the connection closes: no round trip), else None."""
    if client.status == "running":
        return None
    return SchedulerLost(
        f"lost the Dask scheduler at {client.scheduler.address} while {job} ran (the client is "
        f"{client.status}): it was killed, crashed or its machine went away, and the job ended. "
        "Start the cluster again and rerun with resume=True to continue from the last checkpoint"
    )


class Job:
    """A running DDP job: a ``concurrent.futures.Future`` of its results, and ``cancel()``."""

    def __init__(self) -> None:
        self.future: Future = Future()
        self.stop = threading.Event()
        self.restarts: list[dict] = []  # one record per automatic restart, with its cause

    def cancel(self, timeout_s: float = 10.0) -> bool:
        """Stop every rank and free the cluster; True once the job has ended (within
        ``timeout_s``)."""
        self.stop.set()
        try:
            self.future.exception(timeout=timeout_s)
        except Exception:  # noqa: BLE001 - cancelled or not ended in time: done() says which
            pass
        return self.future.done()

    def result(self, timeout: float | None = None) -> Any:
        return self.future.result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        return self.future.exception(timeout)

    def done(self) -> bool:
        return self.future.done()


def supervise(
    client: Client, job: str, ranks: list, futures: list, stop: threading.Event, hang_s: float
) -> list:
    """Wait for one attempt's ranks; stop them all on the first error, a dead worker, a hung
    rank or ``stop``, and raise the cause (the failing rank's own error)."""
    checked, ids = time.monotonic(), worker_ids(client, ranks)
    try:
        while True:
            if lost := scheduler_lost(client, job):  # before anything that asks the scheduler
                raise lost
            if stop.is_set():
                raise Cancelled(f"{job} was cancelled; its ranks were stopped")
            if any(f.status == "error" for f in futures):
                time.sleep(0.5)  # let peers' secondary errors land, then pick the real one
                check_alive(client, ranks, ids)  # a dead worker explains its peers' errors
                err = primary_error([f for f in futures if f.status == "error"])
                if _collective(err):  # a collective failed or timed out: show where all are
                    err.stacks = rank_stacks(client, job, ranks)
                raise err
            if all(f.status == "finished" for f in futures):
                return [f.result() for f in futures]
            if any(f.status == "cancelled" for f in futures):
                raise Cancelled(f"{job} was cancelled by another client")
            if time.monotonic() - checked > 1.0:
                try:
                    check_alive(client, ranks, ids)
                    check_progress(client, job, ranks, hang_s)
                except OSError as err:  # the scheduler went away during the call?
                    if (lost := scheduler_lost(client, job)) is None:
                        raise
                    raise lost from err
                checked = time.monotonic()
            time.sleep(0.1)
    finally:
        if scheduler_lost(client, job):  # nothing to tell: the ranks' workers lost it too
            log.error("%s: the scheduler is gone; its ranks cannot be stopped from here", job)
        else:
            over(client, job)
            stop_ranks(client, job, ranks, futures, ids, replace=stop.is_set())


def worker_ids(client: Client, ranks: list) -> dict[str, str | None]:
    """Each rank's worker's server id on the scheduler (None when gone): a worker its nanny
    restarted at the same address has a new one. One scheduler round trip, no worker asked."""
    ids = client.run_on_scheduler(  # a lambda travels by value: the scheduler needs no helpers
        lambda dask_scheduler: {a: w.server_id for a, w in dask_scheduler.workers.items()}
    )
    return {r.worker: ids.get(r.worker) for r in ranks}


def stop_ranks(
    client: Client, job: str, ranks: list, futures: list, ids: dict, replace: bool = True
) -> None:
    """End the ranks still running: a stop raised in their threads, then, for a rank still
    running after :data:`STOP_GRACE_S`, its worker process ended (its nanny starts another).
    Ranks whose worker has died already need nothing. Returns once none runs."""
    now = worker_ids(client, ranks)
    running = [
        (r, f)
        for r, f in zip(ranks, futures, strict=True)
        if not f.done() and now.get(r.worker) == ids.get(r.worker)
    ]
    if not running:
        client.cancel([f for f in futures if not f.done()], force=True)  # dead workers' ranks
        return
    workers = [r.worker for r, _ in running]
    deadline = time.monotonic() + STOP_GRACE_S
    while time.monotonic() < deadline and not all(f.done() for _, f in running):
        try:  # again every half second: a rank may register after the first call
            client.run(rankctl.stop, job, workers=workers, on_error="return")
        except Exception as err:  # noqa: BLE001 - a worker going away meanwhile
            log.warning("%s: could not reach every rank to stop it: %r", job, err)
        time.sleep(0.5)
    now = worker_ids(client, ranks)
    stuck = [r.worker for r, f in running if not f.done() and now.get(r.worker) == ids[r.worker]]
    if stuck:  # stuck in C: only the process can go. Its nanny starts a fresh worker
        log.warning(
            "%s: ranks on %s ignored the stop for %.0f s; ending those worker "
            "processes (their nannies restart them)",
            job,
            stuck,
            STOP_GRACE_S,
        )
        n = len(client.nthreads())
        client.run(rankctl.exit_soon, workers=stuck, on_error="return")
        _wait_gone(client, [r for r, f in running if r.worker in stuck], ids, 10.0)
        if replace:  # a cancelled job's successor should find as many workers as it had
            wait_for_workers(client, n, 60.0)
    client.cancel([f for f in futures if not f.done()], force=True)


def _wait_gone(client, ranks: list, ids: dict, timeout_s: float) -> None:
    """Until each of ``ranks``' worker processes has gone (absent, or a new process id)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = worker_ids(client, ranks)
        if all(now[r.worker] != ids[r.worker] for r in ranks):
            return
        time.sleep(0.1)


def over(client: Client, job: str) -> None:
    """Mark ``job``'s attempt over: a rank Dask reschedules later (its worker died and came
    back at the same address) refuses to start (:func:`helpers.jobs.rankctl.registered`)."""
    from distributed import Event

    Event(f"{job}-over", client=client).set()


def check_alive(client: Client, ranks: list, ids: dict) -> None:
    """Raise :class:`WorkerLost` naming the first rank whose worker died (or was replaced)."""
    now = worker_ids(client, ranks)
    for r in ranks:
        if now.get(r.worker) != ids.get(r.worker):
            raise WorkerLost(f"DDP rank {r.rank}: its worker {r.worker} {_death(client, r.worker)}")


def _death(client: Client, worker: str, within_s: float = 300.0) -> str:
    """How ``worker`` died, as far as the cluster knows: its nanny's memory monitor says when
    it restarted a worker over its memory limit (an event on the scheduler)."""
    try:
        events = client.get_events("worker-restart-memory")
    except Exception:  # noqa: BLE001 - an older scheduler, a closing client: no cause known
        events = ()
    for stamp, event in reversed(events):
        if event.get("worker") == worker and time.time() - stamp < within_s:
            return (
                f"went over its memory limit ({event['rss'] / 2**30:.2f} GiB resident) and its "
                "nanny restarted it: give the workers more memory (memory_limit), or hold less "
                "per rank (a smaller batch, strategy='fsdp')"
            )
    return (
        "died (killed by the system, e.g. out of memory, or crashed); see that worker's "
        "nanny log for the signal"
    )


def check_progress(client: Client, job: str, ranks: list, hang_s: float) -> None:
    """Raise :class:`RankHung` naming the rank that went quiet first, once every rank that has
    beaten at least once has been quiet for ``hang_s`` (ranks waiting for it go quiet too)."""
    if not hang_s:
        return
    seen = client.run(rankctl.progress, job, workers=[r.worker for r in ranks], on_error="return")
    ages = {}  # by rank number: a Rank carries its restart records, dicts, and is not hashable
    for r in ranks:
        p = seen.get(r.worker)
        if isinstance(p, dict) and p["age_s"]:
            ages[r.rank] = p["age_s"]
    if ages and min(ages.values()) > hang_s:
        quiet = ranks[max(ages, key=ages.get)]
        stacks = rank_stacks(client, job, ranks)
        err = RankHung(
            f"DDP rank {quiet.rank} on worker {quiet.worker} made no progress for "
            f"{ages[quiet.rank]:.0f} s (hang_s={hang_s}); stopping the job. Where each rank "
            f"was:\n{show_stacks(stacks)}"
        )
        err.stacks = stacks
        raise err


def primary_error(failed: list) -> BaseException:
    """The error that ended the job, from the futures of the ranks that failed: a rank's own
    error before its peers' reactions to it (a collective that failed because a peer left:
    torch's ``DistError``; a rank stopped: ``Cancelled``), and among those, the first to fail
    (``failed_at``, stamped by the rank)."""

    def order(f) -> tuple:
        err = f.exception()
        return (_collective(err) or isinstance(err, Cancelled), getattr(err, "failed_at", 1e18))

    first = min(failed, key=order)
    err = first.exception()
    log.error("DDP rank %s failed: %r", getattr(err, "rank", "?"), err)
    return err


def _collective(err: BaseException) -> bool:
    """Whether ``err`` is a collective's failure (torch.distributed's ``DistError``: a peer
    that closed its group, a timeout), which another rank's failure usually causes."""
    import torch.distributed as dist

    return isinstance(err, dist.DistError)


def rank_stacks(client: Client, job: str, ranks: list) -> dict[str, str]:
    """``{"rank N on worker": its Python stack}`` of every rank of ``job`` still running: where a
    hung job is, on every worker (one ``client.run``)."""
    workers = [r.worker for r in ranks]
    try:
        seen = client.run(rankctl.stacks, job, HANG_STACK_DEPTH, workers=workers, on_error="return")
    except OSError:  # the scheduler or a worker went away meanwhile
        return {}
    return {f"rank {r.rank} on {r.worker}": seen[r.worker] for r in ranks
            if isinstance(seen.get(r.worker), str)}  # fmt: skip


def show_stacks(stacks: dict[str, str]) -> str:
    """The stacks of :func:`rank_stacks`, as text to read in an error or a cell's output."""
    return "\n".join(f"--- {who}:\n{stack.rstrip()}" for who, stack in stacks.items())


def restart_cause(err: BaseException, previous: BaseException | None) -> str | None:
    """Why a restart may help (``"worker lost"``, ``"hung"``, ``"storage unavailable"``), or
    None for errors it cannot fix: a bad parameter, a missing bucket, a bug, the same error
    twice in a row."""
    from distributed import KilledWorker

    if previous is not None and (type(err), str(err)) == (type(previous), str(previous)):
        if not isinstance(err, (WorkerLost, KilledWorker)):
            return None  # the same error again: a bug or a setting, not bad luck
    if isinstance(err, (WorkerLost, KilledWorker)):
        return "worker lost"
    if isinstance(err, RankHung):
        return "hung"
    if isinstance(err, Terminated):
        return "terminated"
    if isinstance(err, StorageUnavailable):
        return "storage unavailable"
    return None


def wait_for_leavers(client: Client, timeout_s: float) -> None:
    """Until every worker told to stop (SIGTERM) has gone: a rank planned on one would die with
    it. A worker obeys once its rank has ended (and checkpointed), a second later."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        told = client.run(rankctl.stop_requested, on_error="return")  # a new process: False
        if not any(t is True for t in told.values()):
            return
        time.sleep(0.2)
    log.warning("workers told to stop were still there after %.0f s", timeout_s)


def wait_for_older_ranks(client: Client, timeout_s: float | None) -> None:
    """Until no rank of an earlier job runs on the cluster (its client may have died and its
    lock's lease run out while its ranks still stop), or :class:`ClusterBusy` after
    ``timeout_s``: a new job never trains beside an old one."""
    deadline = time.monotonic() + (timeout_s if timeout_s is not None else 1e9)
    while True:
        left = {w: jobs for w, jobs in client.run(rankctl.running, on_error="return").items()
                if isinstance(jobs, list) and jobs}  # fmt: skip
        if not left:
            return
        if time.monotonic() > deadline:
            raise ClusterBusy(
                f"ranks of an earlier job still run on {left} after {timeout_s:.0f} s "
                "(lock_timeout_s); cancel them or restart those workers"
            )
        time.sleep(0.5)


def wait_for_workers(client: Client, n: int, timeout_s: float) -> list[str]:
    """The cluster's workers once it has ``n`` again (a nanny restarts a dead one)."""
    deadline = time.monotonic() + timeout_s
    while True:
        workers = list(client.nthreads())
        if len(workers) >= n:
            return sorted(workers)[:n]  # the same world size as before
        if time.monotonic() > deadline:
            raise WorkerLost(
                f"the cluster has {len(workers)} workers, the job needs {n}; none came back "
                f"within {timeout_s:.0f} s (restart_wait_s): restart or scale the cluster"
            )
        time.sleep(0.5)
