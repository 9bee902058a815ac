"""helpers.ddp on a real 2-worker LocalCluster with gloo."""

import os
import sys
import threading
import time

import cloudpickle
import pytest

from helpers import ddp
from helpers.cluster import make_client

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client():
    with make_client("local", n_workers=2) as c:
        yield c


def test_plan_groups_ranks_by_host_and_rank0_host_is_master():
    ranks = ddp.plan(
        ["tcp://10.0.0.2:7", "tcp://10.0.0.1:9", "tcp://10.0.0.2:3", "tcp://10.0.0.1:4"], 1234
    )
    assert [r.worker for r in ranks] == [
        "tcp://10.0.0.1:4",
        "tcp://10.0.0.1:9",
        "tcp://10.0.0.2:3",
        "tcp://10.0.0.2:7",
    ]
    assert [r.local_rank for r in ranks] == [0, 1, 0, 1]
    assert {r.master_addr for r in ranks} == {"10.0.0.1"} and ranks[3].world_size == 4


def _sum_ranks(*, rank, device):
    import torch
    import torch.distributed as dist

    t = torch.tensor([rank.rank + 1.0])
    dist.all_reduce(t)
    return {
        "rank": rank.rank,
        "sum": t.item(),
        "env_rank": os.environ["RANK"],
        "nonce": time.time_ns(),
    }


def test_every_worker_is_one_rank_and_env_is_restored(client):
    results = ddp.run(client, _sum_ranks)
    assert [r["rank"] for r in results] == [0, 1] and {r["sum"] for r in results} == {3.0}
    assert set(client.run(lambda: os.environ.get("RANK")).values()) == {None}
    again = ddp.run(client, _sum_ranks)  # unique keys: a second run is never a cached result
    assert again[0]["nonce"] != results[0]["nonce"]


def _rank1_fails(*, rank, device):
    import torch
    import torch.distributed as dist

    if rank.rank == 1:
        raise ValueError("bad batch on rank 1")
    dist.all_reduce(torch.ones(1))  # rank 0 blocks here until rank 1's group goes away
    return "unreachable"


def test_failing_rank_gives_its_own_error_quickly_and_frees_the_cluster(client):
    start = time.monotonic()
    with pytest.raises(ValueError, match="bad batch on rank 1") as err:
        ddp.run(client, _rank1_fails, timeout_s=60)
    assert time.monotonic() - start < 30
    assert any("rank 1" in n for n in getattr(err.value, "__notes__", []))
    start = time.monotonic()
    assert len(ddp.run(client, _sum_ranks)) == 2  # rank 0 was released, not stuck for 60 s
    assert time.monotonic() - start < 30


def test_two_jobs_at_once_both_succeed(client):
    results, errors = [], []

    def job():
        try:
            results.append(ddp.run(client, _sum_ranks))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=job) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(results) == 2
    assert all({r["sum"] for r in res} == {3.0} for res in results)


def _rank1_dies(*, rank, device):
    import torch
    import torch.distributed as dist

    if rank.rank == 1:
        os._exit(1)  # the worker process dies (OOM-killed, segfault...)
    dist.all_reduce(torch.ones(1))


def test_dead_worker_surfaces_within_seconds():
    with make_client("local", n_workers=2) as c:
        start = time.monotonic()
        with pytest.raises(Exception, match="died|KilledWorker|rank 1|closed"):
            ddp.run(c, _rank1_dies, timeout_s=60)
        assert time.monotonic() - start < 60


def test_gpu_per_rank_follows_dask_cuda_or_local_rank():
    workers = ["tcp://h:1", "tcp://h:2"]
    rotated = ddp.plan(workers, 1, {"tcp://h:1": "0,1", "tcp://h:2": "1,0"})
    shared = ddp.plan(workers, 1, {"tcp://h:1": "0,1", "tcp://h:2": "0,1"})
    assert [r.gpu for r in rotated] == [0, 0] and [r.gpu for r in shared] == [0, 1]


def _backend(*, rank, device):
    import torch.distributed as dist

    return {"backend": dist.get_backend(), "device": str(device)}


@pytest.mark.gpu
def test_cuda_cluster_gives_one_gpu_per_rank_over_nccl():
    with make_client("cuda") as c:
        results = ddp.run(c, _backend)
    assert {r["backend"] for r in results} == {"nccl"}
    assert all(r["device"].startswith("cuda") for r in results)


def test_a_rank_stopped_inside_init_leaves_its_worker_as_its_peers(monkeypatch):
    """A stop landing inside ``init_process_group`` (after torch named the group) must not leave
    the worker one group name ahead: its next job's ranks would wait under different store
    prefixes until the timeout (seen in CI: 'wait timeout ... keys: /1//cpu//0/0')."""
    from datetime import timedelta

    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    from helpers.config import Rank
    from helpers.errors import Stopped

    def stopped_mid_init(*args, **kwargs):
        c10d._process_group_name([], use_hashed_name=False)  # what init does first
        raise Stopped("the job's stop switch")

    monkeypatch.setattr(dist, "init_process_group", stopped_mid_init)
    monkeypatch.setattr(ddp, "_store", lambda rank, timeout: None)
    assert c10d._world.group_count == 0 and not dist.is_initialized()
    with pytest.raises(Stopped):
        ddp._in_group(lambda **kw: None, Rank.alone(), timedelta(seconds=5), (), {})
    assert c10d._world.group_count == 0  # as on a peer that never started its init
