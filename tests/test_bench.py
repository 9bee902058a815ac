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
def test_gpu_benchmark_runs_on_cpu_too():
    result = _load("bench_gpu").run(
        breeds=2, per_breed=6, image_size=32, batch_size=4, workers=1, warmup=1, steps=2
    )
    pipelines = result["pipelines"]
    assert pipelines["synthetic"]["img_per_s"] > 0 and pipelines["real"]["img_per_s"] > 0


@pytest.mark.slow
def test_ddp_benchmark_compares_both_launchers():
    result = _load("bench_ddp").run(steps=2, warmup=1, repeats=1)
    assert {"dask", "torchrun"} <= set(result["best"])
