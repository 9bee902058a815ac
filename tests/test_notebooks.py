"""Every notebook executed headless (papermill, small parameters), and nbval on the outputs kept
on purpose in the committed notebooks."""

import subprocess
import sys

import nbformat
import papermill
import pytest

from helpers import demo

pytestmark = [pytest.mark.notebook, pytest.mark.slow]

TINY_DOGS = {"data_url": "s3://dogs/notebooks", "images_per_breed": 12}
TINY_TRAINING = {"arch": "resnet18", "image_size": 32, "batch_size": 4, "max_steps": 3}
SMALL = {
    "01": {"array_side": 1_000, "chunk_side": 500},
    "02": {**TINY_DOGS, "n_eager": 20, "batch_size": 16, "image_size": 64},
    "03": {"cluster": "auto"},
    "04": {**TINY_DOGS, **TINY_TRAINING, "epochs": 2},
    "05": {"data_url": "s3://dogs/notebooks", "max_images": 40, "keys_per_task": 10},
    "06": {},
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


def _run(prefix, params, out_dir):
    (path,) = demo.notebook_paths([prefix])
    out = demo.execute(path, out_dir, params, html=True)
    nb = nbformat.read(out, as_version=4)
    errors = [o for outs in _outputs(nb).values() for o in outs if o.output_type == "error"]
    assert not errors
    assert out.with_suffix(".html").stat().st_size > 10_000
    return nb


@pytest.mark.parametrize("prefix", ["01", "02", "03"])
def test_notebook_runs_headless(prefix, s3, tmp_path):
    _run(prefix, _params(prefix, s3, tmp_path), tmp_path)


@pytest.fixture(scope="module")
def trained(s3, tmp_path_factory):
    """Notebook 04, small: its checkpoint folder is what notebook 05 reads."""
    out = tmp_path_factory.mktemp("nb04")
    _run("04", _params("04", s3, out), out)
    return out / "checkpoints"


def test_training_notebook_writes_checkpoint_and_metrics(trained):
    assert (trained / "checkpoint.pt").exists() and (trained / "metrics.csv").exists()


def test_inference_notebook_runs_on_the_checkpoint(s3, trained, tmp_path):
    params = {**_params("05", s3, tmp_path), "checkpoint_url": str(trained)}
    _run("05", params, tmp_path)
    assert (trained / "predictions.csv").exists()


def test_inference_notebook_names_a_missing_checkpoint(s3, tmp_path):
    with pytest.raises(papermill.PapermillExecutionError, match="no checkpoint at .*nowhere"):
        _run(
            "05",
            {**_params("05", s3, tmp_path), "checkpoint_url": str(tmp_path / "nowhere")},
            tmp_path,
        )


def test_sweep_runs_notebook_04_per_worker_count_and_06_plots_it(s3, tmp_path):
    from helpers import sweep

    params = {**TINY_DOGS, **TINY_TRAINING, "epochs": 1}
    executed = sweep.run([1, 2], tmp_path / "sweep", params, s3.data_dir)
    assert [p.parent.name for p in executed] == ["workers-1", "workers-2"]
    runs = sweep.results(tmp_path / "sweep")
    assert list(runs.workers) == [1, 2] and (runs.img_per_s > 0).all()
    _run("06", {"sweep_dir": str(tmp_path / "sweep")}, tmp_path)


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
        str(path), str(copy), parameters=_params(prefix, s3, tmp_path), prepare_only=True
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


def test_training_notebook_rejects_a_bad_parameter_in_its_first_cells(s3, tmp_path):
    params = {**_params("04", s3, tmp_path), "arch": "vgg16"}
    with pytest.raises(papermill.PapermillExecutionError, match="arch='vgg16'; allowed") as err:
        _run("04", params, tmp_path)
    assert err.value.exec_count <= 3  # before any data, cluster or training cell
