"""Where the images live: S3 (real AWS, MinIO, Ceph...) or local paths; options and errors.

Every S3 access in the project goes through :func:`storage_options` and :func:`filesystem`, so the
same code reads the embedded server on loopback (:mod:`helpers.s3.server`), a MinIO box, or a
public AWS bucket: only the endpoint (and credentials, from the usual AWS environment) change.
Errors become :class:`~helpers.errors.StorageError` with a sentence naming the endpoint, bucket
or key (:func:`explained`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from helpers.errors import StorageError
from helpers.s3 import retry

if TYPE_CHECKING:  # names for annotations only: importing costs nothing at run time
    from fsspec import AbstractFileSystem

log = logging.getLogger(__name__)

# Fail fast: an unreachable endpoint must surface in seconds, not after botocore's long retries.
CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 30

_FILESYSTEMS: dict[tuple, Any] = {}  # (pid, options) -> filesystem; filled lazily, per process


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


def s3fs_kwargs(options: dict | None) -> dict:
    """The keyword arguments of ``s3fs.S3FileSystem`` for ``options``: the endpoint, short
    timeouts, no hidden retries (mid-run retries are ours: :func:`helpers.s3.retry.retrying`).
    Also for libraries that build their own filesystem from a URL (DCP's fsspec writer)."""
    options = dict(options or {})
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
    return {
        "skip_instance_cache": True,  # our own per-process cache replaces fsspec's
        "client_kwargs": client_kwargs,
        "config_kwargs": config,
        **options,
    }


def _s3(options: dict):
    import s3fs

    fs = s3fs.S3FileSystem(**s3fs_kwargs(options))
    fs.retries = 1  # one attempt: mid-run retries are ours (retrying), counted and bounded
    return fs


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
    with explained(url, options):
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


@contextmanager
def explained(url: str, options: dict | None) -> Iterator[None]:
    """Any error of the block (but :class:`StorageError`, already explained) becomes a
    :class:`StorageError` whose message says what to fix (:func:`explain`)."""
    try:
        yield
    except StorageError:
        raise
    except Exception as err:  # noqa: BLE001 - every backend error becomes one clear message
        raise StorageError(explain(err, url, options)) from err


def explain(err: BaseException, url: str, options: dict | None) -> str:
    """Turn a botocore/s3fs error into a sentence that says what to fix, by what it is."""
    where = describe(url, options)
    text = f"{type(err).__name__}: {err}"
    code = retry.status(err)
    if isinstance(err, PermissionError) or code in (401, 403):
        return (
            f"access to {where} was refused ({text}); check the AWS credentials in the "
            "environment (anonymous access is used when none are found), or pass anon=True "
            "for a public bucket"
        )
    if isinstance(err, FileNotFoundError) or code == 404:
        return f"{where} does not exist ({text})"
    if code is None and retry.is_transient(err):  # no answer at all: refused, timed out
        return f"cannot reach the S3 endpoint for {where}: {text}. Is the server running?"
    return f"cannot read {where}: {text}"
