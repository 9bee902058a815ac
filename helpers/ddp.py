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
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from helpers.cluster import check_workers

if TYPE_CHECKING:  # names for annotations only: importing costs nothing at run time
    from concurrent.futures import Future

    import torch
    from distributed import Client

log = logging.getLogger(__name__)

LOCK = "helpers.ddp.job"  # one DDP job at a time per cluster: ranks share the workers' threads
# Errors a rank raises because *another* rank failed: reported only if nothing better exists.
SECONDARY = (
    "connection closed",
    "connection reset",
    "broken pipe",
    "process group",
    "distbackenderror",
    "gloo",
    "nccl",
    "timed out",
    "peer",
)


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
    }
    with _environ(env):
        device = device_for(rank)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if rank.rank == 0:
            log.info(
                "DDP: %d ranks, backend %s, master %s:%d",
                rank.world_size,
                backend,
                rank.master_addr,
                rank.master_port,
            )
        dist.init_process_group(
            backend,
            rank=rank.rank,
            world_size=rank.world_size,
            timeout=timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
        try:
            return fn(*args, rank=rank, device=device, **kwargs)
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


def run(
    client: Client,
    fn: Callable,
    *args,
    timeout_s: float = 300.0,
    lock_timeout_s: float | None = 600.0,
    **kwargs,
) -> list:
    """Run ``fn(*args, rank=Rank, device=torch.device, **kwargs)`` as one DDP rank per worker.

    Returns each rank's result, in rank order. ``timeout_s`` bounds every collective and the
    rendezvous: long enough for rank 0 to upload a checkpoint while the others wait (a failing
    rank or a dead worker is reported within seconds regardless). ``lock_timeout_s``: how long
    to wait for another job on the same cluster. Raises the failing rank's own exception (with
    a note naming the rank).
    """
    from distributed import Lock

    check_workers(client)  # a worker that cannot run a rank fails here, in seconds
    lock = Lock(LOCK, scheduler_rpc=client.scheduler, loop=client.loop)
    if not lock.acquire(timeout=lock_timeout_s):
        raise TimeoutError(
            f"another DDP job held the cluster for {lock_timeout_s} s "
            "(lock_timeout_s); wait for it or cancel it"
        )
    try:
        return _run_locked(client, fn, args, kwargs, timeout_s)
    finally:
        lock.release()


def start(client: Client, fn: Callable, *args, timeout_s: float = 300.0, **kwargs) -> Future:
    """:func:`run` in a background thread: returns a ``concurrent.futures.Future``.

    The notebook keeps drawing live plots while the job runs; ``.result()`` gives what
    :func:`run` returns (or raises its error).
    """
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(1, thread_name_prefix="ddp-job")
    future = pool.submit(run, client, fn, *args, timeout_s=timeout_s, **kwargs)
    pool.shutdown(wait=False)
    return future


def _run_locked(client, fn, args, kwargs, timeout_s):
    workers = list(client.scheduler_info(n_workers=-1)["workers"])
    if not workers:
        raise RuntimeError("the Dask cluster has no workers; wait for them or scale it up")
    port = client.submit(
        free_port, workers=[sorted(workers, key=lambda a: (_host(a), a))[0]], pure=False
    ).result(timeout=30)
    ranks = plan(workers, port, client.run(_visible_devices, workers=workers))
    job = f"ddp-{getattr(fn, '__name__', 'fn')}-{uuid.uuid4().hex[:8]}"
    futures = [
        client.submit(
            _rank_main,
            fn,
            r,
            timeout_s,
            args,
            kwargs,
            key=f"{job}-rank{r.rank}",
            workers=[r.worker],
            allow_other_workers=False,
            pure=False,
            retries=0,
        )
        for r in ranks
    ]
    log.info("%s: %d ranks on %d hosts", job, len(ranks), len({_host(w) for w in workers}))
    try:
        checked = time.monotonic()
        while True:
            if any(f.status == "error" for f in futures):
                time.sleep(0.5)  # let peers' secondary errors land, then pick the real one
                _check_alive(client, ranks)  # a dead worker explains its peers' errors
                raise _primary_error([f for f in futures if f.status == "error"], futures)
            if all(f.status == "finished" for f in futures):
                return [f.result() for f in futures]
            if any(f.status == "cancelled" for f in futures):
                raise RuntimeError(f"{job} was cancelled")
            if time.monotonic() - checked > 1.0:
                _check_alive(client, ranks)
                checked = time.monotonic()
            time.sleep(0.1)
    finally:
        client.cancel([f for f in futures if not f.done()], force=True)


def _check_alive(client, ranks: list[Rank]) -> None:
    alive = set(client.nthreads())  # light: addresses only, not every worker's metrics
    for r in ranks:
        if r.worker not in alive:
            raise RuntimeError(
                f"DDP rank {r.rank}: its worker {r.worker} died (out of memory, "
                "killed?); the job is cancelled"
            )


def _primary_error(failed, futures) -> BaseException:
    """The failing rank's own error, not a peer's reaction to it."""

    def secondary(f):
        text = f"{type(f.exception()).__name__} {f.exception()}".lower()
        return any(s in text for s in SECONDARY)

    failed.sort(key=lambda f: (secondary(f), futures.index(f)))
    err = failed[0].exception()
    log.error("DDP rank %d failed: %r", futures.index(failed[0]), err)
    return err
