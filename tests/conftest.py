"""Shared fixtures: one real embedded S3 server (SeaweedFS) per session, a tiny synthetic dataset
on it, and the markers' skips (GPU-only, network-only)."""

from __future__ import annotations

import os

import pytest

from helpers import prepare
from helpers.s3 import server as s3server

TINY = {"n_breeds": 4, "per_breed": 10}


def pytest_collection_modifyitems(config, items):
    gpus = _have_cuda()
    network = os.environ.get("RUN_NETWORK_TESTS") == "1"
    for item in items:
        if "gpu" in item.keywords and not gpus:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "network" in item.keywords and not network:
            item.add_marker(pytest.mark.skip(reason="needs the internet: RUN_NETWORK_TESTS=1"))


def _have_cuda() -> bool:
    from helpers.cluster import gpu_count

    return gpu_count() > 0


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real SeaweedFS server on loopback (moto where no SeaweedFS binary exists)."""
    with s3server.EmbeddedS3(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory):
    """moto's server mode: the fallback backend, kept under test so it does not rot."""
    with s3server.EmbeddedS3(tmp_path_factory.mktemp("moto"), backend="moto") as server:
        yield server


@pytest.fixture(scope="session")
def dogs(s3):
    """A tiny synthetic Stanford-Dogs-layout dataset on the session server."""
    url = "s3://dogs/tiny"
    manifest = prepare.write_synthetic(
        url, s3.storage_options, TINY["n_breeds"], TINY["per_breed"], seed=0
    )
    return url, s3.storage_options, manifest


_DURATIONS: list[tuple[str, str, float, str]] = []


def pytest_runtest_logreport(report):
    _DURATIONS.append((report.nodeid, report.when, report.duration, report.outcome))


def pytest_sessionfinish(session, exitstatus):
    """Every run's durations, slowest first, in build/test-durations.csv: where the suite's time
    goes (the full suite must stay under CI's 20 minutes, ``make check`` under 3)."""
    import csv
    from pathlib import Path

    out = Path(session.config.rootpath) / "build" / "test-durations.csv"
    out.parent.mkdir(exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["test", "phase", "seconds", "outcome"])
        for row in sorted(_DURATIONS, key=lambda r: -r[2]):
            writer.writerow([row[0], row[1], f"{row[2]:.2f}", row[3]])
