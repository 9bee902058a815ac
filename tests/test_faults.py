"""What survives what, end to end: training through S3 that throttles, resets or goes away, a
killed worker (restart from the latest checkpoint), SIGTERM, and every socket a job listens on.
Every test checks that its fault really happened; time limits are generous liveness bounds."""

import contextlib
import dataclasses
import logging
import sys
import time

import cloudpickle
import pytest

from helpers import checkpoint, ddp, monitor, prepare, train
from helpers.cluster import make_client
from helpers.config import TrainConfig
from helpers.errors import WorkerLost
from helpers.jobs import control as jobs
from helpers.s3 import server as s3server
from helpers.s3.proxy import Faults, S3Proxy
from helpers.show.lines import restart_line

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client():
    with make_client("local", n_workers=2) as c:
        yield c


@pytest.fixture(scope="module")
def own_s3(tmp_path_factory):
    """An S3 server of this module's own, to kill and start again, with the tiny dataset as
    objects and as shards of 4: (server, url)."""
    with s3server.EmbeddedS3(tmp_path_factory.mktemp("own-s3")) as server:
        url = "s3://dogs/faults"
        prepare.write_synthetic(url, server.storage_options, 4, 10, seed=0)
        prepare.write_shards(url, server.storage_options, shard_size=4)
        yield server, url


def _small_job(client, url, options, tmp_path, **kw):
    """Tiny 2-rank training (epochs of 4 steps, no checkpoints) started on ``client``, and its
    monitor once rank 0 has taken a step: setup's first contact with S3 (the manifest, the
    shard index: not retried, so a wrong endpoint fails at once) is over."""
    cfg = _train_config((url, options, None), tmp_path, checkpoint_url="", checkpoint_every=0, **kw)
    watch = monitor.Monitor(client, cfg.topic)
    job = ddp.start(client, train.train_rank, cfg, options, timeout_s=120)
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
    job, watch = _small_job(
        client, url, server.storage_options, tmp_path, loader_workers=0, data_format="objects"
    )
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
        back - down,
        retries,
        time.monotonic() - back,
    )
    assert retries > 0  # the outage really hit requests


# Shards through a loader process (whose retries must reach the rank's records), objects in
# the rank's own thread: one epoch each, faults from its first step on.
@pytest.mark.parametrize(
    ("kind", "fmt", "loader_workers"), [("503", "shards", 1), ("reset", "objects", 0)]
)
def test_training_through_throttling_and_resets_completes(
    client, own_s3, tmp_path, kind, fmt, loader_workers
):
    server, url = own_s3
    with S3Proxy(server.endpoint_url) as proxy:
        options = _through(proxy, server.storage_options)
        job, watch = _small_job(
            client, url, options, tmp_path, epochs=1, data_format=fmt, loader_workers=loader_workers
        )
        proxy.faults = Faults(kind, rate=0.3, seed=1)  # from now on: mid-run
        proxy.reset()  # the seeded fault sequence starts here (seed 1: the first GET fails)
        retries = _finished_with_retries(job, 1)
        watch.close()
        counts = proxy.counts()
    faults = counts["faults"].get(kind, 0)
    logging.getLogger(__name__).warning(
        "%s %s: %d faults in %s GETs, %d retries",
        fmt,
        kind,
        faults,
        counts["requests"].get("GET"),
        retries,
    )
    assert faults > 0  # the faults happened
    # Every 503 is answered, so retried and counted; a reset kept-alive connection may be
    # reopened below the retry loop by the HTTP client, so at least one counts.
    assert retries >= (faults if kind == "503" else 1)


def _through(proxy, options):
    return {**options, "endpoint_url": proxy.url}


def _train_config(dogs, tmp_path, **kw):
    url, _, _ = dogs
    # No loader processes: Dask's workers spawn them, a torch import each (seconds, tens of
    # seconds on a loaded machine) at every epoch; the faults here need none.
    base = dict(
        data_url=url,
        arch="resnet18",
        image_size=32,
        batch_size=4,
        epochs=2,
        loader_workers=0,
        log_every=1,
        threads=1,
        data_format="objects",
        lr=0.2,
        checkpoint_url=str(tmp_path / "ck"),
        checkpoint_every=1,
    )
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
    _, options, _ = dogs
    cfg = _train_config(dogs, tmp_path, max_restarts=0)
    watch = monitor.Monitor(client, cfg.topic)
    job = ddp.start(client, train.train_rank, cfg, options)
    worker, killed = _kill_rank_worker_at(client, watch, 1, step=2)
    err = job.exception(timeout=60)
    took = time.monotonic() - killed
    logging.getLogger(__name__).warning("lost worker reported in %.1f s", took)
    jobs.wait_for_workers(client, 2, 120)  # the nanny's replacement, for the next test
    assert isinstance(err, WorkerLost) and worker in str(err) and "rank 1" in str(err)
    assert took < 10


def test_a_killed_worker_restarts_from_the_latest_checkpoint(client, dogs, tmp_path):
    """One way in: ``max_restarts=1`` in the config is what the launcher obeys, with the call
    a notebook and a script make alike. The monitor's TensorBoard run, read back with
    TensorBoard's own reader, holds the job's history: its epochs, its steps, its restart."""
    _, options, _ = dogs
    cfg = _train_config(dogs, tmp_path, max_restarts=1)
    watch = monitor.Monitor(client, cfg.topic, tmp_path / "runs" / "job", cfg)
    job = ddp.start(client, train.train_rank, cfg, options)
    _, killed = _kill_rank_worker_at(client, watch, 1, step=2)
    history = job.result(timeout=300)
    records = list(watch.records)
    watch.close()
    logging.getLogger(__name__).warning(
        "restarted and finished %.1f s after the kill: %s", time.monotonic() - killed, history[0][0]
    )
    restart, *epochs = history[0]
    assert restart["kind"] == "restart" and restart["cause"] == "worker lost"
    assert job.restarts == [restart] and any(r.get("kind") == "restart" for r in records)
    shown = [restart_line(r) for r in watch.restarts()]  # what notebook 04's plot says
    assert len(shown) == 1 and shown[0].startswith("restart 1 (worker lost) at epoch 0."), shown
    assert [e["epoch"] for e in epochs] == [1, 2]
    resumed = epochs[0]  # the interrupted epoch, from its last committed step
    steps = 32 // (2 * 4)  # 32 training images, 2 ranks, batches of 4
    assert 1 <= resumed["first_step"] < steps  # the last checkpoint may lag the kill a step
    assert resumed["train_images"] == (steps - resumed["first_step"]) * 4  # the rest, once
    assert epochs[1]["first_step"] == 0 and epochs[1]["train_images"] == steps * 4
    assert checkpoint.load(cfg.checkpoint_url, options)["epoch"] == 2
    _the_tensorboard_run_is_the_history(tmp_path / "runs" / "job", epochs, records, restart)


def _the_tensorboard_run_is_the_history(folder, epochs, records, restart):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sizes = {"scalars": 0, "tensors": 0}  # everything, and the steps a restart repeats too
    events = EventAccumulator(str(folder), size_guidance=sizes, purge_orphaned_data=False)
    events.Reload()
    for key in ("val_top1", "val_loss", "train_loss"):
        written = [(e.step, e.value) for e in events.Scalars(f"epoch/{key}")]
        assert written == [(e["epoch"], pytest.approx(e[key], rel=1e-6)) for e in epochs], key
    steps = [r for r in records if r.get("kind") == "step" and r["rank"] == 0]
    written = [e.value for e in events.Scalars("train/loss")]
    assert written == [pytest.approx(r["loss"], rel=1e-6) for r in steps]
    (cause,) = events.Tensors("restarts/cause/text_summary")
    assert restart_line(restart, width=1000) in cause.tensor_proto.string_val[0].decode()
    config = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| max_restarts | 1 |" in config


def test_a_worker_told_to_stop_checkpoints_first_and_the_job_resumes_there(client, dogs, tmp_path):
    import signal

    _, options, _ = dogs
    cfg = _train_config(dogs, tmp_path, checkpoint_every=0, max_restarts=1)  # SIGTERM's only
    watch = monitor.Monitor(client, cfg.topic)
    job = ddp.start(client, train.train_rank, cfg, options)
    _, told = _kill_rank_worker_at(client, watch, 1, step=2, sig=signal.SIGTERM)
    history = job.result(timeout=300)
    logging.getLogger(__name__).warning(
        "SIGTERM: finished %.1f s after the signal: %s", time.monotonic() - told, history[0][0]
    )
    restart, first, _ = history[0]
    assert restart["cause"] == "terminated" and "checkpointed in" in restart["error"]
    assert first["epoch"] == 1 and first["first_step"] >= 2  # resumed where it was told to stop


@contextlib.contextmanager
def _command_line_cluster(tmp_path, nanny: bool):
    """A `dask scheduler` and one `dask worker` (with or without its nanny), as command lines on
    loopback, set up as notebook 03 says: yields (client, the worker's command-line process)."""
    import os
    import subprocess
    from pathlib import Path

    from distributed import Client

    from helpers.s3.server import free_ports

    repo = Path(__file__).resolve().parents[1]
    path = os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False", "PYTHONPATH": path}
    address = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    loopback = ["--host", "127.0.0.1", "--no-dashboard"]
    dask = [sys.executable, "-m", "dask"]
    worker = [*dask, "worker", address, "--nthreads", "1", *loopback]
    worker += ["--nworkers", "1"] if nanny else ["--no-nanny"]
    procs = []
    for name, cmd in (("scheduler", [*dask, "scheduler", "--port", address.rsplit(":", 1)[1],
                                     *loopback]), ("worker", worker)):  # fmt: skip
        with open(tmp_path / f"{name}.log", "wb") as log:
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=log, env=env, cwd=repo,
                                          start_new_session=True))  # fmt: skip
    client = Client(address, timeout=60)
    try:
        client.wait_for_workers(1, timeout=120)
        yield client, procs[1]
    finally:
        client.close(timeout=10)
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, 9)
            p.wait(10)


@pytest.mark.parametrize("nanny", [False, True], ids=["no-nanny", "nanny"])
def test_sigterm_to_a_command_line_worker_checkpoints_the_current_step_then_it_exits(
    dogs, tmp_path, nanny
):
    """Kubernetes stops a pod with SIGTERM to the `dask worker` process: the rank writes a
    checkpoint at the step it is at, and the worker process exits (started without a nanny, it
    is Dask's own handler that closes it; with one, the nanny closes the worker over IPC)."""
    import signal

    _, options, _ = dogs
    cfg = _train_config(dogs, tmp_path, checkpoint_every=0, max_restarts=0)  # SIGTERM's only
    with _command_line_cluster(tmp_path, nanny) as (client, worker):
        watch = monitor.Monitor(client, cfg.topic)
        job = ddp.start(client, train.train_rank, cfg, options, timeout_s=120)
        _wait_for_step(watch, 2)
        worker.send_signal(signal.SIGTERM)
        told = time.monotonic()
        worker.wait(timeout=40)  # it exits, after the checkpoint
        took = time.monotonic() - told
        job.exception(timeout=60)
    state = checkpoint.load(cfg.checkpoint_url, options)
    logging.getLogger(__name__).warning("%s: exited %.1f s after SIGTERM; checkpoint at epoch "
                                        "%d step %d", worker.args[-1], took, state["epoch"],
                                        state["step"])  # fmt: skip
    assert state["epoch"] == 0 and state["step"] >= 2  # mid-epoch, where it was told to stop


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


def _trained_keys(folder) -> dict[int, list[tuple]]:
    """Per rank, ``(epoch, step, keys)`` as the finished run trained them: the last line of each
    (epoch, step) in its key log (a restart or a resume repeats the steps after its checkpoint)."""
    from pathlib import Path

    out = {}
    for path in sorted(Path(folder).glob("rank-*.log")):
        last = {}
        for line in path.read_text().splitlines():
            _attempt, epoch, step, *keys = line.split(" ")
            last[(int(epoch), int(step))] = tuple(keys)
        out[int(path.stem[5:])] = [(*k, v) for k, v in sorted(last.items())]
    return out


@pytest.mark.parametrize(
    "fmt, strategy", [("objects", "ddp"), ("shards", "ddp"), ("shards", "fsdp")]
)
def test_a_restarted_and_a_resumed_run_train_on_the_keys_a_straight_run_does(
    client, own_s3, tmp_path, fmt, strategy
):
    """Resumes proven exact by sample keys: a straight run; one whose rank 1 worker is killed
    mid-epoch (an automatic restart from the last checkpoint); and one cancelled mid-epoch then
    rerun with resume=True. Every rank trains on the same keys, in the same order, in each.
    FSDP's run keeps its sharded checkpoints in the embedded S3."""
    server, url = own_s3
    options = server.storage_options
    base = dict(data_format=fmt, epochs=2, checkpoint_every=1, loader_workers=1,
                strategy=strategy)  # fmt: skip
    where = f"s3://dogs/ck-{tmp_path.name}" if strategy == "fsdp" else str(tmp_path)

    def run(name, **kw):
        cfg = _train_config((url, options, None), tmp_path, **base, **kw,
                            keys_log=str(tmp_path / name / "keys"),
                            checkpoint_url=f"{where}/{name}/ck")  # fmt: skip
        return cfg, monitor.Monitor(client, cfg.topic)

    straight, _ = run("straight")
    ddp.run(client, train.train_rank, straight, options)
    expected = _trained_keys(straight.keys_log)
    assert len(expected) == 2 and len(expected[0]) == 2 * 4  # 32 images, 2 ranks, batches of 4

    restarted, watch = run("restarted", max_restarts=1)
    job = ddp.start(client, train.train_rank, restarted, options)
    _kill_rank_worker_at(client, watch, 1, step=3)
    job.result(timeout=300)
    assert job.restarts and _trained_keys(restarted.keys_log) == expected
    resumed_from = checkpoint.load(restarted.checkpoint_url, options, strategy)
    assert resumed_from["epoch"] == 2 and ("shards" in resumed_from) == (strategy == "fsdp")

    interrupted, watch = run("resumed")
    job = ddp.start(client, train.train_rank, interrupted, options)
    _wait_for_step(watch, 3)
    job.cancel()
    resumed = dataclasses.replace(interrupted, resume=True)
    ddp.run(client, train.train_rank, resumed, options)
    assert _trained_keys(interrupted.keys_log) == expected
