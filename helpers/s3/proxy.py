"""A counting (and fault-injecting) reverse proxy on loopback, in front of an S3 endpoint.

Clients use the proxy's URL as their S3 endpoint; the proxy forwards every request verbatim
(method, path and query, headers *including Host*, body) to the real endpoint, so SigV4
signatures made for the proxy's host still verify there. It counts requests by method and the
bytes each way: what a training epoch costs the store, measured at the server side rather than
inferred from client code. For fault-tolerance tests it can answer ``503 SlowDown``, reset the
connection, or pause, for a seeded fraction of the requests::

    with S3Proxy(server.endpoint_url) as proxy:
        fs = s3fs.S3FileSystem(endpoint_url=proxy.url, key=..., secret=...)
        fs.cat_file("bucket/key")
        proxy.counts()   # {'requests': {'GET': 1}, 'bytes_out': ..., 'bytes_in': 0, ...}

Threaded (one thread per client connection, at most ``max_connections``: more wait for a slot),
HTTP/1.1 keep-alive both ways; a client connection idle for ``idle_s`` is closed, giving its slot
up, and :meth:`S3Proxy.stop` closes the open ones. Responses are read whole before they are sent
on (fine for images and shards of a few MB, not for multi-GB objects).
"""

from __future__ import annotations

import http.client
import logging
import random
import socket
import struct
import threading
import time
import urllib.parse
from collections import Counter, deque
from contextlib import suppress
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from helpers.errors import ParameterError

log = logging.getLogger(__name__)

FAULTS = ("503", "reset", "pause")
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"}
SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate (injected by helpers.s3.proxy).</Message></Error>"
)


@dataclass(frozen=True)
class Faults:
    """Which requests fail and how: ``kind`` for a seeded ``rate`` of those with ``methods``.

    ``kind``: ``"503"`` (an S3 ``SlowDown`` error), ``"reset"`` (the TCP connection is reset,
    no answer) or ``"pause"`` (``pause_s`` seconds of silence, then the real answer).
    """

    kind: str = "503"
    rate: float = 0.0
    seed: int = 0
    pause_s: float = 1.0
    methods: tuple[str, ...] = ("GET",)

    def __post_init__(self):
        if self.kind not in FAULTS:
            raise ParameterError(f"kind={self.kind!r}; allowed: {', '.join(map(repr, FAULTS))}")
        if not 0.0 <= self.rate <= 1.0:
            raise ParameterError(f"rate={self.rate!r}; allowed: a fraction from 0.0 to 1.0")


class S3Proxy:
    """A reverse proxy on ``127.0.0.1`` (a free port) to ``upstream``; a context manager.

    ``counts()`` and ``reset()`` are thread-safe; ``faults`` may be replaced while it runs;
    ``log`` holds the last ``max_log`` requests as ``(method, path without query)``. A client
    connection without a request for ``idle_s`` is closed (a kept-alive pool would otherwise
    hold every slot); ``timeout`` bounds each upstream request.
    """

    def __init__(
        self,
        upstream: str,
        faults: Faults | None = None,
        max_connections: int = 64,
        timeout: float = 60.0,
        max_log: int = 100_000,
        idle_s: float = 5.0,
    ):
        parts = urllib.parse.urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ParameterError(f"upstream={upstream!r}; allowed: an http://host:port S3 endpoint")
        self.upstream = (parts.hostname, parts.port or 80)
        self.faults = faults or Faults()
        self.timeout, self.max_connections, self.max_log = timeout, max_connections, max_log
        self.idle_s = idle_s
        self.url: str | None = None
        self._lock = threading.Lock()
        self._rng = random.Random(self.faults.seed)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.reset()

    def __enter__(self) -> S3Proxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> S3Proxy:
        """Listen on a free loopback port and serve in a background thread."""
        self._server = _Server(("127.0.0.1", 0), _handler(self), self.max_connections)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="s3proxy", daemon=True
        )
        self._thread.start()
        log.info("S3 proxy at %s -> http://%s:%d", self.url, *self.upstream)
        return self

    def stop(self) -> None:
        """Stop serving: end the open client connections and any wait for a slot, then close
        the listening socket. Returns within a poll interval (0.5 s) or so."""
        if self._server is not None:
            self._server.close_connections()  # first: the serving thread may wait for a slot
            self._server.shutdown()
            self._server.close_connections()  # any accepted meanwhile
            self._server.server_close()
            self._server = None

    def reset(self) -> None:
        """Zero the counts (and restart the fault sequence from its seed)."""
        with self._lock:
            self._requests: Counter = Counter()
            self.log: deque = deque(maxlen=self.max_log)  # (method, path), newest last
            self._faulted: Counter = Counter()
            self._bytes_in = self._bytes_out = 0
            self._rng = random.Random(self.faults.seed)

    def counts(self) -> dict:
        """``{"requests": {method: n}, "faults": {kind: n}, "bytes_in": n, "bytes_out": n}``."""
        with self._lock:
            return {
                "requests": dict(self._requests),
                "faults": dict(self._faulted),
                "bytes_in": self._bytes_in,
                "bytes_out": self._bytes_out,
            }

    def _admit(self, method: str, path: str, bytes_in: int) -> str | None:
        """Count a request; the fault to inject into it, if any."""
        f = self.faults
        with self._lock:
            self._requests[method] += 1
            self.log.append((method, path.split("?", 1)[0]))
            self._bytes_in += bytes_in
            if f.rate and method in f.methods and self._rng.random() < f.rate:
                self._faulted[f.kind] += 1
                return f.kind
        return None

    def _sent(self, n: int) -> None:
        with self._lock:
            self._bytes_out += n


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128  # connections past the slots wait in the backlog, not in SYN retries

    def __init__(self, address, handler, max_connections: int):
        self._slots = threading.BoundedSemaphore(max_connections)
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        self._stopping = threading.Event()
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        # Bounded: a burst of connections waits for a slot rather than piling threads up; idle
        # connections give theirs up after idle_s, and stop() ends the wait.
        while not self._slots.acquire(timeout=0.1):
            if self._stopping.is_set():
                self.shutdown_request(request)
                return
        if self._stopping.is_set():
            self._slots.release()
            self.shutdown_request(request)
            return
        with self._open_lock:
            self._open.add(request)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._done(request)
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._done(request)

    def _done(self, request) -> None:
        with self._open_lock:
            self._open.discard(request)
        self._slots.release()

    def close_connections(self) -> None:
        """End every open client connection: its thread, blocked reading, sees the end and
        finishes (closing it there, so no descriptor is closed under a thread using it)."""
        self._stopping.set()
        with self._open_lock:
            open_now = list(self._open)
        for request in open_now:
            with suppress(OSError):
                request.shutdown(socket.SHUT_RDWR)


def _handler(proxy: S3Proxy) -> type[BaseHTTPRequestHandler]:
    class Handler(_Forward):
        pass

    Handler.proxy = proxy
    Handler.timeout = proxy.idle_s  # socketserver: the connection's timeout; idle past it, closed
    return Handler


class _Forward(BaseHTTPRequestHandler):
    """Forward one client connection's requests to the upstream, over one kept-alive connection."""

    protocol_version = "HTTP/1.1"
    proxy: S3Proxy
    _upstream: http.client.HTTPConnection | None = None

    def log_message(self, fmt, *args):  # the server's stderr lines would drown a benchmark
        log.debug("s3proxy: " + fmt, *args)

    def _any(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        fault = self.proxy._admit(self.command, self.path, len(body))
        if fault == "reset":
            # SO_LINGER 0: close() sends RST, as a crashed or overloaded server's kernel would.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()
            return
        if fault == "503":
            self._reply(503, [("Content-Type", "application/xml")], SLOW_DOWN)
            return
        if fault == "pause":
            time.sleep(self.proxy.faults.pause_s)
        status, headers, payload = self._forward(body)
        self._reply(status, headers, payload)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _any

    def _forward(self, body: bytes) -> tuple[int, list, bytes]:
        """Send the request as it came (Host included: SigV4 signed it) and read the answer."""
        for attempt in (0, 1):  # a kept-alive upstream connection may have been closed idle
            if self._upstream is None:
                self._upstream = http.client.HTTPConnection(
                    *self.proxy.upstream, timeout=self.proxy.timeout
                )
            try:
                self._upstream.putrequest(
                    self.command, self.path, skip_host=True, skip_accept_encoding=True
                )
                for name, value in self.headers.items():
                    if name.lower() not in HOP_BY_HOP:
                        self._upstream.putheader(name, value)
                self._upstream.endheaders(body or None)
                resp = self._upstream.getresponse()
                payload = resp.read()
                return resp.status, resp.getheaders(), payload
            except (ConnectionError, http.client.HTTPException):
                self._upstream.close()
                self._upstream = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _reply(self, status: int, headers: list, payload: bytes) -> None:
        self.send_response_only(status)
        length = None
        for name, value in headers:
            low = name.lower()
            if low == "content-length":
                length = value
            elif low not in HOP_BY_HOP:
                self.send_header(name, value)
        # HEAD answers carry the object's length and no body; others the body we read.
        self.send_header(
            "Content-Length", (length or "0") if self.command == "HEAD" else str(len(payload))
        )
        self.end_headers()
        if self.command != "HEAD" and payload:
            self.wfile.write(payload)
        self.proxy._sent(len(payload))

    def finish(self):
        try:
            super().finish()
        finally:
            if self._upstream is not None:
                self._upstream.close()
