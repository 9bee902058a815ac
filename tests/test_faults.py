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


# --- S3: transient failures retried and counted, permanent ones at once -----------------------


def _through(proxy, options):
    return {**options, "endpoint_url": proxy.url}


def _read_all(url, options, keys):
    from helpers import objects

    ds = objects.S3ImageDataset(url, keys, ["x"], options, on_error="raise")
    return ds.samples(list(range(len(keys))))


@pytest.mark.parametrize("kind", ["503", "reset"])
def test_throttling_and_resets_are_retried_and_counted(dogs, kind):
    from helpers import storage
    from helpers.s3proxy import Faults, S3Proxy

    url, options, manifest = dogs
    keys = manifest.keys[:12]
    with S3Proxy(options["endpoint_url"], Faults(kind, rate=0.3, seed=1)) as proxy:
        before = storage.retries()
        got = _read_all(url, _through(proxy, options), keys)
        faults = proxy.counts()["faults"].get(kind, 0)
    assert len(got) == len(keys)  # every image, despite the faults
    assert faults > 0  # the faults happened
    # Every 503 is retried by storage's loop and counted. Some resets are re-sent below it
    # (a reset kept-alive connection is reopened by the HTTP client), so at least one counts.
    assert storage.retries() - before >= (faults if kind == "503" else 1)


def test_a_server_that_went_away_and_came_back_is_waited_for(dogs, tmp_path):
    """The proxy's upstream goes dark for 3 s (requests fail: connection refused upstream,
    the connection closed without an answer), then answers again."""
    from helpers import storage
    from helpers.s3proxy import S3Proxy

    url, options, manifest = dogs
    with S3Proxy(options["endpoint_url"]) as proxy:
        real, proxy.upstream = proxy.upstream, ("127.0.0.1", storage_free_port())
        threading.Timer(3.0, setattr, (proxy, "upstream", real)).start()
        before, began = storage.retries(), time.monotonic()
        got = _read_all(url, _through(proxy, options), manifest.keys[:4])
    assert len(got) == 4 and storage.retries() > before
    assert 2.5 < time.monotonic() - began < 30


def storage_free_port():
    from helpers.s3server import free_ports

    return free_ports(1)[0]


def test_a_server_that_stays_away_fails_naming_the_endpoint(dogs, monkeypatch):
    from helpers import storage
    from helpers.s3proxy import S3Proxy

    monkeypatch.setattr(storage, "RETRY_WINDOW_S", 2.0)
    url, options, manifest = dogs
    with S3Proxy(options["endpoint_url"]) as proxy:
        proxy.upstream = ("127.0.0.1", storage_free_port())
        began = time.monotonic()
        with pytest.raises(storage.StorageUnavailable, match=f"at {proxy.url} kept failing"):
            _read_all(url, _through(proxy, options), manifest.keys[:2])
    assert time.monotonic() - began < 20


def test_missing_keys_and_buckets_fail_at_once_without_retries(dogs):
    from helpers import storage
    from helpers.transforms import BadImageError

    url, options, manifest = dogs
    before, began = storage.retries(), time.monotonic()
    with pytest.raises(BadImageError, match="listed but missing"):
        _read_all(url, options, ["Images/nope/missing.jpg"])
    with pytest.raises((storage.StorageError, BadImageError), match="missing|does not exist"):
        _read_all("s3://no-such-bucket-here/x", options, ["a.jpg"])
    assert storage.retries() == before and time.monotonic() - began < 10
