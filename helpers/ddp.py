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

from helpers import job as jobs
from helpers import rankctl
from helpers.cluster import check_workers

if TYPE_CHECKING:  # names for annotations only: importing costs nothing at run time
    import torch
    from distributed import Client

log = logging.getLogger(__name__)

LOCK = "helpers.ddp.job"  # one DDP job at a time per cluster: ranks share the workers' threads


@dataclass(frozen=True)
class Rank:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    worker: str
    gpu: int = 0  # index among the GPUs this worker sees (when it has any)
    job: str = ""  # the attempt's unique name: task keys, the stop switch, the heartbeat
    attempt: int = 0  # 0, then 1, 2... after automatic restarts: resume from the checkpoint
    restarts: tuple = ()  # the records of the restarts so far (cause, error, time)


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
    """The task each worker runs: process group lifecycle around ``fn``."""
    import torch
    import torch.distributed as dist

    env = {
        "RANK": str(rank.rank),
        "WORLD_SIZE": str(rank.world_size),
        "LOCAL_RANK": str(rank.local_rank),
        "LOCAL_WORLD_SIZE": str(rank.local_world_size),
        "MASTER_ADDR": rank.master_addr,
        "MASTER_PORT": str(rank.master_port),
        **_gloo_interface(_host(rank.worker)),
    }
    timeout = timedelta(seconds=timeout_s)
    with _environ(env), rankctl.registered(rank.job):
        store = _store(rank, timeout)
        device = device_for(rank)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if rank.rank == 0:
            log.info("DDP: %d ranks, backend %s, master %s:%d", rank.world_size, backend,
                     rank.master_addr, rank.master_port)  # fmt: skip
        dist.init_process_group(backend, store=store, rank=rank.rank, world_size=rank.world_size,
                                timeout=timeout,
                                device_id=device if device.type == "cuda" else None)  # fmt: skip
        try:
            return fn(*args, rank=rank, device=device, **kwargs)
        except rankctl.Stopped:  # the job's stop switch: a plain error, the task ends cleanly
            raise rankctl.Cancelled(f"{rank.job}: rank {rank.rank} stopped") from None
        except BaseException as err:
            if hasattr(err, "add_note"):
                err.add_note(f"raised by DDP rank {rank.rank} on worker {rank.worker}")
            raise
        finally:
            # Destroying the group closes its sockets: peers blocked in a collective fail fast
            # instead of waiting out the timeout.
            dist.destroy_process_group()
            if device.type == "cuda":
                torch.cuda.empty_cache()


def _store(rank: Rank, timeout: timedelta):
    """The rendezvous store. torch's own TCPStore listens on every interface; rank 0's listens
    on the master's address only, from a socket bound here (the store owns and closes it)."""
    import torch.distributed as dist

    fd = None
    if rank.rank == 0:
        fd = socket.create_server((rank.master_addr, rank.master_port), backlog=128).detach()
    try:
        return dist.TCPStore(rank.master_addr, rank.master_port, rank.world_size, fd is not None,
                             timeout, use_libuv=False, master_listen_fd=fd)  # fmt: skip
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
    max_restarts: int = 0,
    hang_s: float = 0.0,
    restart_wait_s: float = 120.0,
    topic: str = "",
    job: jobs.Job | None = None,
    **kwargs,
) -> list:
    """Run ``fn(*args, rank=Rank, device=torch.device, **kwargs)`` as one DDP rank per worker.

    Returns each rank's result, in rank order. ``timeout_s`` bounds every collective and the
    rendezvous: long enough for rank 0 to upload a checkpoint while the others wait (a failing
    rank or a dead worker is reported within seconds regardless). ``lock_timeout_s``: how long
    to wait for another job on the same cluster. Raises the failing rank's own exception (with
    a note naming the rank). ``hang_s``: a rank that has called :func:`helpers.rankctl.beat`
    and then goes that long without it is hung (0: never checked). ``max_restarts``: after a
    lost worker, a hung rank or storage that stayed away, wait (``restart_wait_s``) for as many
    workers as before (the world size never changes), plan the ranks afresh and run ``fn``
    again with ``rank.attempt`` one higher; each restart is a record in ``job.restarts`` and
    on ``topic``. An interrupt (KeyboardInterrupt) stops every rank before it propagates.
    """
    from distributed import Lock

    job = job or jobs.Job()
    check_workers(client)  # a worker that cannot run a rank fails here, in seconds
    lock = Lock(LOCK, scheduler_rpc=client.scheduler, loop=client.loop)
    if not lock.acquire(timeout=lock_timeout_s):
        raise TimeoutError(
            f"another DDP job held the cluster for {lock_timeout_s} s "
            "(lock_timeout_s); wait for it or cancel it"
        )
    try:
        return _attempts(client, fn, args, kwargs, job, timeout_s, max_restarts, hang_s,
                         restart_wait_s, topic)  # fmt: skip
    except KeyboardInterrupt:
        job.stop.set()  # the attempt's supervisor stopped the ranks on its way out
        raise
    finally:
        if not jobs.scheduler_lost(client, ""):  # else the lock went with the scheduler
            lock.release()


def start(client: Client, fn: Callable, *args, **kwargs) -> jobs.Job:
    """:func:`run` in a background thread: returns a :class:`helpers.job.Job`.

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


def _attempts(client, fn, args, kwargs, job, timeout_s, max_restarts, hang_s, wait_s, topic):
    name = f"ddp-{getattr(fn, '__name__', 'fn')}-{uuid.uuid4().hex[:8]}"
    workers, previous = list(client.scheduler_info(n_workers=-1)["workers"]), None
    if not workers:
        raise RuntimeError("the Dask cluster has no workers; wait for them or scale it up")
    for attempt in range(max_restarts + 1):
        try:
            return _attempt(client, fn, args, kwargs, f"{name}-a{attempt}", attempt, workers,
                            timeout_s, hang_s, job.stop, job.restarts)  # fmt: skip
        except Exception as err:  # noqa: BLE001 - the cause decides: restart or raise
            cause = jobs.restart_cause(err, previous)
            if cause is None or attempt == max_restarts or job.stop.is_set():
                raise
            previous, began = err, time.monotonic()
            if cause == "terminated":  # the worker told to stop is still going away
                jobs.wait_for_leavers(client, wait_s)
            workers = jobs.wait_for_workers(client, len(workers), wait_s)
            record = {"kind": "restart", "attempt": attempt + 1, "cause": cause,
                      "error": f"{type(err).__name__}: {err}", "time": time.time(),
                      "waited_s": time.monotonic() - began}  # fmt: skip
            log.warning("%s: restart %d of %d (%s): %s", name, attempt + 1, max_restarts,
                        cause, record["error"])  # fmt: skip
            job.restarts.append(record)
            if topic:
                client.log_event(topic, record)
    raise AssertionError("unreachable")


def _attempt(client, fn, args, kwargs, name, attempt, workers, timeout_s, hang_s, stop, restarts):
    master = sorted(workers, key=lambda a: (_host(a), a))[0]
    port = client.submit(free_port, workers=[master], pure=False).result(timeout=30)
    ranks = [
        replace(r, job=name, attempt=attempt, restarts=tuple(restarts))
        for r in plan(workers, port, client.run(_visible_devices, workers=workers))
    ]
    client.run(rankctl.watch_sigterm, workers=workers, on_error="return")  # then checkpoint
    futures = [
        client.submit(_rank_main, fn, r, timeout_s, args, kwargs, key=f"{name}-rank{r.rank}",
                      workers=[r.worker], allow_other_workers=False, pure=False, retries=0)
        for r in ranks
    ]  # fmt: skip
    log.info("%s: %d ranks on %d hosts", name, len(ranks), len({_host(w) for w in workers}))
    return jobs.supervise(client, name, ranks, futures, stop, hang_s)
