"""The benchmarks run (tiny sizes) and write well-formed records; the loading benchmark's ratios
move when a contender is slowed on purpose; the README table is built from records."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
TINY = {"breeds": 2, "per_breed": 10, "image_size": 32, "batch_size": 4, "workers": 1,
        "passes": 2, "peer_limit": 8, "shard_size": 4, "profile": False}  # fmt: skip


def _load(name):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))  # the scripts import their siblings (record, photos)
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_loading_benchmark_records_every_contender_and_its_ratios_move(tmp_path):
    bench = _load("bench_loading")
    rec = bench.run("photos", **TINY, out=str(tmp_path))
    on_disk = json.loads(Path(rec["path"]).read_text())
    for field in ("benchmark", "commit", "date", "machine", "versions", "settings", "passes"):
        assert on_disk[field], field
    assert not rec["results"]["errors"]
    assert {p["contender"] for p in rec["passes"]} == set(bench.KEYS)
    assert all(p["images"] > 0 and p["seconds"] > 0 for p in rec["passes"])
    names = {t["name"] for t in rec["targets"]}
    assert {f"{n}, draft off" for n, *_ in bench.rt.RATIOS} <= names
    assert {"met", "value", "target", "op"} <= set(rec["targets"][0])
    label = "shards / local-disk ImageFolder, draft on"
    before = rec["results"]["ratios"][label]["median"]
    # Slowed on purpose: 0.3 s after each of the shard path's ~4 batches per pass.
    slowed = bench.run("photos", **TINY | {"passes": 1}, only=("shards", "imagefolder"),
                       delay={"shards": 0.3}, out="")  # fmt: skip
    assert slowed["results"]["ratios"][label]["median"] < 0.6 * before


def test_readme_table_is_built_from_the_newest_record_of_each_benchmark(tmp_path):
    record = _load("record")
    old = record.build("bench_x", {"a": 1}, [{"s": 1}], [record.target("r", 0.5, ">=", 1.0)])
    new = record.build("bench_x", {"a": 1}, [{"s": 1}], [record.target("r", 1.5, ">=", 1.0)])
    old["date"], new["date"] = "2026-01-01T00:00:00+00:00", "2026-02-01T00:00:00+00:00"
    new["versions"]["torch"] = "2.0.0"
    for rec in (old, new):
        record.write(rec, tmp_path / "results")
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Benchmarks\n\n{record.START}\nstale\n{record.END}\n\nrest\n")
    assert not record.report(readme, tmp_path / "results", check=True)
    assert record.report(readme, tmp_path / "results")
    text = readme.read_text()
    assert "stale" not in text and text.endswith("rest\n")
    assert "| 1.50 | >= 1.00 | yes |" in text and "0.50" not in text  # the newest only
    assert "not the pinned" in text and "bench_x-20260201" in text
    assert record.report(readme, tmp_path / "results", check=True)


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
    bench = _load("bench_ddp")
    result = bench.run(steps=2, warmup=1, repeats=1)
    assert {"dask", "torchrun"} <= set(result["best"])
    assert len(bench.to_record(result)["targets"]) == 2
