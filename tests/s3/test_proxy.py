"""The counting proxy: signed requests pass through it, it counts them exactly, faults reach
clients."""

from __future__ import annotations

import functools

import pytest

from helpers.s3 import proxy as s3proxy
from helpers.s3 import retry, storage

BUCKET = "proxy"


@pytest.fixture(scope="module")
def objects(s3):
    """Five small objects on the session server."""
    fs = storage.filesystem(f"s3://{BUCKET}", s3.storage_options)
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    blobs = {f"{BUCKET}/obj-{i}": bytes([i]) * (1000 + i) for i in range(5)}
    fs.pipe(blobs)
    return blobs


def _through(s3, proxy):
    """The project's s3fs filesystem with the proxy as its endpoint (signed with the dummy keys);
    a new proxy port makes a new filesystem."""
    return storage.filesystem(f"s3://{BUCKET}", {**s3.storage_options, "endpoint_url": proxy.url})


def test_signed_reads_verify_and_are_counted_exactly(s3, objects):
    with s3proxy.S3Proxy(s3.endpoint_url) as proxy:
        fs = _through(s3, proxy)
        for path, blob in objects.items():
            assert fs.cat_file(path) == blob
        for path, blob in list(objects.items())[:3]:
            assert fs.cat_file(path) == blob  # the same object again is another GET
        counts = proxy.counts()
        assert counts["requests"] == {"GET": 8}  # and no HEAD: storage sets max_concurrency=1
        assert counts["bytes_out"] == sum(map(len, objects.values())) + sum(
            len(b) for b in list(objects.values())[:3]
        )
        fs.pipe_file(f"{BUCKET}/written", b"x" * 4321)  # a signed PUT with a body verifies too
        assert fs.cat_file(f"{BUCKET}/written") == b"x" * 4321
        assert proxy.counts()["requests"]["PUT"] == 1 and proxy.counts()["bytes_in"] == 4321
        proxy.reset()
        assert proxy.counts()["requests"] == {}


def test_injected_503s_reach_the_client(s3, objects):
    faults = s3proxy.Faults("503", rate=1.0)
    with s3proxy.S3Proxy(s3.endpoint_url, faults) as proxy:
        fs = _through(s3, proxy)
        with pytest.raises(OSError, match="reduce your request rate"):
            fs.cat_file(f"{BUCKET}/obj-0")
        assert proxy.counts()["faults"]["503"] >= 1


def test_a_seeded_fraction_of_resets_is_survived_by_retries(s3, objects):
    # Half the GETs are reset; the project's retries (retry.retrying: s3fs itself makes one
    # attempt) re-send them, so every read still returns the right bytes.
    faults = s3proxy.Faults("reset", rate=0.5, seed=1)
    with s3proxy.S3Proxy(s3.endpoint_url, faults) as proxy:
        fs = _through(s3, proxy)
        for path, blob in objects.items():
            get = functools.partial(fs.cat_file, path)
            assert retry.retrying(get, f"s3://{path} at {proxy.url}") == blob
        counts = proxy.counts()
        assert counts["faults"]["reset"] >= 1
        assert counts["requests"]["GET"] == len(objects) + counts["faults"]["reset"]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="kind='boom'"):
        s3proxy.Faults("boom")
    with pytest.raises(ValueError, match="rate=2"):
        s3proxy.Faults("503", rate=2)
    with pytest.raises(ValueError, match="upstream="):
        s3proxy.S3Proxy("https://example.com")


def _idle_clients(url: str, n: int, timeout: float) -> tuple[list, list]:
    """``n`` clients, each sending one request on a kept-alive connection and then going idle
    (the connection left open): the statuses they got, and the connections."""
    import http.client
    import threading
    import urllib.parse

    port = urllib.parse.urlsplit(url).port
    statuses, conns = [None] * n, []

    def client(i):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        conns.append(conn)
        try:
            conn.request("GET", f"/{BUCKET}/obj-0")  # unsigned: any answer will do (403)
            resp = conn.getresponse()
            resp.read()
            statuses[i] = resp.status
        except OSError as err:
            statuses[i] = type(err).__name__

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 5)
    return statuses, conns


def _stops_within(proxy, seconds: float) -> bool:
    import threading

    stopping = threading.Thread(target=proxy.stop, daemon=True)
    stopping.start()
    stopping.join(seconds)
    return not stopping.is_alive()


def test_idle_kept_alive_connections_give_their_slot_up_and_stop_returns(s3, objects):
    # 70 clients over 64 slots: the last 6 are answered once idle connections are closed
    # (after idle_s), and stop() returns with connections still open.
    proxy = s3proxy.S3Proxy(s3.endpoint_url, idle_s=1.0).start()
    statuses, conns = _idle_clients(proxy.url, 70, timeout=10)
    assert all(isinstance(s, int) for s in statuses), statuses
    _idle_clients(proxy.url, 3, timeout=10)  # open and idle when stop() comes
    assert _stops_within(proxy, 3.0)
    for conn in conns:
        conn.close()


def test_stop_returns_while_connections_wait_for_a_slot(s3, objects):
    proxy = s3proxy.S3Proxy(s3.endpoint_url, max_connections=4, idle_s=60).start()
    statuses, conns = _idle_clients(proxy.url, 6, timeout=1)  # 2 wait for a slot
    assert sorted(map(str, statuses)) == ["403"] * 4 + ["TimeoutError"] * 2, statuses
    assert _stops_within(proxy, 3.0)  # not held by the wait, nor by the 4 idle connections
    for conn in conns:
        conn.close()
