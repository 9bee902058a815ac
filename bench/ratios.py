"""Medians, ratios and targets of the loading benchmark's passes (pure functions, no I/O).

Ratios are of median img/s over the timed rounds, with the range of the per-round ratios (the
contenders run interleaved, so round ``r`` of two contenders saw the same load). A missed target
says what limits it: CPU per image of both sides, in the loader and in the S3 server, and the
one-process stage profile.
"""

from __future__ import annotations

import os

from bench import record, stages

# (name, numerator, denominator, target): ratios of median img/s
RATIOS = (
    ("shards / local-disk ImageFolder", "shards", "imagefolder", 1.0),
    ("per-object / local-disk ImageFolder", "objects", "imagefolder", 0.8),
    ("shards / webdataset (same shards)", "shards", "webdataset", 1.0),
    ("per-object / s3torchconnector", "objects", "s3torchconnector", 1.0),
    ("per-object / dask_pytorch_ddp S3ImageFolder", "objects", "dask_pytorch_ddp", 5.0),
)


def summarise(passes: list[dict]) -> dict[str, dict]:
    """Per ``contender/draft``: median, min and max img/s, CPU per image."""
    out: dict[str, dict] = {}
    for p in passes:
        out.setdefault(f"{p['contender']}/{'on' if p['draft'] else 'off'}", []).append(p)
    summary = {}
    for k, ps in out.items():
        rates = [p["img_per_s"] for p in ps]
        summary[k] = {
            "median_img_per_s": stages.median(rates),
            "min": min(rates),
            "max": max(rates),
            "passes": len(ps),
            "cpu_loader_ms_per_img": _per_image(ps, "cpu_loader_s"),
            "cpu_server_ms_per_img": _per_image(ps, "cpu_server_s"),
        }
    return summary


def _per_image(ps: list[dict], field: str) -> float:
    return round(stages.median([1000 * p[field] / max(1, p["images"]) for p in ps]), 2)


def ratios(passes: list[dict], summary: dict) -> dict[str, dict]:
    """Each ratio per draft column: median over median, and the range of per-round ratios."""
    out = {}
    for name, num, den, _ in RATIOS:
        for col in ("on", "off"):
            a, b = summary.get(f"{num}/{col}"), summary.get(f"{den}/{col}")
            if not a or not b:
                continue
            rate = {
                (p["contender"], p["round"]): p["img_per_s"]
                for p in passes
                if ("on" if p["draft"] else "off") == col
            }
            rounds = sorted({r for (_, r) in rate})
            per_round = [
                rate[num, r] / rate[den, r] for r in rounds if (num, r) in rate and (den, r) in rate
            ]
            out[f"{name}, draft {col}"] = {
                "median": round(a["median_img_per_s"] / b["median_img_per_s"], 3),
                "per_round_min": round(min(per_round), 3),
                "per_round_max": round(max(per_round), 3),
            }
    return out


def _why(num: str, den: str, col: str, summary: dict, profile: str) -> str:
    """What limits a missed ratio: CPU per image of both sides (loader, server), the profile."""
    a, b = summary[f"{num}/{col}"], summary[f"{den}/{col}"]
    return (
        f"{num}: {a['median_img_per_s']:.0f} img/s, CPU/img loader {a['cpu_loader_ms_per_img']} "
        f"ms + S3 server {a['cpu_server_ms_per_img']} ms; {den}: {b['median_img_per_s']:.0f} "
        f"img/s, loader {b['cpu_loader_ms_per_img']} ms + server {b['cpu_server_ms_per_img']} ms "
        f"(on {os.cpu_count()} cores, CPU-bound when CPU/img x img/s ~ cores). Stages, one "
        f"process: {profile}"
    )


def targets(
    ratio: dict,
    summary: dict,
    counted: dict,
    errors: dict,
    n_shards: int,
    workers: int,
    profile: str,
) -> list[dict]:
    """The issue's targets: every ratio in each draft column, and the shard path's GETs."""
    out = []
    for name, num, den, goal in RATIOS:
        for col in ("on", "off"):
            label = f"{name}, draft {col}"
            if label in ratio:
                value = ratio[label]["median"]
                why = None if value >= goal else _why(num, den, col, summary, profile)
                out.append(record.target(label, value, ">=", goal, why))
            elif col == "off" and (num in errors or den in errors):
                why = "; ".join(f"{k} failed: {errors[k]}" for k in (num, den) if k in errors)
                out.append(record.target(label, None, ">=", goal, why))
    gets = counted.get("shards", {}).get("shard_gets")  # not the index, read once per run
    out.append(
        record.target(
            f"GETs per epoch, shard path ({n_shards} shards, {workers} loader processes)",
            gets,
            "<=",
            n_shards + workers,
            None if gets is not None and gets <= n_shards + workers else str(counted.get("shards")),
        )
    )
    return out
