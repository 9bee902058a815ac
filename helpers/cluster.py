"""One way to get a Dask client: a local CPU cluster, a local GPU cluster, or an existing one.

``cluster`` takes the same values as the notebooks' parameter:

- ``"local"``: a LocalCluster of processes on loopback, one thread each (PyTorch threads inside);
- ``"cuda"``: dask-cuda's LocalCUDACluster, one worker per GPU;
- ``"auto"``: ``"cuda"`` when NVIDIA GPUs are visible, else ``"local"``;
- ``"tcp://host:8786"`` / ``"tls://host:8786"``: the scheduler of a cluster that already runs
  (Kubernetes, SLURM, Coiled, dask-gateway...). Its workers need :data:`DASK_CONFIG` and the
  ``helpers`` package; see notebook 03. A ``tls://`` scheduler also needs ``tls_dir``: a folder
  holding :data:`TLS_FILES`.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from distributed import Client

from helpers.errors import ClusterError, NotFound, ParameterError, SchedulerUnreachable

if TYPE_CHECKING:  # for annotations only
    from distributed.security import Security

log = logging.getLogger(__name__)

CLUSTERS = ("auto", "local", "cuda")
# What ``tls_dir`` holds: the CA that signed the cluster's certificates, this client's own.
TLS_FILES = ("ca.pem", "cert.pem", "key.pem")
# What training needs from every worker. Set in this process before a local cluster starts (the
# nanny reads it, and hands it to the worker); a remote deployment sets the same in its config.
DASK_CONFIG = {
    # A DataLoader with worker processes forks from the Dask worker: it must not be daemonic.
    "distributed.worker.daemon": False,
    # The nanny's default (65536) makes glibc trim on every free: about 2x PyTorch CPU step time.
    "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
    # Training tasks run for minutes without releasing the GIL for long; do not mark them stuck.
    "distributed.admin.tick.limit": "60s",
    # A local cluster closes a worker's nanny for good this long after the worker left, if no
    # worker of that name is registered at that moment. The default, 15 s, closes a nanny that is
    # restarting its worker when the same worker died twice within 15 s (a job cancelled, then
    # restarted). Our nannies live in this process and only go when the cluster closes.
    "distributed.deploy.lost-worker-timeout": "1 day",
}
# Under a memory limit: a training rank's tensors are memory Dask does not manage (it cannot
# spill them), so its warnings and its pausing at 60-80% only add noise; the nanny's restart at
# 95% of the limit stays.
QUIET_UNDER_A_LIMIT = {
    "distributed.worker.memory.target": False,
    "distributed.worker.memory.spill": False,
    "distributed.worker.memory.pause": False,
}


def apply_dask_config() -> None:
    """Put :data:`DASK_CONFIG` in force in this process (for local clusters it starts)."""
    import dask

    dask.config.set(DASK_CONFIG)


def gpu_count() -> int:
    """NVIDIA GPUs visible through NVML (0 when there is no driver), without initialising CUDA."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return pynvml.nvmlDeviceGetCount()
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no library, no driver, no device: all mean zero GPUs
        return 0


def check_cluster(cluster: str, tls_dir: str = "") -> str:
    """Validate the ``cluster`` parameter (and ``tls_dir``, which a ``tls://`` address needs);
    returns ``cluster`` unchanged."""
    if not (cluster in CLUSTERS or cluster.startswith(("tcp://", "tls://", "ucx://"))):
        raise ParameterError(
            f"cluster={cluster!r}; allowed: 'auto', 'local', 'cuda', or a scheduler "
            "address such as 'tcp://10.0.0.5:8786' or 'tls://...'"
        )
    tls = cluster.startswith("tls://")
    if tls_dir and not tls:
        raise ParameterError(f"tls_dir={tls_dir!r} is for a tls:// scheduler; cluster={cluster!r}")
    if tls and not tls_dir and not _tls_configured():
        raise ParameterError(
            f"cluster={cluster!r} needs tls_dir: a folder holding {', '.join(TLS_FILES)} (or "
            "the Dask config's distributed.comm.tls settings, as some deployments write them)"
        )
    missing = [f for f in TLS_FILES if tls_dir and not os.path.isfile(os.path.join(tls_dir, f))]
    if missing:
        raise NotFound(
            f"tls_dir={tls_dir!r} has no {', '.join(missing)}; it must hold {', '.join(TLS_FILES)}"
            " (the CA that signed the cluster's certificates, this client's certificate and key)"
        )
    return cluster


def _tls_configured() -> bool:
    import dask

    return bool(dask.config.get("distributed.comm.tls.ca-file", None))


def security_from(tls_dir: str) -> Security:
    """The client side of TLS from the files in ``tls_dir`` (see :data:`TLS_FILES`)."""
    from distributed.security import Security

    ca, cert, key = (os.path.join(tls_dir, f) for f in TLS_FILES)
    return Security(
        tls_ca_file=ca, tls_client_cert=cert, tls_client_key=key, require_encryption=True
    )


def make_client(
    cluster: str = "local",
    n_workers: int | None = None,
    tls: bool = False,
    timeout: str = "20s",
    tls_dir: str = "",
    memory_limit: str | None = None,
) -> Client:
    """A :class:`distributed.Client` for ``cluster`` (see the module docstring).

    ``n_workers`` applies to local clusters (default: one per core, or one per GPU); ``tls``
    encrypts a local cluster's traffic with a throw-away certificate; ``tls_dir``: the
    certificate files for a ``tls://`` scheduler. ``memory_limit`` (local clusters, such as
    ``"2 GiB"``): each worker's; its nanny restarts a worker that goes over 95% of it (Dask's
    default: the machine's memory shared among the workers).
    """
    from distributed import LocalCluster

    check_cluster(cluster, tls_dir)
    apply_dask_config()
    if "://" in cluster:
        log.info("connecting to the existing cluster at %s", cluster)
        security = security_from(tls_dir) if tls_dir else None
        try:
            return Client(cluster, timeout=timeout, security=security)
        except OSError as err:
            raise SchedulerUnreachable(
                f"no Dask scheduler answered at {cluster} within {timeout}: {err}"
            ) from err
    if cluster == "auto":
        cluster = "cuda" if gpu_count() else "local"
    security = _temporary_security() if tls else None
    protocol = "tls://" if tls else "tcp://"
    memory = {"memory_limit": memory_limit} if memory_limit else {}
    if memory_limit:  # training holds memory Dask cannot spill: only the 95% restart applies
        import dask

        dask.config.set(QUIET_UNDER_A_LIMIT)
    if cluster == "cuda":
        cuda = _cuda_cluster(n_workers, security, protocol, memory)
        return OwningClient(cuda, security=security)
    n_workers = n_workers or os.cpu_count() or 1
    local = LocalCluster(
        n_workers=n_workers,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
        protocol=protocol,
        security=security,
        **memory,
    )
    return OwningClient(local, security=security)


class OwningClient(Client):
    """A client that closes the local cluster it was given when it closes, as ``Client()`` does
    for a cluster it started itself: a notebook's last ``client.close()`` frees the workers. A
    remote cluster's client (a plain ``Client``) closes only itself."""

    def close(self, *args, **kwargs) -> Any:
        result = super().close(*args, **kwargs)
        if self.cluster is not None:
            self.cluster.close()
        return result


def _cuda_cluster(n_workers, security, protocol, memory: dict):
    try:
        from dask_cuda import LocalCUDACluster

        return LocalCUDACluster(
            n_workers=n_workers,
            threads_per_worker=1,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
            protocol=protocol,
            security=security,
            **memory,
        )
    except Exception as err:  # noqa: BLE001 - NVMLError_LibraryNotFound and friends
        if gpu_count() == 0:
            raise ClusterError(
                "cluster='cuda' needs NVIDIA GPUs and their driver, and this machine has none "
                f"({type(err).__name__}). Use cluster='local' (CPU) or 'auto'."
            ) from err
        raise


def _temporary_security():
    from distributed.security import Security

    return Security.temporary()


def worker_facts() -> dict:
    """What training needs to know about the worker this runs on (``client.run`` it)."""
    import multiprocessing

    return {
        "daemon": multiprocessing.current_process().daemon,
        "MALLOC_TRIM_THRESHOLD_": os.environ.get("MALLOC_TRIM_THRESHOLD_", "unset"),
    }


_WARNED: set[str] = set()  # workers already warned about malloc trimming, in this process


def check_workers(client: Client) -> None:
    """Fail within seconds, naming the setting, if a worker cannot run a training rank.

    A daemonic worker cannot start DataLoader processes (the rank would fail at its first batch
    with "daemonic processes are not allowed to have children"). A worker that keeps the
    nanny's ``MALLOC_TRIM_THRESHOLD_`` works, slowly: it gets one warning.
    """
    facts = client.run(worker_facts)
    daemonic = sorted(w for w, f in facts.items() if f["daemon"])
    if daemonic:
        raise ClusterError(
            f"worker(s) {', '.join(daemonic)} are daemonic processes, which may not start "
            "DataLoader worker processes. Start the workers with the environment variable "
            "DASK_DISTRIBUTED__WORKER__DAEMON=False (or the Dask config key "
            "distributed.worker.daemon: false), then restart them; see notebook 03"
        )
    trimming = sorted(w for w, f in facts.items() if f["MALLOC_TRIM_THRESHOLD_"] != "unset")
    if set(trimming) - _WARNED:
        _WARNED.update(trimming)
        log.warning(
            "worker(s) %s keep the nanny's MALLOC_TRIM_THRESHOLD_, which makes glibc return "
            "memory on nearly every free and slows PyTorch on CPUs; remove it from the config "
            "key distributed.nanny.pre-spawn-environ (helpers.cluster.DASK_CONFIG)",
            ", ".join(trimming),
        )
