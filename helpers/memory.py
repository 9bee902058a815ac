"""What one rank holds while it trains, measured on the workers: DDP against FSDP (notebook 07).

A short training job (:func:`measure`) runs on freshly restarted workers, so each process's peak
is this job's own; every rank returns, in its epoch record, the bytes of the parameters,
gradients and optimizer state it holds (counted on its tensors, not from a formula), its peak
memory (its process's resident set on a CPU, the CUDA allocator's on a GPU), and the median time
of its steps. :func:`per_rank` turns those records into rows, in MiB.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from helpers import ddp, train

if TYPE_CHECKING:
    from distributed import Client

    from helpers.config import TrainConfig

log = logging.getLogger(__name__)

MIB = 2**20
STATE = ("param_bytes", "grad_bytes", "optim_bytes")
RESTART_S = 120  # seconds for the workers to come back


def measure(client: Client, cfg: TrainConfig, options: dict | None) -> list[dict]:
    """Train ``cfg`` (keep it short: ``max_steps``) on every worker, restarted first so each
    peak is this job's; returns each rank's last epoch record (see :func:`per_rank`). A worker
    that goes over its memory limit raises :class:`~helpers.errors.WorkerLost` naming it."""
    n = _workers_meant(client)
    client.wait_for_workers(n, timeout=RESTART_S)  # one a nanny is still bringing back, too
    with _quiet("distributed.nanny"):  # each worker's "Restarting worker" warning
        client.restart(wait_for_workers=True, timeout=RESTART_S)
    client.wait_for_workers(n, timeout=RESTART_S)
    log.info("measuring %s (%s) on %d fresh workers", cfg.arch, cfg.strategy, n)
    history = ddp.run(client, train.train_rank, cfg, options)
    return [ranks[-1] | {"strategy": cfg.strategy, "arch": cfg.arch} for ranks in history]


def _workers_meant(client: Client) -> int:
    """How many workers the cluster should have: a local cluster's spec (a worker its nanny is
    restarting counts), else those connected now."""
    spec = getattr(getattr(client, "cluster", None), "worker_spec", None)
    return len(spec) if spec else len(client.scheduler_info()["workers"])


@contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """``logger`` (of this process: a local cluster's nannies live here) at ERROR meanwhile."""
    log_ = logging.getLogger(logger)
    level = log_.level
    log_.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log_.setLevel(level)


def per_rank(records: list[dict]) -> list[dict]:
    """One row per rank: the training state it holds and its peak, in MiB, and its median step."""
    rows = []
    for r in records:
        state = {k.removesuffix("_bytes") + "_mib": r[k] / MIB for k in STATE}
        rows.append({
            "strategy": r["strategy"], "arch": r["arch"], "rank": r["rank"], **state,
            "state_mib": sum(state.values()), "peak_mib": r["peak_bytes"] / MIB,
            "peak_of": r["peak_of"], "median_step_s": r["median_step_s"],
        })  # fmt: skip
    return rows
