"""Two real hosts: two network namespaces joined by a veth pair, each with its own address.

The `dask scheduler` and one `dask worker` per namespace run from the command line with the
settings notebook 03 documents (a Dask config file made from ``helpers.cluster.DASK_CONFIG``),
the embedded S3 server listens on the first namespace's address, and 2 DDP ranks train with gloo
across the namespaces through the helpers notebook 04 calls, over TCP, then over TLS with
certificate files made here, where notebook 04 itself (papermill) connects too, through its
``cluster`` and ``tls_dir`` parameters. The client side runs inside the first namespace (``ip
netns exec``): the namespaces have no route but their own /24 and loopback, so no traffic can go
anywhere else. Namespaces, veth pair and every process in them are removed at the end, whatever
happened.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = [pytest.mark.twohost, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DATA_URL = "s3://dogs/twohost"
TINY = {"n_breeds": 4, "images_per_breed": 10}  # 40 images: 32 to train, 8 to validate
TRAINING = {
    "arch": "resnet18",
    "image_size": 32,
    "batch_size": 4,
    "epochs": 1,
    "max_steps": 2,
    "threads": 1,
    "loader_workers": 0,
}
# loader_workers=0: forking a loader process from a worker costs ~30 s on a loaded 2-core
# machine (the loopback tests cover loader processes); the workers' settings are checked instead.
DRIVER_TIMEOUT_S = 180  # a liveness bound on each client session, not a speed target


def _ip(*args: str) -> str:
    return subprocess.run(
        ["ip", *args], check=True, capture_output=True, text=True, timeout=15
    ).stdout


@dataclass
class Hosts:
    """Two namespaces; ``spawn``/``run`` start a command inside namespace 0 or 1."""

    names: tuple[str, str]
    addrs: tuple[str, str]
    env: dict
    logs: Path
    procs: list = field(default_factory=list)

    def spawn(self, host: int, cmd: list, log: str) -> subprocess.Popen:
        with open(self.logs / log, "ab") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.names[host], *map(str, cmd)],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def run(self, host: int, cmd: list, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["ip", "netns", "exec", self.names[host], *map(str, cmd)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def _end_processes(ns: str, procs: list) -> None:
    """SIGTERM every process in ``ns``, SIGKILL what is left after 5 s; reap our children."""
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        pids = [int(p) for p in _ip("netns", "pids", ns).split()]
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            for p in procs:
                p.poll()  # reap: a zombie still counts as a pid of the namespace
            pids = _ip("netns", "pids", ns).split()
            time.sleep(0.1)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=5)


def _dask_config(path: Path) -> Path:
    """helpers.cluster.DASK_CONFIG as the YAML file a deployment would ship to its workers."""
    import yaml

    from helpers.cluster import DASK_CONFIG

    nested: dict = {}
    for key, value in DASK_CONFIG.items():
        *parents, last = key.split(".")
        node = nested
        for name in parents:
            node = node.setdefault(name, {})
        node[last] = value
    path.write_text(yaml.safe_dump(nested))
    return path


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and the `ip` command (iproute2)")
    import secrets

    x = random.randint(1, 254)
    tag = f"{os.getpid() % 100000}{random.randint(0, 99)}"
    names = (f"ddl{tag}a", f"ddl{tag}b")
    addrs = (f"10.231.{x}.1", f"10.231.{x}.2")
    logs = tmp_path_factory.mktemp("twohost-logs")
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.pop("AWS_ENDPOINT_URL", None)
    # a fresh shell's environment: a LocalCluster's nanny earlier in this process may have set
    # its pre-spawn variables in os.environ (distributed does, for good), which workers inherit
    env.pop("MALLOC_TRIM_THRESHOLD_", None)
    env |= {
        "PYTHONPATH": str(ROOT),  # this checkout's helpers on the workers and in the kernel
        "DASK_CONFIG": str(_dask_config(logs / "dask.yaml")),
        # The embedded server's (off loopback it refuses its fixed ones; it serves these:
        # --credentials-from-env), as a remote cluster's workers get theirs.
        "AWS_ACCESS_KEY_ID": f"twohost-{secrets.token_hex(6)}",
        "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(24),
        "PYTHONUNBUFFERED": "1",
    }
    hosts, made = Hosts(names, addrs, env, logs), []
    try:
        for ns in names:
            try:
                _ip("netns", "add", ns)
            except subprocess.CalledProcessError as err:
                if not made and "not permitted" in err.stderr:
                    pytest.skip(f"cannot create a network namespace here: {err.stderr.strip()}")
                raise
            made.append(ns)
        _ip(
            "link",
            "add",
            f"v{tag}a",
            "netns",
            names[0],
            "type",
            "veth",
            "peer",
            "name",
            f"v{tag}b",
            "netns",
            names[1],
        )
        for ns, addr, dev in zip(names, addrs, (f"v{tag}a", f"v{tag}b"), strict=True):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield hosts
    finally:
        for ns in made:  # deleting a namespace removes its end of the veth pair
            try:
                _end_processes(ns, hosts.procs)
            finally:
                _ip("netns", "del", ns)


def _wait_for(what: str, check, proc: subprocess.Popen, log: Path, timeout: float = 60.0):
    """Poll ``check()`` until it returns something; fail with the log's tail if ``proc`` ends."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    pytest.fail(f"{what} not up within {timeout:.0f} s (exit {proc.poll()}):\n{tail}")


@pytest.fixture(scope="module")
def s3_endpoint(hosts, tmp_path_factory):
    """The embedded S3 server on the first namespace's address, reachable from both."""
    data = tmp_path_factory.mktemp("twohost-s3")
    log = hosts.logs / "s3.log"
    cmd = [
        sys.executable,
        "-m",
        "helpers.s3.server",
        "serve",
        "--dir",
        data,
        "--host",
        hosts.addrs[0],
        "--credentials-from-env",
    ]
    proc = hosts.spawn(0, cmd, log.name)

    def endpoint():
        for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
            if line.startswith("S3 endpoint: "):
                return line.split()[2]
        return None

    return _wait_for("the S3 server", endpoint, proc, log)


def _certificates(folder: Path, addrs: tuple[str, str]) -> Path:
    """A CA, and one certificate it signed for both hosts: ca.pem, cert.pem, key.pem."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID as Use
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dask-dl test CA")])

    def builder(subject, public, ca):
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        )

    ca = builder(ca_name, ca_key.public_key(), True).sign(ca_key, hashes.SHA256())
    host = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dask-dl test host")])
    ips = [x509.IPAddress(ipaddress.ip_address(a)) for a in addrs]
    cert = (
        builder(host, key.public_key(), False)
        .add_extension(x509.SubjectAlternativeName(ips), critical=False)
        .add_extension(x509.ExtendedKeyUsage([Use.SERVER_AUTH, Use.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ca.pem").write_bytes(ca.public_bytes(pem))
    (folder / "cert.pem").write_bytes(cert.public_bytes(pem))
    private = serialization.PrivateFormat.PKCS8
    (folder / "key.pem").write_bytes(key.private_bytes(pem, private, serialization.NoEncryption()))
    return folder


@dataclass
class Cluster:
    address: str
    tls_dir: str


@pytest.fixture(scope="class")
def cluster(request, hosts, tmp_path_factory):
    """`dask scheduler` in namespace 0, one `dask worker` in each, over the class's protocol."""
    proto, a0 = request.cls.protocol, hosts.addrs[0]
    tls_dir = _certificates(tmp_path_factory.mktemp("tls"), hosts.addrs) if proto == "tls" else ""
    tls = (
        [
            "--tls-ca-file",
            tls_dir / "ca.pem",
            "--tls-cert",
            tls_dir / "cert.pem",
            "--tls-key",
            tls_dir / "key.pem",
        ]
        if tls_dir
        else []
    )
    info = hosts.logs / f"scheduler-{proto}.json"
    cmd = [
        BIN / "dask",
        "scheduler",
        "--protocol",
        proto,
        "--host",
        a0,
        "--port",
        8786,
        "--dashboard-address",
        f"{a0}:8787",
        "--scheduler-file",
        info,
        *tls,
    ]
    scheduler = hosts.spawn(0, cmd, f"scheduler-{proto}.log")
    mine = [scheduler]
    try:
        _wait_for("the scheduler", info.exists, scheduler, hosts.logs / f"scheduler-{proto}.log")
        address = json.loads(info.read_text())["address"]
        for i, addr in enumerate(hosts.addrs):
            # Its HTTP server (dashboard, /health) listens on every interface unless told.
            cmd = [
                BIN / "dask",
                "worker",
                address,
                "--protocol",
                proto,
                "--host",
                addr,
                "--dashboard-address",
                f"{addr}:0",
                "--nthreads",
                1,
                "--death-timeout",
                60,
                *tls,
            ]
            mine.append(hosts.spawn(i, cmd, f"worker-{proto}-{i}.log"))
        yield Cluster(address, str(tls_dir))
    finally:  # the next protocol's cluster starts afresh; a graceful stop is not under test
        _kill_trees(mine)


def _kill_trees(procs: list) -> None:
    """SIGKILL each process and its descendants (a nanny's worker, a worker's loaders)."""
    import psutil

    for proc in procs:
        try:
            tree = psutil.Process(proc.pid)
            tree = [tree, *tree.children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        for p in tree:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        proc.wait(timeout=10)


@pytest.fixture(scope="class")
def driven(request, hosts, s3_endpoint, cluster, tmp_path_factory):
    """One client session in namespace 0 (this file's :func:`main`): the helpers' DDP run,
    then, where the class asks, notebook 04 through papermill; their results."""
    folder = tmp_path_factory.mktemp(f"nb04-{request.cls.protocol}")
    args = dict(
        address=cluster.address,
        tls_dir=cluster.tls_dir,
        endpoint=s3_endpoint,
        folder=str(folder),
        notebook=request.cls.notebook,
    )
    done = hosts.run(0, [sys.executable, __file__, json.dumps(args)], DRIVER_TIMEOUT_S)
    if done.returncode:
        pytest.fail(f"the client's side failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    (line,) = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    return json.loads(line[len("RESULT ") :]) | {"folder": folder}


def _host(address: str) -> str:
    return address.split("://", 1)[-1].rsplit(":", 1)[0]


def _check_ranks(hosts, cluster, driven) -> None:
    proto, out = cluster.address.split("://")[0], driven["train"]
    ranks = out["ranks"]
    # One rank per host, rank 0's host the master: the first namespace's address, not loopback.
    assert [_host(r["worker"]) for r in ranks] == list(hosts.addrs)
    assert all(r["worker"].startswith(f"{proto}://") for r in ranks)
    assert [(r["rank"], r["local_rank"], r["local_world_size"]) for r in ranks] == [
        (0, 0, 1),
        (1, 0, 1),
    ]
    assert {r["master"] for r in ranks} == {hosts.addrs[0]}
    # Trained: finite loss, and the same weights on both hosts.
    epochs = [[h for h in r["history"] if h["kind"] == "epoch"] for r in ranks]
    assert all(len(e) == 1 and math.isfinite(e[0]["train_loss"]) for e in epochs), epochs
    assert epochs[0][0]["param_sum"] == epochs[1][0]["param_sum"]
    # Each worker process (Dask, rendezvous store, gloo) listens on its own host's address only.
    for r in ranks:
        assert len(r["listening"]) >= 2 and {ip for _, ip, _ in r["listening"]} == {
            _host(r["worker"])
        }, r["listening"]
    # The workers took the settings notebook 03 documents, from the config file.
    assert all(
        not f["daemon"] and f["MALLOC_TRIM_THRESHOLD_"] == "unset" for f in out["facts"].values()
    ), out["facts"]


def _check_notebook(hosts, cluster, driven) -> None:
    import nbformat
    import pandas as pd

    nb = nbformat.read(driven["notebook"], as_version=4)
    shown = {c.source: _text(c) for c in nb.cells if c.cell_type == "code"}
    (client,) = [t for s, t in shown.items() if s.startswith("client = cl.make_client(")]
    assert cluster.address in client  # the displayed client is the namespaces' scheduler
    proto = cluster.address.split("://")[0]
    listed = {_host(a) for a in re.findall(rf"{proto}://[0-9.]+:[0-9]+", client)}
    assert listed == set(hosts.addrs), client  # with its workers on both hosts
    (ranks,) = [t for s, t in shown.items() if '"param_sum"' in s]
    assert " 0 " in ranks and " 1 " in ranks  # both ranks reported
    metrics = pd.read_csv(driven["folder"] / "metrics.csv")
    losses = metrics[metrics["kind"] == "epoch"]["train_loss"]
    assert len(losses) == 1 and losses.map(math.isfinite).all(), metrics


def _listening_in(hosts, host: int) -> set[str]:
    """The addresses TCP sockets listen on in namespace ``host`` (its /proc/net/tcp, tcp6)."""
    found = set()
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        done = hosts.run(host, ["cat", f"/proc/net/{table}"], timeout=15)
        for line in done.stdout.splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A":  # LISTEN
                raw = bytes.fromhex(local.split(":")[0])
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                found.add(socket.inet_ntop(family, words))
    return found


def _text(cell) -> str:
    return "\n".join(
        o.get("text", "")
        + o.get("data", {}).get("text/plain", "")
        + o.get("data", {}).get("text/html", "")
        for o in cell.get("outputs", [])
    )


class TestTCP:
    """A plain `tcp://` cluster, driven by the helpers notebook 04 calls. (Notebook 04 itself
    runs over TLS below: the same cells; a second papermill run here would add ~50 s.)"""

    protocol, notebook = "tcp", False

    def test_two_ranks_train_across_two_hosts(self, hosts, cluster, driven):
        _check_ranks(hosts, cluster, driven)

    def test_everything_in_the_namespaces_listens_on_their_own_addresses(self, hosts, driven):
        """Scheduler, its dashboard, nannies, workers and the S3 server: on the namespace's
        address (SeaweedFS adds loopback twins of its ports), never on every interface."""
        for host, addr in enumerate(hosts.addrs):
            found = _listening_in(hosts, host)
            assert addr in found and found <= {addr, "127.0.0.1", "::1"}, found


class TestTLS:
    """The same over `tls://` with certificate files made here, and notebook 04 connecting
    with its ``cluster`` and ``tls_dir`` parameters."""

    protocol, notebook = "tls", True

    def test_two_ranks_train_across_two_hosts(self, hosts, cluster, driven):
        _check_ranks(hosts, cluster, driven)

    def test_notebook_04_connects_with_tls_dir_and_trains(self, hosts, cluster, driven):
        _check_notebook(hosts, cluster, driven)


def test_a_tls_address_needs_tls_dir_with_its_three_files(tmp_path):
    from helpers import cluster as cl

    with pytest.raises(ValueError, match="needs tls_dir"):
        cl.check_cluster("tls://10.0.0.5:8786")
    with pytest.raises(ValueError, match="is for a tls:// scheduler"):
        cl.check_cluster("tcp://10.0.0.5:8786", str(tmp_path))
    (tmp_path / "ca.pem").write_text("")
    with pytest.raises(FileNotFoundError, match=r"tls_dir=.* has no cert.pem, key.pem"):
        cl.make_client("tls://10.0.0.5:8786", tls_dir=str(tmp_path))


# --- the client's side, run inside namespace 0 ----------------------------------------------


def _listening() -> list:
    """The listening sockets of this worker process and its children."""
    import psutil

    me = psutil.Process()
    found = set()
    for p in [me, *me.children(recursive=True)]:
        for c in p.net_connections(kind="inet"):
            if c.status == psutil.CONN_LISTEN:
                found.add((p.pid, c.laddr.ip, c.laddr.port))
    return sorted(found)


def _train_and_look(cfg, options, *, rank, device):
    """notebook 04's rank function, then what this rank saw (while its process group is up)."""
    from helpers import train

    history = train.train_rank(cfg, options, rank=rank, device=device)
    return {
        "rank": rank.rank,
        "local_rank": rank.local_rank,
        "local_world_size": rank.local_world_size,
        "worker": rank.worker,
        "master": rank.master_addr,
        "listening": _listening(),
        "history": history,
    }


def _train(address: str, tls_dir: str, endpoint: str) -> dict:
    from helpers import cluster as cl
    from helpers import ddp, prepare
    from helpers.config import TrainConfig
    from helpers.s3.storage import storage_options

    options = storage_options(endpoint)  # signed with the AWS_* credentials of the environment
    prepare.ensure_synthetic(DATA_URL, options, TINY["n_breeds"], TINY["images_per_breed"])
    cfg = TrainConfig(DATA_URL, **TRAINING, data_format="objects", log_every=1)
    with cl.make_client(address, tls_dir=tls_dir, timeout="30s") as client:
        client.wait_for_workers(2, timeout=60)
        facts = client.run(cl.worker_facts)
        ranks = ddp.run(client, _train_and_look, cfg, options, timeout_s=90)
    return {"ranks": ranks, "facts": facts}


def _notebook(address: str, tls_dir: str, endpoint: str, folder: str) -> str:
    import papermill

    from helpers.run import runner

    (path,) = runner.notebook_paths(["04"])
    out = Path(folder) / path.name
    params = {
        **TINY,
        **TRAINING,
        "data_url": DATA_URL,
        "s3_endpoint": endpoint,
        "cluster": address,
        "tls_dir": tls_dir,
        "checkpoint_url": f"{DATA_URL}-runs/{address.split(':')[0]}",
    }
    papermill.execute_notebook(
        str(path),
        str(out),
        parameters=params,
        cwd=folder,
        kernel_name=runner.KERNEL,
        progress_bar=False,
        execution_timeout=DRIVER_TIMEOUT_S,
    )
    return str(out)


def main() -> None:
    """The client's side: ``python tests/test_twohost.py '{"address": ...}'``; its answer is
    the last line, ``RESULT {json}``."""
    import logging

    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = json.loads(sys.argv[1])
    wanted = args.pop("notebook")
    trained = _train(args["address"], args["tls_dir"], args["endpoint"])
    notebook = _notebook(**args) if wanted else None
    result = {"train": trained, "notebook": notebook}
    print("RESULT " + json.dumps(result, default=str), flush=True)


if __name__ == "__main__":
    main()
