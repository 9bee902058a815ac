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
