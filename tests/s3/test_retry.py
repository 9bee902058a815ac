"""Transient storage failures, injected by the fault proxy: retried with back-off and counted,
then named; missing keys and buckets fail at once."""

import errno
import threading
import time

import pytest

from helpers.errors import BadImageError, StorageError, StorageUnavailable
from helpers.loading.objects import S3ImageDataset
from helpers.s3 import retry
from helpers.s3.proxy import Faults, S3Proxy
from helpers.s3.server import free_ports


def _through(proxy, options):
    return {**options, "endpoint_url": proxy.url}


def _read_all(url, options, keys):
    ds = S3ImageDataset(url, keys, None, options, on_error="raise")
    return ds.samples(list(range(len(keys))))


@pytest.mark.parametrize("kind", ["503", "reset"])
def test_throttling_and_resets_are_retried_and_counted(dogs, kind):

    url, options, manifest = dogs
    keys = manifest.keys[:12]
    with S3Proxy(options["endpoint_url"], Faults(kind, rate=0.3, seed=1)) as proxy:
        before = retry.retries()
        got = _read_all(url, _through(proxy, options), keys)
        faults = proxy.counts()["faults"].get(kind, 0)
    assert len(got) == len(keys)  # every image, despite the faults
    assert faults > 0  # the faults happened
    # Every 503 is retried by the retry loop and counted. Some resets are re-sent below it
    # (a reset kept-alive connection is reopened by the HTTP client), so at least one counts.
    assert retry.retries() - before >= (faults if kind == "503" else 1)


def test_a_server_that_went_away_and_came_back_is_waited_for(dogs, tmp_path):
    """The proxy's upstream goes dark for 3 s (requests fail: connection refused upstream,
    the connection closed without an answer), then answers again."""

    url, options, manifest = dogs
    with S3Proxy(options["endpoint_url"]) as proxy:
        real, proxy.upstream = proxy.upstream, ("127.0.0.1", storage_free_port())
        threading.Timer(3.0, setattr, (proxy, "upstream", real)).start()
        before, began = retry.retries(), time.monotonic()
        got = _read_all(url, _through(proxy, options), manifest.keys[:4])
    assert len(got) == 4 and retry.retries() > before
    assert 2.5 < time.monotonic() - began < 30


def storage_free_port():
    return free_ports(1)[0]


def test_a_server_that_stays_away_fails_naming_the_endpoint(dogs, monkeypatch):

    monkeypatch.setattr(retry, "RETRY_WINDOW_S", 2.0)
    url, options, manifest = dogs
    with S3Proxy(options["endpoint_url"]) as proxy:
        proxy.upstream = ("127.0.0.1", storage_free_port())
        began = time.monotonic()
        with pytest.raises(StorageUnavailable, match=f"at {proxy.url} kept failing"):
            _read_all(url, _through(proxy, options), manifest.keys[:2])
    assert time.monotonic() - began < 20


def test_missing_keys_and_buckets_fail_at_once_without_retries(dogs):

    url, options, manifest = dogs
    before, began = retry.retries(), time.monotonic()
    with pytest.raises(BadImageError, match="listed but missing"):
        _read_all(url, options, ["Images/nope/missing.jpg"])
    with pytest.raises((StorageError, BadImageError), match="missing|does not exist"):
        _read_all("s3://no-such-bucket-here/x", options, ["a.jpg"])
    assert retry.retries() == before and time.monotonic() - began < 10


@pytest.mark.parametrize(
    "err, transient",
    [
        (OSError(errno.EBUSY, "SlowDown"), True),  # s3fs's throttling
        (OSError(errno.EAGAIN, "HTTP 503 SlowDown for GET of bucket/key"), True),  # presigned
        (ConnectionResetError(), True),
        (TimeoutError("read timed out"), True),
        (FileNotFoundError("bucket/connection-reset-timeout.jpg"), False),
        (PermissionError("AccessDenied: service unavailable"), False),
        (OSError(errno.EINVAL, "InvalidArgument: bucket/timeout-reset-503.jpg"), False),
        (ValueError("try again later"), False),
    ],
)
def test_failures_are_transient_by_what_they_are_not_by_their_words(err, transient):
    assert retry.is_transient(err) is transient


def test_a_request_the_server_refused_as_malformed_fails_at_once_whatever_its_key_says():
    calls = []

    def bad_request():
        calls.append(1)
        raise OSError(errno.EINVAL, "InvalidRequest for dogs/Images/timeout-connection-reset.jpg")

    began, before = time.monotonic(), retry.retries()
    with pytest.raises(OSError, match="InvalidRequest"):
        retry.retrying(bad_request, "s3://dogs at http://127.0.0.1:1")
    assert calls == [1] and retry.retries() == before and time.monotonic() - began < 1


def test_an_http_status_decides_when_the_error_carries_one():
    class Answered(Exception):
        def __init__(self, code):
            super().__init__(f"HTTP {code}")
            self.response = {"ResponseMetadata": {"HTTPStatusCode": code}}

    wrapped = OSError(errno.EIO, "an unknown error code")
    wrapped.__cause__ = Answered(502)
    assert retry.is_transient(Answered(429)) and retry.is_transient(wrapped)
    assert not retry.is_transient(Answered(400)) and not retry.is_transient(Answered(404))
