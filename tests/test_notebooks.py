"""Every notebook executed headless (papermill, small parameters), and nbval on the outputs kept
on purpose in the committed notebooks."""

import os
import signal
import subprocess
import sys
import threading
import time

import nbformat
import papermill
import pytest

from helpers.run import runner

pytestmark = [pytest.mark.notebook, pytest.mark.slow]

TINY_DOGS = {"data_url": "s3://dogs/notebooks", "images_per_breed": 12}
TINY_TRAINING = {"arch": "resnet18", "image_size": 32, "batch_size": 4, "max_steps": 3}
SMALL = {
    "01": {"array_side": 1_000, "chunk_side": 500},
    "02": {**TINY_DOGS, "batch_size": 16, "image_size": 64},
    "03": {"cluster": "auto"},
    "04": {**TINY_DOGS, **TINY_TRAINING, "epochs": 2},
    "05": {"data_url": "s3://dogs/notebooks", "max_images": 40, "keys_per_task": 10},
    "06": {},
    "07": {**TINY_DOGS, "arch": "resnet18", "image_size": 32, "max_steps": 2},
}
KEPT = ["01", "02"]  # notebooks with outputs kept on purpose, for nbval


def _params(prefix, s3, tmp_path):
    return {
        "s3_endpoint": "embedded",
        "s3_data_dir": str(s3.data_dir),
        "checkpoint_url": str(tmp_path / "checkpoints"),
        **SMALL[prefix],
    }


def _run(prefix, params, out_dir):
    """Execute (papermill raises on any error) and check the HTML export is this notebook's."""
    (path,) = runner.notebook_paths([prefix])
    out = runner.execute(path, out_dir, params, html=True)
    nb = nbformat.read(out, as_version=4)
    title = nb.cells[0].source.splitlines()[0].lstrip("# ").split(" · ")[1]
    html = out.with_suffix(".html").read_text()
    assert title.replace("&", "&amp;") in html and html.count("data:image/png;base64") >= _figures(
        nb
    )
    return nb


def _figures(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


def _output(nb, needle: str) -> str:
    """The text (or the kinds of data) the code cell containing ``needle`` displayed."""
    (cell,) = [c for c in nb.cells if c.cell_type == "code" and needle in c.source]
    parts = []
    for o in cell.outputs:
        parts.append(o.get("text", "") + o.get("data", {}).get("text/plain", ""))
        parts += list(o.get("data", {}))
    return "\n".join(parts)


def test_dask_basics_notebook(s3, tmp_path, capfd):
    nb = _run("01", _params("01", s3, tmp_path), tmp_path)
    said = capfd.readouterr()  # the kernel's own stderr is this process's
    assert "without encryption" not in said.err + said.out  # over IPC: no TCP port to warn of
    assert "[1, 2, 3, 4, 5, 6]" in _output(nb, "client.gather(futures)")
    assert "7 partitions -> a graph of" in _output(nb, "by_name.__dask_graph__()")
    assert "Dask DataFrame Structure" in _output(nb, "dask.datasets.timeseries(")


def test_lazy_loading_notebook(s3, tmp_path):
    nb = _run("02", _params("02", s3, tmp_path), tmp_path)
    assert "Dask DataFrame Structure" in _output(nb, "dd.from_delayed(")
    table = _output(nb, "seconds to first batch")
    assert "eager (whole split decoded)" in table and "lazy (keys + one batch)" in table
    assert "image/png" in _output(nb, "plots.image_grid(images")
    cost = _output(nb, "measure.request_cost(formats)")  # what the epoch's GETs cost
    assert "USD per epoch" in cost and "USD for 90 epochs" in cost and "shards" in cost


def test_cluster_notebook(s3, tmp_path):
    nb = _run("03", _params("03", s3, tmp_path), tmp_path)
    facts = _output(nb, "client.run(cl.worker_facts)")
    assert "daemon" in facts and "False" in facts and "True" not in facts


def _kernel_workers(since: float) -> list:
    """The Dask worker processes of the notebook kernel started after ``since``: the kernel's
    children that multiprocessing spawned."""
    import psutil

    kernels = [p for p in psutil.process_iter(["cmdline", "create_time"])
               if "ipykernel_launcher" in " ".join(p.info["cmdline"] or [])
               and p.info["create_time"] >= since]  # fmt: skip
    return [c for k in kernels for c in k.children()
            if "spawn_main" in " ".join(c.cmdline())]  # fmt: skip


@pytest.fixture(scope="module")
def nb04(s3, tmp_path_factory):
    """Notebook 04, small, with chaos: one of its workers is SIGKILLed from outside mid-epoch,
    once the first mid-epoch checkpoint is written; with ``max_restarts=1`` the notebook must
    complete. Its checkpoint folder is what notebook 05 reads."""
    out = tmp_path_factory.mktemp("nb04")
    params = {**_params("04", s3, out), "max_restarts": 1, "checkpoint_every": 2, "max_steps": 0}
    began, done, killed = time.time() - 1, threading.Event(), []

    def kill_a_worker_mid_epoch():
        first = out / "checkpoints" / "checkpoint.pt"
        while not done.is_set() and not killed:
            workers = _kernel_workers(began) if first.exists() else []
            if workers:
                os.kill(workers[-1].pid, signal.SIGKILL)
                killed.append(workers[-1].pid)
            time.sleep(0.05)

    threading.Thread(target=kill_a_worker_mid_epoch, daemon=True).start()
    try:
        nb = _run("04", params, out)
    finally:
        done.set()
    return nb, out / "checkpoints", killed


@pytest.fixture(scope="module")
def trained(nb04):
    return nb04[1]


def test_training_notebook_completes_through_a_killed_worker_and_shows_its_run(nb04):
    nb, folder, killed = nb04
    assert killed, "no worker of the notebook's cluster was found to kill"
    live = _output(nb, "watch.follow(job")
    assert "restart 1 (worker lost) at epoch" in live  # the cell's output, beside the plot
    assert "image/png" in live  # the live figure
    assert (folder / "checkpoint.pt").exists() and (folder / "metrics.csv").exists()
    assert "image/png" in _output(nb, "watch.follow(job")  # the live figure
    claim = _output(nb, "claim = {")
    assert "colour histogram (best of three)" in claim and "ResNet from scratch" in claim
    assert "chance (uniform)" in claim and "0.1" in claim  # 10 breeds
    assert "the CNN reaches" in _output(nb, "the CNN reaches")
    assert (folder / "claim.json").exists()
    ranks = _output(nb, '"param_sum"')
    assert " 0 " in ranks and " 1 " in ranks  # both ranks reported


def test_inference_notebook_runs_on_the_checkpoint(s3, trained, tmp_path):
    params = {**_params("05", s3, tmp_path), "checkpoint_url": str(trained)}
    nb = _run("05", params, tmp_path)
    assert (trained / "predictions.csv").exists()
    builds = _output(nb, "client.run(inference.builds)")
    assert builds.count(": 1") == 2, builds  # each of the 2 workers built the model once


def test_inference_notebook_names_a_missing_checkpoint(s3, tmp_path):
    with pytest.raises(papermill.PapermillExecutionError, match="no checkpoint at .*nowhere"):
        _run(
            "05",
            {**_params("05", s3, tmp_path), "checkpoint_url": str(tmp_path / "nowhere")},
            tmp_path,
        )


def test_sweep_runs_notebook_04_per_worker_count_and_06_plots_it(s3, tmp_path):
    from helpers.run import sweep

    params = {**TINY_DOGS, **TINY_TRAINING, "epochs": 1}
    executed = sweep.run([1, 2], tmp_path / "sweep", params, s3.data_dir)
    assert [p.parent.name for p in executed] == ["workers-1", "workers-2"]
    runs = sweep.results(tmp_path / "sweep")
    assert list(runs.workers) == [1, 2] and (runs.img_per_s > 0).all()
    _run("06", {"sweep_dir": str(tmp_path / "sweep")}, tmp_path)


def test_fsdp_notebook_trains_the_model_ddp_cannot_fit(s3, tmp_path):
    """Notebook 07: the per-rank state measured for both strategies, the big model's DDP job
    failing on the workers' memory limit, and FSDP training it on the same workers."""
    params = {"s3_endpoint": "embedded", "s3_data_dir": str(s3.data_dir), **SMALL["07"]}
    nb = _run("07", params, tmp_path)
    assert "state 0.50x" in _output(nb, "by = {")
    failed = _output(nb, 'jobs[big_arch, "ddp"]')
    assert "WorkerLost" in failed and "went over its memory limit" in failed
    assert "wide_resnet101_2" in _output(nb, 'jobs[big_arch, "fsdp"]')


def test_every_notebook_is_tested():
    assert {p.name[:2] for p in runner.notebook_paths()} == set(SMALL)


@pytest.mark.parametrize("prefix", KEPT)
def test_kept_outputs_still_hold(prefix, s3, tmp_path):
    """nbval re-executes a copy with small parameters and compares the cells kept on purpose."""
    (path,) = runner.notebook_paths([prefix])
    nb = nbformat.read(path, as_version=4)
    kept = [c for c in nb.cells if c.metadata.get("keep_output")]
    assert kept and all(c.outputs for c in kept), "kept cells must carry their outputs"
    assert all("nbval-check-output" in c.metadata.get("tags", []) for c in kept)
    copy = tmp_path / path.name
    papermill.execute_notebook(
        str(path), str(copy), parameters=_params(prefix, s3, tmp_path), prepare_only=True
    )
    # nbstripout (the commit filter) keeps the kept cells' outputs but drops every execution
    # count; nbval takes a cell with outputs and no count for an error, so number them here.
    prepared = nbformat.read(copy, as_version=4)
    for n, cell in enumerate(c for c in prepared.cells if c.metadata.get("keep_output")):
        cell.execution_count = n + 1
    nbformat.write(prepared, copy)
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
