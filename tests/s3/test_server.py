"""The embedded S3 server: reused by the notebooks' s3_endpoint='embedded', its data kept across a
restart, gone with the process that started it."""

import time

import pytest

from helpers import data
from helpers.s3 import server as s3server
from helpers.s3 import storage


def test_connect_rejects_unknown_endpoint_naming_allowed_values():
    with pytest.raises(ValueError, match="s3_endpoint='s3.amazonaws.com'.*'embedded'"):
        data.connect("s3.amazonaws.com")


def test_connect_reuses_the_running_server(s3):
    options = data.connect("embedded", s3.data_dir)
    assert options["endpoint_url"] == s3.endpoint_url


def test_server_data_survives_a_restart(tmp_path):
    with s3server.EmbeddedS3(tmp_path) as first:
        fs = storage.filesystem("s3://keep", first.storage_options)
        fs.mkdir("keep")
        fs.pipe_file("keep/a.txt", b"kept")
    assert s3server.running_server(tmp_path) is None  # stopped, server.json removed
    with s3server.EmbeddedS3(tmp_path) as second:
        fs = storage.filesystem("s3://keep", second.storage_options)
        assert fs.cat_file("keep/a.txt") == b"kept"


def test_server_dies_with_the_process_that_started_it(tmp_path):
    import json
    import os
    import subprocess
    import sys

    code = (
        "import os; from helpers import data; "
        f"data.connect('embedded', {str(tmp_path)!r}); os._exit(0)"  # no atexit, like a kernel
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    pid = json.loads((tmp_path / s3server.SERVER_FILE).read_text())["pid"]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"the embedded server (pid {pid}) outlived its owner")
    assert s3server.running_server(tmp_path) is None


def _listening(pid: int) -> set[tuple[str, int]]:
    """``(address, port)`` of the sockets listening in process ``pid`` and its children."""
    import psutil

    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return {
        (c.laddr.ip, c.laddr.port)
        for p in procs
        for c in p.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    }


def test_off_loopback_the_fixed_credentials_are_refused_and_only_s3_leaves_loopback(tmp_path):
    import json
    import os
    import stat
    import urllib.parse

    from helpers.s3 import retry

    # 127.0.0.2: bindable on Linux's loopback, standing in for an address others can reach.
    with s3server.EmbeddedS3(tmp_path, host="127.0.0.2") as server:
        options = server.storage_options
        assert options["endpoint_url"].startswith("http://127.0.0.2:")
        assert options["key"] != s3server.DUMMY_CREDENTIALS["key"]
        fs = storage.filesystem("s3://off", options)
        fs.mkdir("off")
        fs.pipe_file("off/a.txt", b"served")
        assert fs.cat_file("off/a.txt") == b"served"  # the generated credentials work
        fixed = storage.filesystem("s3://off", {**options, **s3server.DUMMY_CREDENTIALS})
        with pytest.raises(PermissionError) as refused:
            fixed.cat_file("off/a.txt")
        assert retry.status(refused.value) == 403
        # Its credentials are in server.json, for the owner only: connect() reuses the server.
        path = tmp_path / s3server.SERVER_FILE
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert json.loads(path.read_text())["key"] == options["key"]
        assert data.connect("embedded", tmp_path) == options
        # Only S3 listens on the address given: SeaweedFS's master, volume and filer, and the
        # S3 gateway's gRPC port (which reconfigures identities unauthenticated), on loopback.
        s3_port = urllib.parse.urlsplit(server.endpoint_url).port
        listening = _listening(os.getpid()) | _listening(server.proc.pid)
        assert {(ip, port) for ip, port in listening if ip != "127.0.0.1"} == {
            ("127.0.0.2", s3_port)
        }
        weed = {ip for ip, _ in _listening(server.proc.pid)}
        assert weed == {"127.0.0.1"}, listening


def test_off_loopback_a_server_that_cannot_check_credentials_is_refused(tmp_path):
    with pytest.raises(ValueError, match="backend='moto'.*127.0.0.2"):
        s3server.EmbeddedS3(tmp_path, backend="moto", host="127.0.0.2")
    with pytest.raises(ValueError, match="fixed credentials"):
        s3server.EmbeddedS3(tmp_path, host="127.0.0.2", credentials=s3server.DUMMY_CREDENTIALS)


def test_the_command_line_names_itself_as_it_was_run(monkeypatch, capsys):
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "helpers.s3.server", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert out.startswith("usage: python -m helpers.s3.server serve")
    assert "--credentials-from-env" in out
    monkeypatch.setattr(sys, "argv", ["/venv/bin/dask-dl-s3", "--help"])  # the entry point
    with pytest.raises(SystemExit):
        s3server.main()
    assert capsys.readouterr().out.startswith("usage: dask-dl-s3 ")
