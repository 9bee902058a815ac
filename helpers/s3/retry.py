"""Transient storage failures, told apart by what they are, retried with back-off, and counted.

Mid-run, a request that failed transiently (throttling, a 5xx, a reset, a timeout, a server
restarting) is sent again with jittered exponential back-off for :data:`RETRY_WINDOW_S`, then
:class:`~helpers.errors.StorageUnavailable` names the endpoint. Anything else (a missing key, a
refusal, a malformed request) fails at once. :func:`is_transient` decides by the exception's
type, errno and HTTP status, never by words in its message: a key named ``timeout-reset.jpg``
is as permanent as any other when it is missing.

There is one retry loop, :func:`retry_each`: it sends a batch of requests, keeps what came back,
and sends again only the transient failures. :func:`retrying` is it for one request. Retries are
counted per process tree (:func:`retries`): a rank reports its own and its loader processes'.
"""

from __future__ import annotations

import errno
import http.client
import logging
import random
import time
from collections.abc import Callable, Hashable, Iterable
from typing import Any

from helpers.errors import StorageUnavailable

log = logging.getLogger(__name__)

# First contact (a dataset's listing, its manifest) is not retried: a wrong endpoint still fails in
# seconds. Mid-run, transient failures are retried this long before the job gives up on storage.
RETRY_WINDOW_S = 30.0
# Errnos of transient failures: s3fs's translations of throttling (EBUSY), timeouts and 5xx
# (EREMOTEIO), and the socket's own resets, refusals and timeouts.
TRANSIENT_ERRNOS = {
    errno.EBUSY,
    errno.EAGAIN,
    errno.ETIMEDOUT,
    errno.ECONNRESET,
    errno.EPIPE,
    errno.ECONNREFUSED,
    errno.ECONNABORTED,
    getattr(errno, "EREMOTEIO", errno.EIO),
}
_RETRIES: dict[str, Any] = {"shared": None, "local": 0}  # retries made by this process (tree)
_KINDS: dict[str, tuple] = {}  # the client libraries' transient exception types, found once


def status(err: BaseException) -> int | None:
    """The HTTP status an error carries (botocore's response, urllib's code, aiohttp's status),
    or None; looked for in the error and the errors it was raised from (``raise ... from``)."""
    seen = 0
    while err is not None and seen < 5:
        response = getattr(err, "response", None)
        if isinstance(response, dict):
            code = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code:
                return int(code)
        code = getattr(err, "status", None) or getattr(err, "code", None)
        if isinstance(code, int) and 100 <= code < 600:
            return code
        err, seen = err.__cause__, seen + 1
    return None


def _client_kinds() -> tuple:
    """The transient exception types of botocore, aiohttp and fsspec (those installed)."""
    if "kinds" not in _KINDS:
        kinds: list = [http.client.HTTPException]
        try:
            from botocore import exceptions as bx
            from botocore.parsers import ResponseParserError
            from urllib3.exceptions import IncompleteRead

            kinds += [
                bx.ConnectionError,
                bx.HTTPClientError,
                bx.ResponseStreamingError,
                bx.IncompleteReadError,
                ResponseParserError,
                IncompleteRead,
            ]
        except ImportError:
            pass
        try:
            import aiohttp

            kinds += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError]
        except ImportError:
            pass
        try:
            from fsspec.exceptions import FSTimeoutError

            kinds.append(FSTimeoutError)
        except ImportError:
            pass
        _KINDS["kinds"] = tuple(kinds)
    return _KINDS["kinds"]


def is_transient(err: BaseException) -> bool:
    """A failure worth sending again: throttling (429, SlowDown), a server error (5xx), a
    connection refused, reset or timed out; never a missing key, a refusal or a bad request."""
    if isinstance(err, (FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError)):
        return False
    code = status(err)
    if code is not None:
        return code == 429 or code >= 500
    if isinstance(err, (TimeoutError, ConnectionError, *_client_kinds())):
        return True
    if isinstance(err, OSError) and err.errno in TRANSIENT_ERRNOS:
        return True
    reason = getattr(err, "reason", None)  # urllib's URLError wraps the socket's error
    return isinstance(reason, BaseException) and is_transient(reason)


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


def retry_each(
    keys: Iterable[Hashable],
    attempt: Callable[[list], dict],
    where: str,
    window_s: float | None = None,
) -> dict:
    """``attempt(keys)`` returns ``{key: result or the exception}`` for a batch of requests; the
    keys that failed transiently go again, after a back-off (exponential, jittered, at most 4 s)
    that counts one retry each, until none is left or the window since the first attempt is
    spent: then :class:`StorageUnavailable` names ``where`` and the last error. Returns every
    key's result, or its permanent exception, for the caller to raise or report."""
    window_s = RETRY_WINDOW_S if window_s is None else window_s
    began, n, out, todo = time.monotonic(), 0, {}, list(keys)
    while todo:
        got = attempt(todo)
        out.update(got)
        todo = [k for k in todo if isinstance(got.get(k), Exception) and is_transient(got[k])]
        if not todo:
            break
        err = got[todo[0]]
        delay = min(4.0, 0.2 * 2**n) * random.uniform(0.5, 1.0)
        if time.monotonic() - began + delay > window_s:
            raise StorageUnavailable(
                f"{where} kept failing for {window_s:.0f} s ({n} retries; last: "
                f"{type(err).__name__}: {err}). Is the S3 server up and not overloaded?"
            ) from err
        count_retry(len(todo))
        log.warning(
            "retrying %d request(s) to %s in %.1f s: %s: %s",
            *(len(todo), where, delay, type(err).__name__, err),
        )
        time.sleep(delay)
        n += 1
    return out


def retrying(call: Callable[[], Any], where: str, window_s: float | None = None) -> Any:
    """``call()``, sent again while it fails transiently (:func:`retry_each`); any other error
    is raised at once, as it was."""

    def attempt(_keys: list) -> dict:
        try:
            return {0: call()}
        except Exception as err:  # noqa: BLE001 - sorted by retry_each
            return {0: err}

    result = retry_each([0], attempt, where, window_s)[0]
    if isinstance(result, Exception):
        raise result
    return result
