"""The benchmarks run (tiny sizes) and write well-formed records; the loading benchmark's ratios
move when a contender is slowed on purpose; the README table is built from records."""

import importlib
import json
import statistics
from pathlib import Path

import pytest

TINY = {
    "breeds": 2,
    "per_breed": 10,
    "image_size": 32,
    "batch_size": 4,
    "workers": 1,
    "passes": 2,
    "peer_limit": 8,
    "shard_size": 4,
    "profile": False,
}


def _load(name):
    return importlib.import_module(f"bench.{name}")


@pytest.mark.bench
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
    cost = rec["results"]["request_cost"]
    assert "0.0004 USD per 1,000 GETs (S3 Standard, us-east-1, 2025" in cost["price"]
    for key, counted in rec["results"]["requests_per_epoch"].items():
        row = cost["by_contender"][key]
        assert row["GET requests"] == counted["requests"].get("GET", 0)  # local disk: none
        assert row["USD per epoch"] == pytest.approx(row["GET requests"] * 0.0004 / 1000, 1e-3)
    by = cost["by_contender"]
    assert by["shards"]["USD for 90 epochs"] < by["objects"]["USD for 90 epochs"] / 2
    label = "shards / local-disk ImageFolder, draft on"
    before = rec["results"]["ratios"][label]["median"]
    # Slowed on purpose: 0.3 s after each of the shard path's ~4 batches per pass.
    slowed = bench.run(
        "photos",
        **TINY | {"passes": 1},
        only=("shards", "imagefolder"),
        delay={"shards": 0.3},
        out="",
    )
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


@pytest.mark.bench
def test_gpu_route_benchmark_runs_on_cpu_too(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("on a GPU this is the full grid: bash bench/gpu_route.sh run")
    rec = _load("bench_gpu").run(str(tmp_path))  # without CUDA: its tiny CPU settings
    names = [p["name"] for p in rec["passes"]]
    assert names[:5] == [
        "synthetic",
        "shards/gpu (1, 2, 0)",
        "torchcodec shards/gpu (1, 2, 0)",
        "objects/gpu (1, 2, 0)",
        "shards/cpu (1, 2, 0)",
    ]  # the most telling first
    done = [p for p in rec["passes"] if p["status"] == "done"]
    assert [p["name"] for p in done] == [
        "synthetic",
        "shards/cpu (1, 2, 0)",
        "objects/cpu (1, 2, 0)",
    ]
    assert all(
        p["img_per_s"] > 0 and p["epochs"] and "next_batch" in p["wait_shares"] for p in done
    )
    assert rec["settings"]["s3_backend"] in ("seaweedfs", "moto")
    assert rec["device"]["torch"] and rec["device"]["gpu"] is None
    on_disk = json.loads(Path(rec["path"]).read_text())  # the last rewrite: every pass
    assert [p["status"] for p in on_disk["passes"]] == [p["status"] for p in rec["passes"]]
    assert [f.name for f in tmp_path.glob("bench_gpu-*.json")] == [Path(rec["path"]).name]
    assert len(rec["targets"]) == 5 and not any(t["met"] for t in rec["targets"])  # no GPU here
    assert all("CUDA" in why for why in rec["results"]["skipped"].values())


def test_decoder_benchmark_times_both_decoders_and_records_the_adoption_targets(tmp_path):
    bench = _load("decoders")
    result = bench.run(images=4, sizes=(32, 64), rounds=2)
    cpu = result["times"]["cpu 64 px"]
    assert set(cpu) == {"pil", "pil-full", "torchvision", "torchcodec", "pil+augment",
                        "torchcodec+augment", "torchcodec-as-pil+augment"}  # fmt: skip
    assert all(len(v) == 2 and min(v) > 0 for v in cpu.values())
    r = result["ratios"]["cpu 64 px"]["torchcodec+augment / pil+augment"]
    today, codec = (statistics.median(cpu[k]) for k in ("pil+augment", "torchcodec+augment"))
    assert r["median"] == pytest.approx(today / codec, abs=1e-3)  # speed: today's time / its
    rec = bench.to_record(result)
    names = [t["name"] for t in rec["targets"]]
    assert len(names) == 3 and "cpu, 32 px" in names[0] and "cuda, 64 px" in names[2]
    assert rec["targets"][0]["value"] == result["ratios"]["cpu 32 px"][
        "torchcodec+augment / pil+augment"]["median"]  # fmt: skip
    assert rec["versions"]["torchcodec"]


@pytest.mark.bench
def test_gpu_route_stops_within_its_budget_and_marks_the_rest_not_run(tmp_path):
    bench = _load("bench_gpu")
    rec = bench.run(str(tmp_path), budget_s=0.01)  # spent by the setup: only the first pass runs
    status = {p["name"]: (p["status"], p.get("why", "")) for p in rec["passes"]}
    assert status["synthetic"][0] == "done"
    assert status["shards/cpu (1, 2, 0)"][0] == "not run"
    assert status["shards/cpu (1, 2, 0)"][1].startswith("time budget")
    assert status["shards/gpu (1, 2, 0)"] == ("skipped", "decode='gpu' needs CUDA")


@pytest.mark.bench
def test_ddp_benchmark_compares_both_launchers():
    bench = _load("bench_ddp")
    result = bench.run(steps=2, warmup=1, repeats=1)
    assert {"dask", "torchrun"} <= set(result["best"])
    assert len(bench.to_record(result)["targets"]) == 2


def test_readme_table_says_what_the_committed_records_say():
    record = _load("record")
    assert record.report(check=True), "README's benchmark table is stale: run make bench-report"


def test_demo_accuracy_record_checks_every_claim_against_its_runs():
    acc = _load("demo_accuracy")

    def run(seed, fmt, top1, shuffle=False, train_s=300.0):
        return {
            "environment": {"commit": "abc"},
            "val_top1": [0.1, top1],
            "settings": acc.DEMO | {"seed": seed, "data_format": fmt, "shuffle_pixels": shuffle},
            "chance": {"uniform": 0.1},
            "colour_baseline": {"best": 0.11},
            "seconds": {"train_s": train_s},
            "load_avg_1min": {},
        }

    runs = [run(s, f, 0.35 + s / 100) for s in range(3) for f in ("shards", "objects")]
    runs += [run(0, "shards", 0.12, shuffle=True), run(0, "objects", 0.9) | {"status": "stopped"}]
    runs += [{**run(5, "shards", 0.9), "settings": acc.DEMO | {"epochs": 3, "seed": 5}}]
    done = acc.passes(acc.demo_runs(runs))
    assert len(done) == 7  # the stopped run and the other setting are not the demo's
    met = {t["name"]: t["met"] for t in acc.targets(done)[0]}
    assert all(met.values()), met
    worse = done[:-1] + [done[-1] | {"top1_over_chance": 2.0}]  # the control learned
    assert not all(t["met"] for t in acc.targets(worse)[0])
    low = [p | {"top1_over_chance": 2.5} if p["data_format"] == "shards" else p for p in done]
    assert not {t["name"]: t["met"] for t in acc.targets(low)[0]}[
        "ResNet-50 top-1 / chance, worst seed, shards (the demo's path)"
    ]
    gap = [
        p | {"val_top1": p["val_top1"] + 0.2} if p["data_format"] == "shards" else p for p in done
    ]
    assert not {t["name"]: t["met"] for t in acc.targets(gap)[0]}[
        "mean top-1 gap, shards vs objects, / seed spread"
    ]
    few = [p for p in done if p["seed"] == 0]
    assert not all(t["met"] for t in acc.targets(few)[0])


@pytest.mark.bench
def test_fsdp_benchmark_measures_both_strategies_and_records_both_targets(tmp_path):
    bench = _load("bench_fsdp")
    result = bench.run(arch="resnet18", batch=4, image=32, steps=2, repeats=1)
    strategies = {(p["strategy"], p["rank"]) for p in result["passes"]}
    assert strategies == {("ddp", 0), ("ddp", 1), ("fsdp", 0), ("fsdp", 1)}
    assert 0.45 < result["median_ratios"]["state"] < 0.55  # half the state, measured
    targets = bench.to_record(result)["targets"]
    assert [t["target"] for t in targets] == [bench.STATE_TARGET, bench.STEP_TARGET]
    assert targets[0]["met"]


def test_demo_runtimes_hold_each_statement_to_the_time_measured():
    bench = _load("demo_runtimes")
    assert bench.stated_seconds("516 s (under 9 minutes) with the defaults") == 516
    passes = [
        {"notebook": "04-x.ipynb", "seconds": 600.0, "stated_s": 516.0},
        {"notebook": "03-x.ipynb", "seconds": 12.0, "stated_s": 4.0},  # within 10 s: true
        {"notebook": "07-x.ipynb", "seconds": 400.0, "stated_s": 165.0},  # 2.4x: not true
        {"notebook": "sweep", "seconds": 150.0, "stated_s": None},  # states nothing
    ]
    rec = bench.to_record({"passes": passes, "wall_s": 1.0, "sweep_workers": [1, 2]})
    met = {t["name"]: t["met"] for t in rec["targets"]}
    assert len(met) == 6
    assert met["04-x.ipynb: seconds, stated 516 (at most)"]
    assert met["04-x.ipynb: seconds, stated 516 (at least)"]
    assert met["03-x.ipynb: seconds, stated 4 (at most)"]
    assert not met["07-x.ipynb: seconds, stated 165 (at most)"]
