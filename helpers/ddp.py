"""Run a function on every Dask worker as one rank of a PyTorch DistributedDataParallel job.

:func:`run` does what ``torchrun`` does, with the Dask cluster as the launcher:

- enumerate *all* workers (``scheduler_info`` truncates by default) and order them by host, so
  ranks on one host are neighbours and rank 0's host is the master;
- pick a free port on that host, unique task keys per job (no cached results, no collisions);
- on each worker: set ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``... (restored afterwards), pick the
  backend (nccl with CUDA, else gloo) and one GPU per rank, init the process group with a
  timeout, call the function, destroy the group;
- if a rank fails, raise *its* error (not a peer's secondary "connection closed") and cancel the
  others; if a worker dies, say which, within seconds. Jobs on one cluster take turns.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import TYPE_CHECKING

from helpers.cluster import check_workers
from helpers.config import JobConfig, Rank
from helpers.errors import Cancelled, ClusterBusy, ClusterError, Stopped
from helpers.jobs import control as jobs
from helpers.jobs import rankctl

if TYPE_CHECKING:  # names for annotations only: importing costs nothing at run time
    import torch
    from distributed import Client

log = logging.getLogger(__name__)

LOCK = "helpers.ddp.job"  # one DDP job at a time per cluster: ranks share the workers' threads


def _host(address: str) -> str:
    return address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")


def plan(workers: list[str], master_port: int, visible: dict | None = None) -> list[Rank]:
    """Ranks for worker addresses: grouped by host, rank 0's host is the master.

    ``visible``: each worker's ``CUDA_VISIBLE_DEVICES``. dask-cuda gives every worker on a host
    a rotated list whose first GPU is its own: then each rank uses its GPU 0. Workers that all
    see the same list use GPU ``local_rank`` instead.
    """
    ordered = sorted(workers, key=lambda a: (_host(a), a))
    hosts = {}
    for a in ordered:
        hosts.setdefault(_host(a), []).append(a)
    master = _host(ordered[0])
    visible = visible or {}
    ranks = []
    for i, a in enumerate(ordered):
        peers = hosts[_host(a)]
        own_first = len({(visible.get(p) or "").split(",")[0] for p in peers}) == len(peers)
        local = peers.index(a)
        gpu = 0 if own_first else local
        ranks.append(Rank(i, len(ordered), local, len(peers), master, master_port, a, gpu))
    return ranks


def _visible_devices() -> str | None:
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def free_port() -> int:
    """A free TCP port on this host (run on rank 0's worker)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def device_for(rank: Rank) -> torch.device:
    """One GPU per rank (dask-cuda puts the worker's own GPU first), else the CPU."""
    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu")
    index = rank.gpu % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


@contextmanager
def _environ(values: dict[str, str]):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _rank_main(fn, rank: Rank, timeout_s: float, args, kwargs):
    """The task each worker runs: process group lifecycle around ``fn``. The job's stop (a
    :class:`~helpers.errors.Stopped` in this thread) becomes :class:`Cancelled`, wherever it
    lands; a failure carries the rank, its worker and when it failed (``failed_at``), which the
    client uses to tell the first failure from its peers' reactions."""
    env = {
        "RANK": str(rank.rank),
        "WORLD_SIZE": str(rank.world_size),
        "LOCAL_RANK": str(rank.local_rank),
        "LOCAL_WORLD_SIZE": str(rank.local_world_size),
        "MASTER_ADDR": rank.master_addr,
        "MASTER_PORT": str(rank.master_port),
        **_gloo_interface(_host(rank.worker)),
    }
    try:
        with _environ(env), rankctl.registered(rank.job):
            return _in_group(fn, rank, timedelta(seconds=timeout_s), args, kwargs)
    except Stopped:  # the job's stop switch: a plain error, the task ends cleanly
        raise Cancelled(f"{rank.job}: rank {rank.rank} stopped") from None
    except Exception as err:
        err.failed_at, err.rank = getattr(err, "failed_at", time.time()), rank.rank
        if hasattr(err, "add_note"):  # Python 3.11+
            err.add_note(f"raised by DDP rank {rank.rank} on worker {rank.worker}")
        raise


def _in_group(fn, rank: Rank, timeout: timedelta, args, kwargs):
    """``fn`` inside a process group: NCCL on the rank's GPU, else gloo."""
    import torch
    import torch.distributed as dist

    store = _store(rank, timeout)
    device = device_for(rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if rank.rank == 0:
        where = f"{rank.master_addr}:{rank.master_port}"
        log.info("DDP: %d ranks, backend %s, master %s", rank.world_size, backend, where)
    try:
        dist.init_process_group(
            backend,
            store=store,
            rank=rank.rank,
            world_size=rank.world_size,
            timeout=timeout,
            device_id=device if device.type == "cuda" else None,
        )
        return fn(*args, rank=rank, device=device, **kwargs)
    except Exception as err:
        err.failed_at = time.time()  # now, before the cleanup: peers react to it after
        raise
    finally:
        rankctl.release(rank.job)  # no stop may interrupt the cleanup below
        if dist.is_initialized():
            # Destroying the group closes its sockets: peers blocked in a collective fail fast
            # instead of waiting out the timeout.
            dist.destroy_process_group()
        else:  # stopped or failed inside init_process_group
            _forget_group_names()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _forget_group_names() -> None:
    """Undo what an unfinished ``init_process_group`` left behind in this worker: torch names
    each new group by a per-process counter that it advances at the start of the call and resets
    only in ``destroy_process_group``, which needs a finished group. A rank stopped mid-init
    would otherwise leave its worker one name ahead, and the worker's next job would wait for
    its peers under a store prefix they never write to (a timeout, not an error)."""
    from torch.distributed import distributed_c10d as c10d

    if hasattr(c10d, "_world") and hasattr(c10d._world, "group_count"):
        c10d._world.group_count = 0


def _store(rank: Rank, timeout: timedelta):
    """The rendezvous store. torch's own TCPStore listens on every interface; rank 0's listens
    on the master's address only, from a socket bound here (the store owns and closes it)."""
    import torch.distributed as dist

    fd = None
    if rank.rank == 0:
        fd = socket.create_server((rank.master_addr, rank.master_port), backlog=128).detach()
    try:
        return dist.TCPStore(
            rank.master_addr,
            rank.master_port,
            rank.world_size,
            fd is not None,
            timeout,
            use_libuv=False,
            master_listen_fd=fd,
        )
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise


def _gloo_interface(host: str) -> dict[str, str]:
    """``GLOO_SOCKET_IFNAME`` for the interface holding ``host`` (gloo otherwise listens on
    the address the machine's hostname resolves to); unset where the environment says."""
    import psutil

    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return {}
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == host for a in addrs):
            return {"GLOO_SOCKET_IFNAME": name}
    return {}


def run(
    client: Client,
    fn: Callable,
    *args,
    timeout_s: float = 300.0,
    lock_timeout_s: float | None = 600.0,
    job: jobs.Job | None = None,
    **kwargs,
) -> list:
    """Run ``fn(*args, rank=Rank, device=torch.device, **kwargs)`` as one DDP rank per worker.

    Returns each rank's result, in rank order; raises the failing rank's own exception (with a
    note naming the rank). ``timeout_s`` bounds every collective and the rendezvous: long enough
    for rank 0 to upload a checkpoint while the others wait (a failing rank or a dead worker is
    reported within seconds regardless). ``lock_timeout_s``: how long to wait for another job on
    the same cluster. An interrupt (KeyboardInterrupt) stops every rank before it propagates.

    The job's own settings come from the config among ``args`` (a :class:`JobConfig`, such as
    :class:`~helpers.config.TrainConfig`), so the same call behaves the same anywhere:
    ``hang_s``, a rank that has called :func:`helpers.jobs.rankctl.beat` and then goes that long
    without it is hung (0: never checked); ``max_restarts``, after a lost worker, a hung rank or
    storage that stayed away, wait (``restart_wait_s``) for as many workers as before (the world
    size never changes), plan the ranks afresh and run ``fn`` again with ``rank.attempt`` one
    higher, each restart a record in ``job.restarts`` and on ``topic``. Without such a config:
    no restarts, no hang check.
    """
    from distributed import Lock

    settings = next((a for a in args if isinstance(a, JobConfig)), JobConfig(hang_s=0.0))
    name = f"ddp-{getattr(fn, '__name__', 'fn')}-{uuid.uuid4().hex[:8]}"
    launch = _Launch(client, fn, args, kwargs, settings, timeout_s, job or jobs.Job(), name)
    check_workers(client)  # a worker that cannot run a rank fails here, in seconds
    lock = Lock(LOCK, scheduler_rpc=client.scheduler, loop=client.loop)
    if not lock.acquire(timeout=lock_timeout_s):
        raise ClusterBusy(
            f"another DDP job held the cluster for {lock_timeout_s} s "
            "(lock_timeout_s); wait for it or cancel it"
        )
    try:
        jobs.wait_for_older_ranks(client, lock_timeout_s)
        return launch.attempts()
    except KeyboardInterrupt:
        launch.job.stop.set()  # the attempt's supervisor stopped the ranks on its way out
        raise
    finally:
        if not jobs.scheduler_lost(client, ""):  # else the lock went with the scheduler
            lock.release()


def start(client: Client, fn: Callable, *args, **kwargs) -> jobs.Job:
    """:func:`run` in a background thread: returns a :class:`helpers.jobs.control.Job`.

    The notebook keeps drawing live plots while the job runs; ``.result()`` gives what
    :func:`run` returns (or raises its error); ``.cancel()`` stops every rank.
    """
    job = jobs.Job()

    def work():
        try:
            job.future.set_result(run(client, fn, *args, job=job, **kwargs))
        except BaseException as err:  # noqa: BLE001 - handed to whoever waits on the job
            job.future.set_exception(err)

    job.future.set_running_or_notify_cancel()
    threading.Thread(target=work, name="ddp-job", daemon=True).start()
    return job


@dataclass
class _Launch:
    """One job: what each of its attempts runs (``fn`` with its arguments), with which settings,
    and the :class:`~helpers.jobs.control.Job` that watches it."""

    client: Client
    fn: Callable
    args: tuple
    kwargs: dict
    settings: JobConfig
    timeout_s: float
    job: jobs.Job
    name: str

    def attempts(self) -> list:
        """Attempts until one succeeds, or fails in a way a restart cannot fix, or none is left."""
        client, settings = self.client, self.settings
        workers, previous = list(client.scheduler_info(n_workers=-1)["workers"]), None
        if not workers:
            raise ClusterError("the Dask cluster has no workers; wait for them or scale it up")
        for attempt in range(settings.max_restarts + 1):
            try:
                return self.attempt(attempt, workers)
            except Exception as err:  # noqa: BLE001 - the cause decides: restart or raise
                if getattr(err, "stacks", None):  # where a hung job was: on the monitor too
                    record = {"kind": "stacks", "error": f"{type(err).__name__}: {err}",
                              "stacks": err.stacks, "time": time.time()}  # fmt: skip
                    client.log_event(settings.topic, record)
                cause = jobs.restart_cause(err, previous)
                if cause is None or attempt == settings.max_restarts or self.job.stop.is_set():
                    raise
                previous, began = err, time.monotonic()
                if cause == "terminated":  # the worker told to stop is still going away
                    jobs.wait_for_leavers(client, settings.restart_wait_s)
                workers = jobs.wait_for_workers(client, len(workers), settings.restart_wait_s)
                self.restarted(attempt + 1, cause, err, time.monotonic() - began)
        raise AssertionError("unreachable")

    def restarted(self, attempt: int, cause: str, err: BaseException, waited_s: float) -> None:
        record = {
            "kind": "restart",
            "attempt": attempt,
            "cause": cause,
            "error": f"{type(err).__name__}: {err}",
            "time": time.time(),
            "waited_s": waited_s,
        }
        log.warning(
            "%s: restart %d of %d (%s): %s",
            self.name,
            attempt,
            self.settings.max_restarts,
            cause,
            record["error"],
        )
        self.job.restarts.append(record)
        self.client.log_event(self.settings.topic, record)

    def attempt(self, attempt: int, workers: list[str]) -> list:
        """One attempt: ranks planned on ``workers``, submitted, supervised."""
        client, name = self.client, f"{self.name}-a{attempt}"
        master = sorted(workers, key=lambda a: (_host(a), a))[0]
        port = client.submit(free_port, workers=[master], pure=False).result(timeout=30)
        ranks = [
            replace(r, job=name, attempt=attempt, restarts=tuple(self.job.restarts))
            for r in plan(workers, port, client.run(_visible_devices, workers=workers))
        ]
        client.run(rankctl.watch_sigterm, workers=workers, on_error="return")  # then checkpoint
        client.register_plugin(rankctl.RankGuard())  # a closing worker: checkpoint, then go
        futures = [
            client.submit(
                _rank_main,
                self.fn,
                r,
                self.timeout_s,
                self.args,
                self.kwargs,
                key=f"{name}-rank{r.rank}",
                workers=[r.worker],
                allow_other_workers=False,
                pure=False,
                retries=0,
            )
            for r in ranks
        ]
        hosts = len({_host(w) for w in workers})
        log.info("%s: %d ranks on %d hosts", name, len(ranks), hosts)
        return jobs.supervise(client, name, ranks, futures, self.job.stop, self.settings.hang_s)
