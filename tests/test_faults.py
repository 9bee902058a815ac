"""Faults a cluster meets, injected on loopback: a stopped cell, lost workers, hung ranks, S3
that throttles or goes away, a kill during a checkpoint write. Every test checks that its fault
really happened; time limits are generous liveness bounds, not speed targets."""

import _thread
import sys
import threading
import time

import cloudpickle
import pytest

from helpers import ddp, monitor, rankctl
from helpers.cluster import make_client

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client():
    with make_client("local", n_workers=2) as c:
        yield c


def _steps_and_a_blocked_peer(seconds_per_step, *, rank, device):
    """Rank 0 takes long steps (Python between them, or one C call), rank 1 waits for it in a
    collective that never comes."""
    import torch
    import torch.distributed as dist

    if rank.rank == 1:
        dist.all_reduce(torch.ones(1))
        return "unreachable"
    monitor.publish("test-cancel", {"rank": 0, "running": True})
    for _ in range(10_000):
        time.sleep(seconds_per_step)  # one C call: a stop lands only when it returns
        rankctl.beat()
    return "unreachable"


def _sum(*, rank, device):
    return rank.rank


def _stop_with_interrupt(client, seconds_per_step):
    """Follow a job in this thread as notebook 04 does, press "stop" (KeyboardInterrupt in
    the main thread) 1 s into its steps; returns the seconds from the press to a free lock."""
    from distributed import Lock

    watch = monitor.Monitor(client, "test-cancel")
    job = ddp.start(client, _steps_and_a_blocked_peer, seconds_per_step, timeout_s=120)
    pressed = []

    def press_stop():
        deadline = time.monotonic() + 120  # a loaded machine takes ~15 s to import torch
        while not watch.records and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)
        pressed.append(time.monotonic())
        _thread.interrupt_main()

    threading.Thread(target=press_stop, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        watch.follow(job, refresh_s=0.2)
    watch.close()
    assert job.done() and isinstance(job.exception(), rankctl.Cancelled)
    lock = Lock(ddp.LOCK)
    assert lock.acquire(timeout=1)  # free: the next job starts at once
    took = time.monotonic() - pressed[0]
    lock.release()
    assert ddp.run(client, _sum, lock_timeout_s=10, timeout_s=60) == [0, 1]  # the ranks too
    return took


def test_stop_button_stops_ranks_between_steps_without_restarting_workers(client):
    before = sorted(client.nthreads())
    took = _stop_with_interrupt(client, 0.05)
    assert took < 10
    assert sorted(client.nthreads()) == before  # stopped by the flag, not by a restart


def test_stop_button_ends_a_step_that_never_returns_by_restarting_its_worker(client):
    before = set(client.nthreads())
    took = _stop_with_interrupt(client, 3600.0)
    assert took < 10
    assert set(client.nthreads()) != before  # rank 0's worker process was ended and replaced
