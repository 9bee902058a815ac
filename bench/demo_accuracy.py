"""The demo's accuracy claims as a benchmark record, from the calibration runs behind them.

``bench/calibrate_demo.py`` appends one run per setting and seed to
``bench/results/calibration.json``. This script keeps the finished runs made with notebook 04's
defaults (the demo's image size, images per breed, epochs, batch, learning rate, warm-up, training
crops' smallest area and silhouette size; ``helpers.config.TrainConfig`` and ``helpers.synthetic``),
and writes one record (``bench/record.py``) whose passes are those runs, every one, and whose
targets are the claims:

- the colour baseline stays at or below 1.5x chance (the worst run);
- ResNet-50 from scratch reaches at least 3x chance on every seed, per data format;
- the shuffled-pixel control (same histograms, no structure) stays at or below 1.5x chance;
- shard-level shuffling costs no learning: the mean top-1 over seeds, shards minus objects,
  lies within the spread between seeds (the larger of the two formats' max - min);
- training fits the demo's time (``calibrate_demo.TRAIN_BUDGET_S``; the slowest run, with the
  load average it ran under in its pass).

    python -m bench.demo_accuracy            # write the record, print its targets
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from bench import calibrate_demo, record


def _demo_defaults() -> dict[str, Any]:
    """Notebook 04's defaults, read from where they live, under calibrate_demo.py's names."""
    import dataclasses
    import inspect

    from helpers import prepare
    from helpers.config import TrainConfig
    from helpers.loading import synthetic

    train = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    per_breed = inspect.signature(prepare.write_synthetic).parameters["per_breed"].default
    names = ("image_size", "epochs", "batch_size", "lr", "warmup_epochs", "crop_scale")
    return {k: train[k] for k in names} | {
        "images_per_breed": per_breed,
        "shape_area": list(synthetic.SHAPE_AREA),
    }


DEMO = _demo_defaults()


def demo_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The finished runs made with the demo's defaults."""
    return [
        r
        for r in runs
        if "status" not in r and all(r["settings"].get(k) == v for k, v in DEMO.items())
    ]


def passes(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One pass per run: what was trained and what it reached, in chance multiples too."""
    out = []
    for r in runs:
        s, chance = r["settings"], r["chance"]["uniform"]
        out.append(
            {
                "seed": s["seed"],
                "data_format": s.get("data_format", "objects"),
                "shuffle_pixels": s["shuffle_pixels"],
                "val_top1": r["val_top1"][-1],
                "val_top1_per_epoch": r["val_top1"],
                "colour_best": r["colour_baseline"]["best"],
                "chance": chance,
                "top1_over_chance": r["val_top1"][-1] / chance,
                "train_s": r["seconds"]["train_s"],
                "load_avg_1min": r["load_avg_1min"],
                "commit": r["environment"]["commit"],
            }
        )
    return out


def targets(done: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The claims as targets (a claim with no run behind it is a miss), and the numbers used."""
    cnn = [p for p in done if not p["shuffle_pixels"]]
    control = [p for p in done if p["shuffle_pixels"]]
    by_format = {
        f: [p["val_top1"] for p in cnn if p["data_format"] == f] for f in ("shards", "objects")
    }
    worst = {
        f: min((p["top1_over_chance"] for p in cnn if p["data_format"] == f), default=None)
        for f in by_format
    }
    results: dict[str, Any] = {"top1_by_format": by_format}
    gap = spread = None
    if all(len(v) >= 3 for v in by_format.values()):
        gap = statistics.mean(by_format["shards"]) - statistics.mean(by_format["objects"])
        spread = max(max(v) - min(v) for v in by_format.values())
        results |= {"mean_gap_shards_minus_objects": gap, "seed_spread": spread}
    colour = max((p["colour_best"] / p["chance"] for p in done), default=None)
    cmax = max((p["top1_over_chance"] for p in control), default=None)
    slowest = max((p["train_s"] for p in cnn), default=None)
    fewer = "fewer than 3 seeds of each format were run"
    out = [
        record.target("colour baseline / chance, worst run", colour, "<=", 1.5),
        record.target(
            "ResNet-50 top-1 / chance, worst seed, shards (the demo's path)",
            worst["shards"],
            ">=",
            3.0,
        ),
        record.target("ResNet-50 top-1 / chance, worst seed, objects", worst["objects"], ">=", 3.0),
        record.target("shuffled-pixel control top-1 / chance", cmax, "<=", 1.5),
        record.target(
            "mean top-1 gap, shards vs objects, / seed spread",
            None if gap is None else abs(gap) / spread if spread else float("inf"),
            "<=",
            1.0,
            None if gap is not None else fewer,
        ),
        record.target(
            "training seconds, slowest run",
            slowest,
            "<=",
            calibrate_demo.TRAIN_BUDGET_S,
            "the machine's load average in each pass",
        ),
    ]
    return out, results


def build(path: Path = calibrate_demo.RESULTS) -> dict[str, Any]:
    """The ``demo_accuracy`` record of the runs in ``path``."""
    done = passes(demo_runs(json.loads(path.read_text())["runs"]))
    found, results = targets(done)
    notes = [
        f"passes are the finished runs in {path.name} made with notebook 04's defaults {DEMO}; "
        "stopped runs and other settings are there too (calibrate_demo.py --report)",
        "the machine's load average in the table is when this record was written; each pass "
        "keeps the load average around its own training (load_avg_1min)",
    ]
    return record.build("demo_accuracy", DEMO, done, found, results, notes)


def main() -> None:
    rec = build()
    print(record.write(rec))
    for t in rec["targets"]:
        verdict = "met" if t["met"] else "MISSED"
        print(f"{t['name']}: {t['value']} {t['op']} {t['target']} -> {verdict}")


if __name__ == "__main__":
    main()
