"""The monitor: GPU utilisation sampled while a job runs (NVML replaced by a stand-in on the
workers)."""

import sys

import cloudpickle
import pytest

from helpers import ddp, monitor
from helpers.cluster import make_client
from helpers.show.lines import restart_line

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/


def _fake_nvml() -> None:
    """A stand-in ``pynvml`` in this worker: one GPU at 87% and 2 GB."""
    import types

    nvml = types.ModuleType("pynvml")
    nvml.NVMLError = type("NVMLError", (Exception,), {})
    nvml.nvmlInit = nvml.nvmlShutdown = lambda: None
    nvml.nvmlDeviceGetCount = lambda: 1
    nvml.nvmlDeviceGetHandleByIndex = lambda i: i
    nvml.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=2e9)
    nvml.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=87)
    sys.modules["pynvml"] = nvml


def _busy(*, rank, device):
    import time

    start = time.time()
    time.sleep(3)
    return start, time.time()


@pytest.mark.slow
def test_gpus_are_sampled_while_the_job_runs():
    with make_client("local", n_workers=2) as client:
        client.run(_fake_nvml)
        watch = monitor.Monitor(client, "gpu-sampling")
        (start, end), _ = watch.follow(ddp.start(client, _busy), refresh_s=0.5, gpus=True)
        watch.close()
    during = [g for g in watch.gpu if start <= g["time"] <= end]
    assert len({g["time"] for g in during}) >= 2  # several samples inside the job's span
    assert {g["util"] for g in during} == {87} and {g["gpu"] for g in during} == {0}


class _Client:
    """What a Monitor needs of a Dask client, when the test feeds it the records itself."""

    def subscribe_topic(self, topic, handler):
        self.handler = handler

    def unsubscribe_topic(self, topic):
        pass


def _step(epoch, step, steps=4):
    return {
        "kind": "step",
        "rank": 0,
        "epoch": epoch,
        "step": step,
        "steps": steps,
        "loss": 2.0,
        "acc": 0.1,
        "img_per_s": 50.0,
        "data_wait": 0.1,
    }


def test_a_restart_reaches_the_live_plot_and_the_cell_output(caplog):
    from concurrent.futures import Future

    import matplotlib

    matplotlib.use("Agg")
    from helpers import plots

    client = _Client()
    watch = monitor.Monitor(client, "t")
    restart = {
        "kind": "restart",
        "attempt": 1,
        "cause": "worker lost",
        "time": 0.0,
        "error": "WorkerLost: DDP rank 1: its worker tcp://127.0.0.1:4321 died",
    }
    for record in (_step(1, 1), _step(1, 2), restart, _step(1, 3)):
        client.handler((0.0, record))  # as Dask delivers them: (timestamp, record)
    axes = plots.live_training(watch)
    title = axes[0].figure._suptitle.get_text()
    assert "restart 1 (worker lost) at epoch 0.50: WorkerLost" in title, title
    assert "tcp://127.0.0.1:4321" in title and title.endswith(watch.latest_line())
    for ax in axes:  # a vertical line where training was when the worker was lost
        assert any(list(line.get_xdata()) == [0.5, 0.5] for line in ax.lines), ax.lines
    done = Future()
    done.set_result("history")
    with caplog.at_level("WARNING", logger="helpers.monitor"):
        assert watch.follow(done, draw=plots.live_training) == "history"
    told = [r.message for r in caplog.records if r.message.startswith("restart 1")]
    assert told == [restart_line(watch.restarts()[0])], caplog.text  # once


def test_the_live_plot_shows_every_epoch_however_fast_the_job_ran(monkeypatch):
    """Three epochs' records all arrived before the first refresh: still one picture each."""
    from concurrent.futures import Future

    import IPython.display
    import matplotlib

    matplotlib.use("Agg")
    from helpers import plots

    titles = []

    class Handle:
        def update(self, fig):
            titles.append(fig._suptitle.get_text())

    monkeypatch.setattr(IPython.display, "display", lambda *a, **k: Handle())
    client = _Client()
    watch = monitor.Monitor(client, "t")
    for epoch in (1, 2, 3):
        end = {
            "kind": "epoch",
            "rank": 0,
            "epoch": epoch,
            "train_loss": 2.0,
            "val_loss": 2.0,
            "val_top1": 0.3,
            "val_top5": 0.9,
            "train_img_per_s": 9.0,
            "epoch_s": 1.0,
        }
        for record in (_step(epoch, 2), _step(epoch, 4), end):
            client.handler((0.0, record))
    done = Future()
    done.set_result("history")
    assert watch.follow(done, refresh_s=60, draw=plots.live_training) == "history"
    assert [t.split(":")[0] for t in titles] == ["epoch 1 done", "epoch 2 done", "epoch 3 done"]


def test_where_each_rank_was_when_a_job_hung_reaches_the_cell_output(caplog):
    from concurrent.futures import Future

    client = _Client()
    watch = monitor.Monitor(client, "t")
    hung = {
        "kind": "stacks",
        "error": "RankHung: DDP rank 1 on worker tcp://127.0.0.1:9 made no progress for 130 s",
        "stacks": {"rank 0 on tcp://127.0.0.1:8": '  File "train.py", line 9, in all_reduce\n',
                   "rank 1 on tcp://127.0.0.1:9": '  File "loader.py", line 4, in _next_data\n'},
        "time": 0.0,
    }  # fmt: skip
    for record in (_step(1, 1), hung):
        client.handler((0.0, record))
    done = Future()
    done.set_exception(RuntimeError("the job hung"))
    with caplog.at_level("WARNING", logger="helpers.monitor"), pytest.raises(RuntimeError):
        watch.follow(done, refresh_s=0.01)
    told = "\n".join(r.getMessage() for r in caplog.records)
    assert "RankHung: DDP rank 1" in told and "Where each rank was" in told
    assert "--- rank 1 on tcp://127.0.0.1:9:\n" in told and "_next_data" in told
