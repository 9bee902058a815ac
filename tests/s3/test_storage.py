"""URLs, options, filesystems and the errors that name the bucket or endpoint, on a real server."""

import multiprocessing as mp
import time

import pytest

from helpers.errors import StorageError
from helpers.s3 import server as s3server
from helpers.s3 import storage


@pytest.fixture(params=["seaweedfs", "moto"])
def server(request, s3, moto_s3):
    return s3 if request.param == "seaweedfs" else moto_s3


def test_round_trip_on_both_backends(server):
    url = f"s3://roundtrip-{server.backend}/x"
    fs = storage.filesystem(url, server.storage_options)
    fs.mkdir(f"roundtrip-{server.backend}")
    fs.pipe({f"roundtrip-{server.backend}/x/{i}.bin": bytes([i]) * 10 for i in range(5)})
    got = fs.cat([f"roundtrip-{server.backend}/x/{i}.bin" for i in range(5)])
    assert sorted(v[0] for v in got.values()) == list(range(5))
    storage.check_readable(url, server.storage_options)


def test_wrong_bucket_is_named(server):
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        storage.check_readable("s3://no-such-bucket/images", server.storage_options)


def test_empty_prefix_is_named(s3, dogs):
    with pytest.raises(StorageError, match="nothing stored under 's3://dogs/nothing'"):
        storage.check_readable("s3://dogs/nothing", s3.storage_options)


def test_bad_credentials_are_refused_quickly(s3, dogs):
    bad = storage.storage_options(s3.endpoint_url, key="embedded", secret="wrong")
    start = time.monotonic()
    with pytest.raises(StorageError, match="refused.*credentials") as err:
        storage.check_readable("s3://dogs/tiny", bad)
    assert time.monotonic() - start < 30
    assert "wrong" not in str(err.value)  # never echo a secret


def test_endpoint_down_fails_within_seconds():
    (port,) = s3server.free_ports(1)
    options = storage.storage_options(f"http://127.0.0.1:{port}", anon=True)
    start = time.monotonic()
    with pytest.raises(StorageError, match=f"cannot reach.*127.0.0.1:{port}"):
        storage.check_readable("s3://dogs/tiny", options)
    assert time.monotonic() - start < 30


def test_endpoint_comes_from_environment(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio.example:9000")
    assert storage.storage_options()["endpoint_url"] == "http://minio.example:9000"
    assert storage.storage_options("http://other:1")["endpoint_url"] == "http://other:1"


def _child_gets_its_own(url, options, queue):
    import os

    inherited = [fs for (pid, *_), fs in storage._FILESYSTEMS.items() if pid == os.getppid()]
    mine = storage.filesystem(url, options)
    queue.put(bool(inherited) and all(mine is not fs for fs in inherited))


def test_filesystem_is_never_shared_across_a_fork(s3):
    fs = storage.filesystem("s3://dogs", s3.storage_options)
    assert storage.filesystem("s3://dogs", s3.storage_options) is fs  # cached in a process
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_gets_its_own, args=("s3://dogs", s3.storage_options, queue))
    child.start()
    child.join(30)
    assert queue.get(timeout=5) is True


@pytest.mark.network
def test_public_bucket_anonymously():
    options = storage.storage_options(None, anon=True)
    storage.check_readable("s3://noaa-ghcn-pds/csv", options)
