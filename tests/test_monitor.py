"""The monitor: GPU utilisation sampled while a job runs (NVML replaced by a stand-in on the
workers), and make demo's check of notebook 04's claim."""

import json
import sys

import cloudpickle
import pytest

from helpers import ddp, demo, monitor
from helpers.cluster import make_client

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


def test_demo_fails_loudly_when_the_cnn_does_not_beat_its_baselines(tmp_path):
    path = tmp_path / "claim.json"
    claim = {
        "ResNet from scratch (validation top-1)": 0.40,
        "colour histogram (best of three)": 0.12,
        "chance (uniform)": 0.10,
        "chance (majority class)": 0.10,
    }
    path.write_text(json.dumps(claim))
    assert "ResNet from scratch (validation top-1) 40.0%" in demo.check_claim(path)
    path.write_text(json.dumps(claim | {"colour histogram (best of three)": 0.35}))
    with pytest.raises(RuntimeError, match="did not learn what colour and chance cannot"):
        demo.check_claim(path)
    assert demo.check_claim(path, strict=False).startswith("WARNING (04): the CNN did not learn")


def test_make_demo_fails_by_default_and_only_warns_when_asked(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "run", lambda *args: [])  # the notebooks "ran"; their claim below
    claim = tmp_path / "checkpoints" / "dogs" / "claim.json"
    claim.parent.mkdir(parents=True)
    claim.write_text(json.dumps({"ResNet from scratch (validation top-1)": 0.11,
                                 "chance (uniform)": 0.10}))  # fmt: skip
    with pytest.raises(RuntimeError, match="did not learn"):
        demo.summary(tmp_path)
    with pytest.raises(RuntimeError, match="did not learn"):
        demo.main(["--out", str(tmp_path / "notebooks")])
    demo.main(["--out", str(tmp_path / "notebooks"), "--warn-only"])
    assert "WARNING (04): the CNN did not learn" in capsys.readouterr().out
