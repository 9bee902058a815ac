"""Every notebook executed headless (papermill, small parameters), and nbval on the outputs kept
on purpose in the committed notebooks."""

import subprocess
import sys

import nbformat
import papermill
import pytest

from helpers import demo

pytestmark = [pytest.mark.notebook, pytest.mark.slow]

SMALL = {
    "01": {"array_side": 1_000, "chunk_side": 500},
    "02": {
        "data_url": "s3://dogs/notebooks",
        "images_per_breed": 12,
        "n_eager": 20,
        "batch_size": 16,
        "image_size": 64,
    },
    "03": {"cluster": "auto"},
    "04": {
        "data_url": "s3://dogs/notebooks",
        "images_per_breed": 12,
        "arch": "resnet18",
        "image_size": 32,
        "epochs": 2,
        "batch_size": 4,
        "max_steps": 3,
    },
}
KEPT = ["01", "02"]  # notebooks with outputs kept on purpose, for nbval


def _params(prefix, s3, tmp_path):
    return {
        "s3_endpoint": "embedded",
        "s3_data_dir": str(s3.data_dir),
        "checkpoint_url": str(tmp_path / "checkpoints"),
        **SMALL[prefix],
    }


def _outputs(nb):
    return {c.id: c.outputs for c in nb.cells if c.cell_type == "code"}


@pytest.mark.parametrize("prefix", sorted(SMALL))
def test_notebook_runs_headless(prefix, s3, tmp_path):
    (path,) = demo.notebook_paths([prefix])
    out = demo.execute(path, tmp_path, _params(prefix, s3, tmp_path), html=True)
    nb = nbformat.read(out, as_version=4)
    errors = [o for outs in _outputs(nb).values() for o in outs if o.output_type == "error"]
    assert not errors
    assert out.with_suffix(".html").stat().st_size > 10_000


def test_every_notebook_is_tested():
    assert {p.name[:2] for p in demo.notebook_paths()} == set(SMALL)


@pytest.mark.parametrize("prefix", KEPT)
def test_kept_outputs_still_hold(prefix, s3, tmp_path):
    """nbval re-executes a copy with small parameters and compares the cells kept on purpose."""
    (path,) = demo.notebook_paths([prefix])
    nb = nbformat.read(path, as_version=4)
    kept = [c for c in nb.cells if c.metadata.get("keep_output")]
    assert kept and all(c.outputs for c in kept), "kept cells must carry their outputs"
    assert all("nbval-check-output" in c.metadata.get("tags", []) for c in kept)
    copy = tmp_path / path.name
    papermill.execute_notebook(
        str(path), str(copy), parameters=_params(prefix, s3), prepare_only=True
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--nbval-lax",
            "-q",
            "-p",
            "no:cacheprovider",
            "--nbval-current-env",
            str(copy),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:]
