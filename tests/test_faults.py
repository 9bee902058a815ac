"""Faults a cluster meets, injected on loopback: a stopped cell, lost workers, hung ranks, S3
that throttles or goes away, a kill during a checkpoint write. Every test checks that its fault
really happened; time limits are generous liveness bounds, not speed targets."""

import _thread
import contextlib
import logging
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
    logging.getLogger(__name__).warning("stop between steps: lock free %.1f s after", took)
    assert took < 10
    assert sorted(client.nthreads()) == before  # stopped by the flag, not by a restart


def test_stop_button_ends_a_step_that_never_returns_by_restarting_its_worker(client):
    before = set(client.nthreads())
    took = _stop_with_interrupt(client, 3600.0)
    logging.getLogger(__name__).warning("stop of a stuck step: lock free %.1f s after", took)
    assert took < 10
    assert set(client.nthreads()) != before  # rank 0's worker process was ended and replaced


def _goes_quiet(*, rank, device):
    """Three steps in step, then rank 1 deadlocks (no error, no progress) while rank 0 does a
    little more and waits for it in a collective."""
    import torch
    import torch.distributed as dist

    for _ in range(3):
        dist.all_reduce(torch.ones(1))
        rankctl.beat()
    if rank.rank == 1:
        time.sleep(3600)
    time.sleep(0.5)
    rankctl.beat()
    dist.all_reduce(torch.ones(1))


def test_a_hung_rank_is_named_within_hang_s_not_the_job_timeout(client):
    from helpers import job as jobs

    began = time.monotonic()
    with pytest.raises(jobs.RankHung, match=r"rank 1 on worker .* no progress for \d+ s"):
        ddp.run(client, _goes_quiet, hang_s=5, timeout_s=300)
    logging.getLogger(__name__).warning("hung rank named %.1f s after the job began (rank 1 "
                                        "quiet ~0.5 s in)", time.monotonic() - began)  # fmt: skip
    assert time.monotonic() - began < 120  # torch's import included; the timeout is 300 s
    jobs.wait_for_workers(client, 2, 120)  # the hung ranks' workers were replaced
    assert ddp.run(client, _sum, lock_timeout_s=10, timeout_s=60) == [0, 1]


def test_an_older_loss_of_a_worker_never_closes_its_restarting_nanny(client):
    """distributed's local cluster closes a nanny ``lost-worker-timeout`` after its worker left
    if no worker of that name is registered then: with the default 15 s, a worker ended twice
    within 15 s (the two tests above) lost its nanny for good while restarting (seen in the
    suite: 0 workers after the hung-rank test). The setting in force must outlast a session."""
    import dask
    from dask.utils import parse_timedelta

    assert parse_timedelta(dask.config.get("distributed.deploy.lost-worker-timeout")) >= 3600
    assert len(client.nthreads()) == 2 and len(client.cluster.workers) == 2  # every nanny kept


def _beating(*, rank, device):
    """A rank that makes progress for an hour, telling the notebook it started."""
    monitor.publish("test-scheduler", {"rank": rank.rank, "running": True})
    for _ in range(36_000):
        time.sleep(0.1)
        rankctl.beat()


@pytest.fixture
def own_scheduler(tmp_path):
    """A `dask scheduler` and a one-process `dask worker`, as command lines on loopback (a
    scheduler the test can SIGKILL): yields (address, scheduler process)."""
    import os
    import signal
    import subprocess
    from pathlib import Path

    from helpers.s3server import free_ports

    repo = Path(__file__).resolve().parents[1]
    # Workers import helpers; the scheduler and workers import this module, as Dask sends
    # functions of an importable module by reference.
    path = [str(repo), str(repo / "tests"), os.environ.get("PYTHONPATH")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, path))}
    env["DASK_DISTRIBUTED__WORKER__DAEMON"] = "False"  # as notebook 03 says: ranks fork loaders
    address = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    dask = [sys.executable, "-m", "dask"]
    common = dict(env=env, cwd=repo, start_new_session=True, stdin=subprocess.DEVNULL)
    port, loopback = address.rsplit(":", 1)[1], ["--host", "127.0.0.1", "--no-dashboard"]
    worker = [*dask, "worker", address, "--nworkers", "1", "--nthreads", "1", *loopback]
    procs = []
    for name, cmd in (("scheduler", [*dask, "scheduler", "--port", port, *loopback]),
                      ("worker", worker)):  # fmt: skip
        with open(tmp_path / f"{name}.log", "wb") as log:  # the process keeps its own copy
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=log, **common))
    try:
        yield address, procs[0]
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)


def test_losing_the_scheduler_ends_the_job_naming_it(own_scheduler):
    """The scheduler is SIGKILLed while a job runs: following the job (as notebook 04 does)
    raises an error that names the scheduler, within seconds; the lock is not waited for."""
    from distributed import Client

    from helpers import job as jobs

    address, scheduler = own_scheduler
    client = Client(address, timeout=60)  # long: the cell must not wait for the reconnection
    try:
        client.wait_for_workers(1, timeout=120)
        watch = monitor.Monitor(client, "test-scheduler")
        job = ddp.start(client, _beating, timeout_s=120)
        deadline = time.monotonic() + 180  # torch's import on a loaded machine
        while not watch.records and not job.done() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert watch.records, job.exception(0) if job.done() else "the rank did not start"
        scheduler.kill()
        killed = time.monotonic()
        with pytest.raises(jobs.SchedulerLost, match=f"lost the Dask scheduler at {address}"):
            watch.follow(job, refresh_s=0.2)
        took = time.monotonic() - killed
        logging.getLogger(__name__).warning("scheduler loss reported in %.1f s", took)
        assert took < 10
    finally:
        client.close(timeout=10)


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


# --- S3 faults while DDP trains: the ranks' loaders retry, the job finishes --------------------


@pytest.fixture(scope="module")
def own_s3(tmp_path_factory):
    """An S3 server of this module's own, to kill and start again, with the tiny dataset as
    objects and as shards of 4: (server, url)."""
    from helpers import prepare, s3server, shardwrite

    with s3server.EmbeddedS3(tmp_path_factory.mktemp("own-s3")) as server:
        url = "s3://dogs/faults"
        prepare.write_synthetic(url, server.storage_options, 4, 10, seed=0)
        shardwrite.write_shards(url, server.storage_options, shard_size=4)
        yield server, url


def _small_job(client, url, options, tmp_path, **kw):
    """Tiny 2-rank training (epochs of 4 steps, no checkpoints) started on ``client``, and its
    monitor once rank 0 has taken a step: setup's first contact with S3 (the manifest, the
    shard index: not retried, so a wrong endpoint fails at once) is over."""
    from helpers import train

    cfg = _train_config((url, options, None), tmp_path, checkpoint_url="", checkpoint_every=0,
                        **kw)  # fmt: skip
    watch = monitor.Monitor(client, cfg.topic)
    job = ddp.start(client, train.train_rank, cfg, options, topic=cfg.topic, timeout_s=120)
    _wait_for_step(watch, 1)
    return job, watch


def _wait_for_step(watch, step, timeout_s=180):
    deadline = time.monotonic() + timeout_s  # a loaded machine takes ~15 s to import torch
    while time.monotonic() < deadline:
        if any(r.get("kind") == "step" and r["step"] >= step for r in list(watch.records)):
            return
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout_s} s")


def _finished_with_retries(job, epochs, timeout_s=300) -> int:
    """Wait for the job; check both ranks trained every epoch, with no restart; the storage
    retries all ranks (and their loader processes) made."""
    history = job.result(timeout=timeout_s)
    assert job.restarts == []  # the retries carried it through, not a restart
    assert [[r["epoch"] for r in rank] for rank in history] == [list(range(1, epochs + 1))] * 2
    return sum(r["s3_retries"] + r["val_s3_retries"] for rank in history for r in rank)


def test_training_waits_for_an_s3_server_that_crashed_and_came_back(client, own_s3, tmp_path):
    server, url = own_s3
    # No loader processes: each step GETs its batch after the one before, so requests go on
    # from the first step to the end of the second epoch, through the outage.
    job, watch = _small_job(client, url, server.storage_options, tmp_path, loader_workers=0,
                            data_format="objects")  # fmt: skip
    server.stop(grace_s=0)  # SIGKILL: a crash, mid-epoch (rank 0 has taken a step)
    down = time.monotonic()
    try:
        time.sleep(3)
    finally:
        server.start()  # the same ports and data folder: the ranks' endpoint answers again
    back = time.monotonic()
    retries = _finished_with_retries(job, 2)
    watch.close()
    logging.getLogger(__name__).warning(
        "S3 down %.1f s (killed -> answering); %d retries; job done %.1f s after it was back",
        back - down, retries, time.monotonic() - back)  # fmt: skip
    assert retries > 0  # the outage really hit requests


# Shards through a loader process (whose retries must reach the rank's records), objects in
# the rank's own thread: one epoch each, faults from its first step on.
@pytest.mark.parametrize(("kind", "fmt", "loader_workers"),
                         [("503", "shards", 1), ("reset", "objects", 0)])  # fmt: skip
def test_training_through_throttling_and_resets_completes(
    client, own_s3, tmp_path, kind, fmt, loader_workers
):
    from helpers.s3proxy import Faults, S3Proxy

    server, url = own_s3
    with S3Proxy(server.endpoint_url) as proxy:
        options = _through(proxy, server.storage_options)
        job, watch = _small_job(client, url, options, tmp_path, epochs=1, data_format=fmt,
                                loader_workers=loader_workers)  # fmt: skip
        proxy.faults = Faults(kind, rate=0.3, seed=1)  # from now on: mid-run
        proxy.reset()  # the seeded fault sequence starts here (seed 1: the first GET fails)
        retries = _finished_with_retries(job, 1)
        watch.close()
        counts = proxy.counts()
    faults = counts["faults"].get(kind, 0)
    logging.getLogger(__name__).warning("%s %s: %d faults in %s GETs, %d retries", fmt, kind,
                                        faults, counts["requests"].get("GET"), retries)  # fmt: skip
    assert faults > 0  # the faults happened
    # Every 503 is answered, so retried and counted; a reset kept-alive connection may be
    # reopened below storage's loop by the HTTP client, so at least one counts.
    assert retries >= (faults if kind == "503" else 1)


# --- checkpoints: atomic, verified, pruned ----------------------------------------------------


def _state(epoch):
    import torch

    return {"epoch": epoch, "config": {}, "blob": torch.zeros(0)}


def test_checkpoints_are_verified_and_pruned_to_the_newest(tmp_path):
    from helpers import checkpoint

    folder = str(tmp_path / "ck")
    for epoch in range(1, 5):
        checkpoint.save(folder, None, _state(epoch), keep=2)
    names = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert len(names) == 2 and "checkpoint.pt" in names  # the newest and one before it
    assert checkpoint.load(folder)["epoch"] == 4
    raw = bytearray((tmp_path / "ck" / "checkpoint.pt").read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped bit in the middle: torch.load alone may not notice
    (tmp_path / "ck" / "checkpoint.pt").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"checkpoint\.pt is corrupt: its sha256 does not match"):
        checkpoint.load(folder)


# Checkpoints of 64 MiB written in a loop, in a fresh interpreter: a child forked from this
# process (its threads, torch's OpenMP pool already started) can deadlock before writing at all.
_SAVE_FOREVER = """
import sys, torch
from helpers import checkpoint
for epoch in range(2, 10_000):
    state = {"epoch": epoch, "config": {}, "blob": torch.zeros(64 * 2**18)}
    checkpoint.save(sys.argv[1], None, state, keep=2)
"""


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one(tmp_path):
    import os
    import subprocess
    from pathlib import Path

    from helpers import checkpoint

    folder = str(tmp_path / "ck")
    checkpoint.save(folder, None, _state(1), keep=2)
    repo = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    child = subprocess.Popen([sys.executable, "-c", _SAVE_FOREVER, folder], env=env, cwd=repo)
    deadline, partial = time.monotonic() + 60, []
    while not partial and time.monotonic() < deadline:  # a write under way: a growing .tmp
        partial = [p for p in (tmp_path / "ck").glob("*.tmp-*") if p.stat().st_size > 0]
        time.sleep(0.01)
    child.kill()  # SIGKILL: no handler, no cleanup
    child.wait(10)
    assert partial and partial[0].exists()  # killed mid-write, the partial file is still there
    state = checkpoint.load(folder)
    assert state is not None and state["epoch"] == 1  # the previous checkpoint, whole


# --- lost workers: fail naming them, or restart from the latest checkpoint ---------------------


def test_a_resumed_sampler_yields_each_remaining_index_once():
    from helpers.position import ResumableSampler

    data = list(range(40))
    whole = ResumableSampler(data, num_replicas=2, rank=1, seed=3, drop_last=True)
    whole.set_epoch(2)
    resumed = ResumableSampler(data, num_replicas=2, rank=1, seed=3, drop_last=True)
    resumed.set_epoch(2)
    resumed.skip = 8  # two batches of 4 were committed before the interruption
    assert list(whole)[:8] + list(resumed) == list(whole)  # no repeat, no gap
    resumed.set_epoch(3)
    assert resumed.skip == 0


def _train_config(dogs, tmp_path, **kw):
    from helpers.config import TrainConfig

    url, _, _ = dogs
    # No loader processes: Dask's workers spawn them, a torch import each (seconds, tens of
    # seconds on a loaded machine) at every epoch; the faults here need none.
    base = dict(data_url=url, arch="resnet18", image_size=32, batch_size=4, epochs=2,
                loader_workers=0, log_every=1, threads=1, data_format="objects", lr=0.2,
                checkpoint_url=str(tmp_path / "ck"), checkpoint_every=1)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def _kill_rank_worker_at(client, watch, rank, step, sig=None):
    """SIGKILL (or ``sig``) the worker process of ``rank`` once rank 0 has published epoch 1's
    ``step``; returns (the worker's address, the time of the kill)."""
    import os
    import signal

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if any(r.get("kind") == "step" and r["step"] >= step for r in list(watch.records)):
            break
        time.sleep(0.05)
    worker = sorted(client.nthreads())[rank]  # ranks follow the sorted addresses on one host
    os.kill(client.run(os.getpid, workers=[worker])[worker], sig or signal.SIGKILL)
    return worker, time.monotonic()


def test_a_killed_worker_fails_the_job_naming_it_without_restarts(client, dogs, tmp_path):
    """On the module's cluster: its nannies replace the killed workers for the next test."""
    from helpers import job as jobs
    from helpers import train

    _, options, _ = dogs
    cfg = _train_config(dogs, tmp_path)
    watch = monitor.Monitor(client, cfg.topic)
    job = ddp.start(client, train.train_rank, cfg, options, max_restarts=0, topic=cfg.topic)
    worker, killed = _kill_rank_worker_at(client, watch, 1, step=2)
    err = job.exception(timeout=60)
    took = time.monotonic() - killed
    logging.getLogger(__name__).warning("lost worker reported in %.1f s", took)
    jobs.wait_for_workers(client, 2, 120)  # the nanny's replacement, for the next test
    assert isinstance(err, jobs.WorkerLost) and worker in str(err) and "rank 1" in str(err)
    assert took < 10


def test_a_killed_worker_restarts_from_the_latest_checkpoint(client, dogs, tmp_path):
    from helpers import checkpoint, train

    _, options, _ = dogs
    cfg = _train_config(dogs, tmp_path)
    watch = monitor.Monitor(client, cfg.topic)
    job = ddp.start(client, train.train_rank, cfg, options, max_restarts=1, topic=cfg.topic)
    _, killed = _kill_rank_worker_at(client, watch, 1, step=2)
    history = job.result(timeout=300)
    records = list(watch.records)
    logging.getLogger(__name__).warning(
        "restarted and finished %.1f s after the kill: %s", time.monotonic() - killed,
        history[0][0])  # fmt: skip
    restart, *epochs = history[0]
    assert restart["kind"] == "restart" and restart["cause"] == "worker lost"
    assert job.restarts == [restart] and any(r.get("kind") == "restart" for r in records)
    shown = [monitor.restart_line(r) for r in watch.restarts()]  # what notebook 04's plot says
    assert len(shown) == 1 and shown[0].startswith("restart 1 (worker lost) at epoch 0."), shown
    assert [e["epoch"] for e in epochs] == [1, 2]
    resumed = epochs[0]  # the interrupted epoch, from its last committed step
    steps = 32 // (2 * 4)  # 32 training images, 2 ranks, batches of 4
    assert 1 <= resumed["first_step"] < steps  # the last checkpoint may lag the kill a step
    assert resumed["train_images"] == (steps - resumed["first_step"]) * 4  # the rest, once
    assert epochs[1]["first_step"] == 0 and epochs[1]["train_images"] == steps * 4
    assert checkpoint.load(cfg.checkpoint_url, options)["epoch"] == 2


def test_the_cache_notices_a_changed_object_by_its_listed_etag(s3, tmp_path):
    from helpers import objects, storage

    options, url = s3.storage_options, "s3://dogs/changing"
    fs = storage.filesystem(url, options)
    key = "Images/n0-a/x.jpg"
    fs.pipe_file(f"dogs/changing/{key}", b"first")
    cached = objects.S3ImageDataset(url, [key], ["n0-a"], options, cache_dir=str(tmp_path))
    assert cached._fetch([f"dogs/changing/{key}"])[f"dogs/changing/{key}"] == b"first"
    fs.pipe_file(f"dogs/changing/{key}", b"second, longer")
    again = objects.S3ImageDataset(url, [key], ["n0-a"], options, cache_dir=str(tmp_path))
    assert again._fetch([f"dogs/changing/{key}"])[f"dogs/changing/{key}"] == b"second, longer"


def test_a_worker_told_to_stop_checkpoints_first_and_the_job_resumes_there(client, dogs, tmp_path):
    import signal

    from helpers import train

    _, options, _ = dogs
    cfg = _train_config(dogs, tmp_path, checkpoint_every=0)  # only the SIGTERM checkpoint
    watch = monitor.Monitor(client, cfg.topic)
    job = ddp.start(client, train.train_rank, cfg, options, max_restarts=1, topic=cfg.topic)
    _, told = _kill_rank_worker_at(client, watch, 1, step=2, sig=signal.SIGTERM)
    history = job.result(timeout=300)
    logging.getLogger(__name__).warning(
        "SIGTERM: finished %.1f s after the signal: %s", time.monotonic() - told, history[0][0]
    )
    restart, first, _ = history[0]
    assert restart["cause"] == "terminated" and "checkpointed" in restart["error"]
    assert first["epoch"] == 1 and first["first_step"] >= 2  # resumed where it was told to stop


# --- loopback by default ---------------------------------------------------------------------


def _listening(*, rank, device):
    """The listening sockets of this worker process and its children, while the group is up."""
    import psutil

    me = psutil.Process()
    found = set()
    for p in [me, *me.children(recursive=True)]:
        for c in p.net_connections(kind="inet"):
            if c.status == psutil.CONN_LISTEN:
                found.add((p.pid, c.laddr.ip, c.laddr.port))
    return sorted(found)


def test_every_socket_a_job_listens_on_is_loopback(client):
    listening = [s for rank in ddp.run(client, _listening, timeout_s=60) for s in rank]
    assert len(listening) >= 3  # each worker, the rendezvous store, gloo's pairs
    assert {ip for _, ip, _ in listening} <= {"127.0.0.1", "::1"}, listening
