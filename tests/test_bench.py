"""The benchmarks run (tiny sizes): their numbers are quoted in issue notes, so they must work."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_loading_benchmark_measures_every_loader():
    result = _load("bench_loading").run(3, 8, 64, 4, 1, peer_limit=8, repeats=1)
    assert {"a", "a+", "b", "c"} <= set(result["loaders"])
    assert all(r["images"] > 0 and r["img_per_s"] > 0 for r in result["loaders"].values())
    assert set(result["ratios"]) == {"(a)/(b)", "(a+)/(b)", "(a)/(c)"}


@pytest.mark.slow
def test_gpu_route_benchmark_runs_on_cpu_too(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("on a GPU this is the full grid: bash bench/gpu_route.sh run")
    rec = _load("bench_gpu").run(str(tmp_path))  # without CUDA: its tiny CPU settings
    names = [p["name"] for p in rec["passes"]]
    assert names[0] == "synthetic" and any(n.startswith("shards/cpu") for n in names)
    assert any(n.startswith("objects/cpu") for n in names)
    assert all(p["img_per_s"] > 0 and p["epochs"] for p in rec["passes"])
    assert rec["settings"]["s3_backend"] in ("seaweedfs", "moto")
    assert [f.name for f in tmp_path.glob("bench_gpu-*.json")] == [Path(rec["path"]).name]
    assert len(rec["targets"]) == 5 and not any(t["met"] for t in rec["targets"])  # no GPU here
    assert all("CUDA" in why for why in rec["results"]["skipped"].values())


@pytest.mark.slow
def test_ddp_benchmark_compares_both_launchers():
    result = _load("bench_ddp").run(steps=2, warmup=1, repeats=1)
    assert {"dask", "torchrun"} <= set(result["best"])
