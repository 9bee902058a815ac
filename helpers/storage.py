"""Where the images live: S3 (real AWS, MinIO, Ceph...) or local paths; options and errors.

Every S3 access in the project goes through :func:`storage_options` and :func:`filesystem`, so the
same code reads the embedded server on loopback (``helpers.s3server``), a MinIO box, or a public
AWS bucket: only the endpoint (and credentials, from the usual AWS environment) change. Errors
become :class:`StorageError` with a sentence naming the endpoint, bucket or key.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # names for annotations only: importing costs nothing at run time
    from fsspec import AbstractFileSystem

log = logging.getLogger(__name__)

# Fail fast: an unreachable endpoint must surface in seconds, not after botocore's long retries.
CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 30
# Mid-run, transient failures (throttling, 5xx, timeouts, resets, a server restarting) are
# retried with back-off for this long, then StorageUnavailable names the endpoint. First contact
# (check_readable, the manifest) is not retried: a wrong endpoint still fails in seconds.
RETRY_WINDOW_S = 30.0
TRANSIENT = ("slowdown", "throttl", "toomanyrequests", "requestlimitexceeded", "500", "502",
             "503", "504", "internalerror", "serviceunavailable", "service unavailable",
             "timeout", "timed out", "reset", "connection", "broken pipe", "could not connect",
             "disconnected", "incompleteread", "responsestreaming", "try again",
             "reduce your request rate", "internal error")  # fmt: skip
PERMANENT = ("nosuchbucket", "nosuchkey", "accessdenied", "access denied", "forbidden",
             "invalidaccesskeyid", "signaturedoesnotmatch", "does not exist")  # fmt: skip
_RETRIES: dict[str, Any] = {"shared": None, "local": 0}  # retries made by this process (tree)

_FILESYSTEMS: dict[tuple, Any] = {}  # (pid, options) -> filesystem; filled lazily, per process


class StorageError(RuntimeError):
    """An object store could not be used; the message names the endpoint, bucket or key."""


class StorageUnavailable(StorageError):
    """The endpoint stayed unreachable or kept failing (5xx, throttling, resets, timeouts) for
    the whole retry window: worth a job restart later, unlike a missing bucket or a refusal."""


def split_url(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> (``s3``, ``bucket/prefix``); a plain path -> (``file``, path)."""
    if "://" in url:
        protocol, path = url.split("://", 1)
        if protocol == "file":
            return protocol, os.path.abspath("/" + path.lstrip("/")).rstrip("/")
        return protocol, path.strip("/")
    return "file", os.path.abspath(url)


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts)])


def resolve_endpoint(endpoint: str | None) -> str | None:
    """An explicit endpoint, else ``AWS_ENDPOINT_URL`` (or its S3-only form), else AWS itself."""
    if endpoint:
        return endpoint
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def storage_options(endpoint_url: str | None = None, anon: bool | None = None, **extra) -> dict:
    """fsspec/s3fs options for an endpoint.

    ``anon=None`` signs with credentials when the AWS environment has any and goes anonymous
    otherwise (public buckets). Never log the result: it can hold credentials.
    """
    endpoint_url = resolve_endpoint(endpoint_url)
    if anon is None:
        anon = not _have_credentials() and "key" not in extra
    opts: dict[str, Any] = {"anon": anon, **extra}
    if endpoint_url:
        opts["endpoint_url"] = endpoint_url
    return opts


def _have_credentials() -> bool:
    """Credentials the AWS SDK would find, short of asking the instance metadata service (which
    this never contacts): on EC2 with an instance role, pass ``anon=False``."""
    names = (
        "AWS_ACCESS_KEY_ID",
        "AWS_PROFILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
    )
    if any(os.environ.get(n) for n in names):
        return True
    if Path(os.environ.get("AWS_CONFIG_FILE", "~/.aws/config")).expanduser().exists():
        return True
    return (
        Path(os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"))
        .expanduser()
        .exists()
    )


def filesystem(url: str, options: dict | None = None) -> AbstractFileSystem:
    """The filesystem for ``url``, created lazily once per process.

    Never share one across a fork: its connection pool and event loop belong to the parent. The
    cache is keyed by the process id, so a DataLoader worker builds its own on first use.
    """
    import fsspec

    protocol, _ = split_url(url)
    options = dict(options or {})
    key = (os.getpid(), protocol, json.dumps(options, sort_keys=True, default=str))
    fs = _FILESYSTEMS.get(key)
    if fs is None:
        if protocol == "s3":
            fs = _s3(options)
        else:
            options.pop("anon", None)
            options.pop("endpoint_url", None)
            if protocol == "file":
                options.setdefault("auto_mkdir", True)  # S3 has no folders to create first
            fs = fsspec.filesystem(protocol, **options)
        _FILESYSTEMS[key] = fs
    return fs


def _s3(options: dict):
    import s3fs

    endpoint = options.pop("endpoint_url", None)
    client_kwargs = dict(options.pop("client_kwargs", {}))
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    config = {
        "connect_timeout": CONNECT_TIMEOUT_S,
        "read_timeout": READ_TIMEOUT_S,
        "retries": {"max_attempts": 0, "mode": "standard"},  # no hidden retries: ours count
        "max_pool_connections": 64,  # a batch's GETs go out together
        **options.pop("config_kwargs", {}),
    }
    # max_concurrency=1: otherwise s3fs sends a HEAD (for the size) before every GET, to decide
    # whether to split it into ranged GETs; images are small, so that only doubles the requests.
    options.setdefault("max_concurrency", 1)
    fs = s3fs.S3FileSystem(
        skip_instance_cache=True,  # our own per-process cache replaces fsspec's
        client_kwargs=client_kwargs,
        config_kwargs=config,
        **options,
    )
    fs.retries = 1  # one attempt: mid-run retries are ours (retrying), counted and bounded
    return fs


def is_transient(err: BaseException) -> bool:
    """A failure worth retrying (see :data:`TRANSIENT`); never a missing key or a refusal."""
    if isinstance(err, (FileNotFoundError, PermissionError)):
        return False
    if isinstance(err, OSError) and err.errno in (errno.EBUSY, errno.EAGAIN, errno.ETIMEDOUT):
        return True  # s3fs's translation of throttling and timeouts
    low = f"{type(err).__name__} {err}".lower()
    return not any(s in low for s in PERMANENT) and any(s in low for s in TRANSIENT)


def retry_counter() -> Any:
    """This process's retry count in shared memory from now on (made on the first call); a
    child process given it (:func:`use_retry_counter`) counts its retries here too."""
    import multiprocessing

    if _RETRIES["shared"] is None:
        _RETRIES["shared"] = multiprocessing.get_context().Value("q", _RETRIES["local"])
    return _RETRIES["shared"]


def use_retry_counter(counter: Any) -> None:
    """In a child process (a DataLoader's): count retries in the parent's :func:`retry_counter`."""
    _RETRIES["shared"] = counter


def retries() -> int:
    """Transient storage failures retried so far by this process and the children given its
    :func:`retry_counter`."""
    shared = _RETRIES["shared"]
    return shared.value if shared is not None else _RETRIES["local"]


def count_retry(n: int = 1) -> None:
    """Count ``n`` requests sent again after a transient failure (:func:`retries`)."""
    shared = _RETRIES["shared"]
    if shared is None:
        _RETRIES["local"] += n
        return
    with shared.get_lock():
        shared.value += n


def backoff(began: float, attempt: int, err: BaseException, url: str, options: dict | None,
            window_s: float | None = None, count: int = 1) -> None:  # fmt: skip
    """Sleep before retry ``attempt`` of ``count`` requests (exponential, jittered, at most
    4 s), or raise :class:`StorageUnavailable` once the window since ``began`` is spent."""
    import random
    import time

    window_s = RETRY_WINDOW_S if window_s is None else window_s
    delay = min(4.0, 0.2 * 2**attempt) * random.uniform(0.5, 1.0)
    if time.monotonic() - began + delay > window_s:
        raise StorageUnavailable(
            f"{describe(url, options)} kept failing for {window_s:.0f} s ({attempt} retries; "
            f"last: {type(err).__name__}: {err}). Is the S3 server up and not overloaded?"
        ) from err
    count_retry(count)
    log.warning("retrying %s in %.1f s: %s: %s", url, delay, type(err).__name__, err)
    time.sleep(delay)


def retrying(
    call: Callable[[], Any], url: str, options: dict | None, window_s: float | None = None
) -> Any:
    """``call()``, retried while it fails transiently (:func:`backoff`); other errors at once."""
    import time

    began, attempt = time.monotonic(), 0
    while True:
        try:
            return call()
        except Exception as err:  # noqa: BLE001 - sorted by is_transient
            if not is_transient(err):
                raise
            backoff(began, attempt, err, url, options, window_s)
            attempt += 1


def describe(url: str, options: dict | None) -> str:
    """``s3://bucket/prefix at http://endpoint`` for error messages (never credentials)."""
    endpoint = (options or {}).get("endpoint_url") or "AWS S3"
    return f"{url} at {endpoint}" if split_url(url)[0] == "s3" else url


def check_readable(url: str, options: dict | None = None) -> None:
    """Raise :class:`StorageError` naming the endpoint, bucket or prefix if ``url`` is unusable.

    One LIST request (two when it fails), so a wrong bucket, an empty prefix, refused credentials
    or a dead endpoint are told apart in seconds.
    """
    protocol, path = split_url(url)
    fs = filesystem(url, options)
    where = describe(url, options)
    bucket = path.split("/", 1)[0]
    try:
        try:
            if fs.ls(path, detail=False):
                return
        except FileNotFoundError:
            pass
        if protocol == "s3":
            try:
                fs.ls(bucket, detail=False)
            except FileNotFoundError:
                raise StorageError(
                    f"bucket {bucket!r} does not exist ({where}); check data_url"
                ) from None
        raise StorageError(f"nothing stored under {url!r} ({where}); check data_url")
    except StorageError:
        raise
    except Exception as err:  # noqa: BLE001 - every backend error becomes one clear message
        raise StorageError(explain(err, url, options)) from err


def explain(err: BaseException, url: str, options: dict | None) -> str:
    """Turn a botocore/s3fs error into a sentence that says what to fix."""
    where = describe(url, options)
    text = f"{type(err).__name__}: {err}"
    low = text.lower()
    unreachable = ("could not connect", "connect timeout", "connection refused", "cannot connect",
                   "endpointconnectionerror", "timeout")  # fmt: skip
    if any(s in low for s in unreachable):
        return f"cannot reach the S3 endpoint for {where}: {text}. Is the server running?"
    refused = ("invalidaccesskeyid", "signaturedoesnotmatch", "access denied", "accessdenied",
               "forbidden")  # fmt: skip
    if isinstance(err, PermissionError) or any(s in low for s in refused):
        return (
            f"access to {where} was refused ({text}); check the AWS credentials in the "
            "environment (anonymous access is used when none are found), or pass anon=True "
            "for a public bucket"
        )
    if "nosuchbucket" in low or "does not exist" in low:
        return f"bucket of {where} does not exist ({text})"
    return f"cannot read {where}: {text}"
