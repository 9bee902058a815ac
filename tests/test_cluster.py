"""One way to a client: local, CUDA or an address, checked by name; what training needs from each
worker, checked within seconds."""

import os
import sys
import time

import cloudpickle
import pytest

from helpers import ddp
from helpers.cluster import gpu_count, make_client
from helpers.errors import ClusterError, ParameterError, SchedulerUnreachable
from helpers.s3.server import free_ports

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/


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


def _backend(*, rank, device):
    import torch.distributed as dist

    return {"backend": dist.get_backend(), "device": str(device)}


def test_cuda_cluster_without_gpus_says_so():
    if gpu_count():
        pytest.skip("this machine has GPUs")
    with pytest.raises(ClusterError, match="cluster='cuda' needs NVIDIA GPUs.*cluster='local'"):
        make_client("cuda")


def test_unknown_cluster_names_the_allowed_values():
    with pytest.raises(ParameterError, match="cluster='gpu'; allowed: 'auto', 'local', 'cuda'"):
        make_client("gpu")


@pytest.mark.slow
def test_unreachable_scheduler_fails_within_seconds():
    (port,) = free_ports(1)
    start = time.monotonic()
    with pytest.raises(
        SchedulerUnreachable, match=f"no Dask scheduler answered at tcp://127.0.0.1:{port}"
    ):
        make_client(f"tcp://127.0.0.1:{port}", timeout="3s")
    assert time.monotonic() - start < 30


@pytest.mark.slow
def test_tls_local_cluster_runs_ranks():
    with make_client("local", n_workers=2, tls=True) as c:
        assert c.scheduler.address.startswith("tls://")
        assert {r["backend"] for r in ddp.run(c, _backend)} == {"gloo"}


@pytest.mark.slow
def test_a_daemonic_worker_is_refused_within_seconds_naming_the_setting():
    """Workers started the plain way (``dask worker``) are daemonic: name the fix up front."""
    import dask
    from distributed import Client, LocalCluster

    with dask.config.set({"distributed.worker.daemon": True}):
        cluster = LocalCluster(
            n_workers=1, threads_per_worker=1, host="127.0.0.1", dashboard_address=":0"
        )
    with cluster, Client(cluster) as c:
        start = time.monotonic()
        with pytest.raises(ClusterError, match="DASK_DISTRIBUTED__WORKER__DAEMON=False"):
            ddp.run(c, _sum_ranks)
        assert time.monotonic() - start < 10


@pytest.mark.slow
def test_a_worker_that_trims_memory_is_warned_about_once(caplog):
    import dask
    from distributed import Client, LocalCluster

    trims = {
        "distributed.worker.daemon": False,
        "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": 65536,
    }
    with dask.config.set(trims):
        cluster = LocalCluster(
            n_workers=1, threads_per_worker=1, host="127.0.0.1", dashboard_address=":0"
        )
    with cluster, Client(cluster) as c, caplog.at_level("WARNING", logger="helpers.cluster"):
        ddp.run(c, _sum_ranks)
        ddp.run(c, _sum_ranks)
    # distributed's nanny set it in this process's os.environ for good: undo, so later tests'
    # workers (and subprocesses) do not inherit the trimming this test asked for
    os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    warned = [r for r in caplog.records if "MALLOC_TRIM_THRESHOLD_" in r.getMessage()]
    assert len(warned) == 1 and "pre-spawn-environ" in warned[0].getMessage()
