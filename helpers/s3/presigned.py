"""The per-object path's fast lane: a batch signed in one call, then plain HTTP GETs on
kept-alive connections, concurrently.

Through s3fs a GET of a 38 KB object cost a loader process 3.4-3.9 ms of CPU here (aiobotocore
builds, signs and parses every request in Python, and each call hops onto its event loop);
signing a batch of 32 in one call and sending plain GETs cost 1.5-1.9 ms. ``make bench-loading``
records the time the path takes to fetch an image (``stage_ms_per_image``).

Nothing else changes: a missing object is a ``FileNotFoundError``, a transient failure (5xx,
throttling, a reset, a timeout) comes back as the exception for the caller's counted retries,
and a presigned GET the store refuses (a 403, a TLS setting s3fs has and plain HTTP lacks, a
store that cannot sign) is left out of the answer, to be read through s3fs, which names the
error; after one refusal the process stops trying.
"""

from __future__ import annotations

import errno
import http.client
import logging
import os
import re
import threading
import urllib.parse

from helpers.s3 import retry, storage

log = logging.getLogger(__name__)

# How long a presigned URL lives: per-object batches use theirs at once; a shard stream signs an
# epoch's shards when the epoch starts, and an epoch of the real dataset can take hours.
SIGNED_FOR_S = 12 * 3600
THREADS = 16  # concurrent GETs per process: a batch's worth on loopback, latency-bound on S3

_STATE: dict = {"pid": None, "pool": None, "refused": False}  # per process: reset after a fork
_LOCAL = threading.local()  # each pool thread's kept-alive connections, by (scheme, host)


def sign(
    url: str, options: dict | None, paths: list[str], expires_s: int = SIGNED_FOR_S
) -> dict[str, str]:
    """``{path: presigned GET URL}`` for the ``bucket/key`` ``paths`` of an ``s3://`` ``url``,
    valid ``expires_s``, all signed in one call on the S3 client's event loop; ``{}`` when
    ``url`` is not on S3, the client cannot sign, or this process had a presigned GET refused."""
    from fsspec.asyn import sync

    _process()
    if _STATE["refused"] or storage.split_url(url)[0] != "s3" or not paths:
        return {}
    fs = storage.filesystem(url, options)
    try:
        return sync(fs.loop, _sign_all, fs, paths, expires_s)
    except Exception as err:  # noqa: BLE001 - the caller reads these through s3fs instead
        log.info("cannot presign GETs under %s (%s); reading through s3fs", url, err)
        _STATE["refused"] = True
        return {}


async def _sign_all(fs, paths: list[str], expires_s: int) -> dict[str, str]:
    s3 = await fs.set_session()
    out = {}
    for path in paths:
        bucket, key, _ = fs.split_path(path)
        out[path] = await s3.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires_s
        )
    return out


def get_many(urls: dict[str, str]) -> dict[str, bytes | Exception]:
    """GET every ``{path: presigned URL}`` concurrently: ``{path: bytes}``, or the exception for
    a missing object (``FileNotFoundError``) or a transient failure; a refused path is left out."""
    if not urls:
        return {}
    got = _process().map(_get_one, urls.items())
    return {path: item for path, item in got if item is not None}


def _process():
    """This process's thread pool, made afresh after a fork (threads do not survive one)."""
    from concurrent.futures import ThreadPoolExecutor

    if _STATE["pid"] != os.getpid():
        pool = ThreadPoolExecutor(THREADS, thread_name_prefix="s3-get")
        _STATE.update(pid=os.getpid(), pool=pool, refused=False)
    return _STATE["pool"]


def _get_one(item: tuple[str, str]) -> tuple[str, bytes | Exception | None]:
    path, url = item
    try:
        status, reason, body = _request(url)
    except Exception as err:  # noqa: BLE001 - sorted below
        if retry.is_transient(err):
            return path, err
        return path, _refuse(path, err)
    if status == 200:
        return path, body
    code = re.search(rb"<Code>(\w+)</Code>", body[:1024])
    what = f"HTTP {status} {code.group(1).decode() if code else reason} for GET of {path}"
    if status == 404:
        return path, FileNotFoundError(errno.ENOENT, what)
    if status == 429 or status >= 500:
        return path, OSError(errno.EAGAIN, what)  # retry.is_transient: retried and counted
    return path, _refuse(path, what)


def _refuse(path: str, why) -> None:
    """Turn the fast lane off in this process: the store refused a presigned GET."""
    if not _STATE["refused"]:
        log.info("a presigned GET of %s was refused (%s); reading through s3fs", path, why)
    _STATE["refused"] = True
    return None


def _request(url: str) -> tuple[int, str, bytes]:
    """One GET on this thread's kept-alive connection to the host; a connection the server
    had closed while idle is replaced once, as HTTP clients do, without counting a retry."""
    parts = urllib.parse.urlsplit(url)
    target = f"{parts.path}?{parts.query}" if parts.query else parts.path
    conns = _LOCAL.__dict__.setdefault("conns", {})
    key = (parts.scheme, parts.netloc)
    for attempt in (0, 1):
        conn = conns.pop(key, None)
        reused = conn is not None
        if conn is None:
            https = parts.scheme == "https"
            kind = http.client.HTTPSConnection if https else http.client.HTTPConnection
            conn = kind(parts.netloc, timeout=storage.CONNECT_TIMEOUT_S)
            conn.connect()
            conn.sock.settimeout(storage.READ_TIMEOUT_S)
        try:
            conn.request("GET", target)
            resp = conn.getresponse()
            body = resp.read()
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            conn.close()
            if reused and attempt == 0:
                continue
            raise
        except BaseException:
            conn.close()
            raise
        if resp.will_close:
            conn.close()
        else:
            conns[key] = conn
        return resp.status, resp.reason, body
    raise AssertionError("unreachable")
