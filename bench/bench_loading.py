"""Data loading on equal terms: the shard path, the per-object path and the loaders users would
pick instead, on the same images in the same embedded S3 server, in one run.

Contenders (:mod:`contenders`): the shard stream (``helpers.stream``), the per-object dataset
(``helpers.objects``, no disk cache), torchvision's ``ImageFolder`` over a local copy (the
ceiling), ``s3torchconnector``'s map-style dataset, ``webdataset`` over the same shards, and
``dask_pytorch_ddp``'s ``S3ImageFolder``. All decode with ``transforms.decode_image`` and apply
one shared ``train_transform(size)`` object, in the same number of loader processes, batch size
and prefetch depth. JPEG draft decoding is a column: "on" for every contender that can use it,
"off" for all (``dask_pytorch_ddp`` decodes by itself: "off" only).

How: one untimed pass of each through a counting proxy (``helpers.s3proxy``): requests per
epoch, counted at the server side. Then ``passes`` timed rounds, the contenders interleaved
(round-robin) so a burst of load from elsewhere hits all alike; every pass is recorded with the
CPU seconds it cost the loader and the server. Ratios are of median img/s, with the range of
the per-round ratios. Finally a one-process stage profile (fetch, unpack, decode, transform).
The run writes a record under ``bench/results/`` (``bench/record.py``)::

    python -m bench.bench_loading --images photos      # photo-like JPEGs (bench/photos.py)
    python -m bench.bench_loading --images synthetic   # helpers.prepare's synthetic dogs
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import contenders as cn
from bench import photos, record, stages
from bench import ratios as rt
from helpers import data, measure, prepare
from helpers.loading import transforms
from helpers.s3 import proxy as s3proxy
from helpers.s3 import server as s3server

log = logging.getLogger("bench_loading")

URL = "s3://bench/dogs"  # SeaweedFS bucket names need at least 3 characters
# 960 training images a pass, ~3 s for the fast loaders: starting a pass's loader processes and
# their first GETs is a fixed cost, which weighed more on the 1.4 s passes of 480 images.
PER_BREED = 120
KEYS = ("shards", "objects", "imagefolder", "s3torchconnector", "webdataset", "dask_pytorch_ddp")


def time_pass(loader, delay: float = 0.0, meter: stages.CpuMeter | None = None) -> dict:
    """One pass timed as the notebooks time a loader (``measure.time_loader``), with the CPU it
    cost; ``delay`` s slept after each batch (a contender slowed on purpose)."""
    meter = meter or stages.CpuMeter(None)
    with meter:
        timed = measure.time_loader(_slowed(loader, delay) if delay else loader)
    del loader  # its processes end before the next contender starts
    return {**timed, **meter.result}


def _slowed(loader, delay: float):
    for batch in loader:
        yield batch
        time.sleep(delay)


def make_dataset(kind: str, breeds: int, per_breed: int, options: dict, seed: int):
    """Photo-like JPEGs or the synthetic dogs at :data:`URL`."""
    if kind == "photos":
        return photos.write_photos(URL, options, breeds, per_breed, seed)
    if kind == "synthetic":
        return prepare.write_synthetic(URL, options, breeds, per_breed, seed)
    raise ValueError(f"images={kind!r}; allowed: 'photos', 'synthetic'")


def counting_pass(c: cn.Contender, draft: bool, upstream: str) -> dict:
    """One untimed pass through the counting proxy (also the warm-up): requests by method."""
    with s3proxy.S3Proxy(upstream) as proxy, cn.environment(c.env(proxy.url)):
        result = time_pass(c.build(proxy.url, draft))
        counts = proxy.counts()
        log.debug("%s requests: %s", c.key, list(proxy.log))
        shard_gets = sum(1 for m, path in proxy.log if m == "GET" and path.endswith(".tar"))
    gets = counts["requests"].get("GET", 0)
    return {
        **result,
        "requests": counts["requests"],
        "shard_gets": shard_gets,
        "bytes_out": counts["bytes_out"],
        "gets_per_image": round(gets / max(1, result["images"]), 3),
    }


def request_cost(counted: dict[str, dict]) -> dict:
    """What each contender's GETs cost an epoch (:func:`helpers.measure.request_cost`): here,
    and scaled to the full Stanford Dogs for a whole run, at the price and date it states."""
    import pandas as pd

    rows = {k: {"images": c["images"], "GET requests": c["requests"].get("GET", 0)}
            for k, c in counted.items()}  # fmt: skip
    if not rows:
        return {}
    cost = measure.request_cost(pd.DataFrame.from_dict(rows, orient="index"))
    return {
        "price": f"{measure.S3_GET_USD_PER_1000} USD per 1,000 GETs ({measure.S3_GET_PRICE_AS_OF})",
        "by_contender": {
            k: {c: float(f"{v:.4g}") for c, v in row.items()}  # 4 significant digits
            for k, row in cost.to_dict(orient="index").items()
        },
    }


def timed_passes(
    cs: list[cn.Contender], rounds: int, endpoint: str, server_pid: int | None, delay: dict
) -> list[dict]:
    """``rounds`` rounds; in each, every (contender, draft) once, interleaved."""
    passes = []
    for r in range(rounds):
        for draft in (True, False):
            for c in cs:
                if draft not in c.drafts:
                    continue
                with cn.environment(c.env(endpoint)):
                    loader = c.build(endpoint, draft)
                    p = time_pass(loader, delay.get(c.key, 0.0), stages.CpuMeter(server_pid))
                passes.append({"round": r, "contender": c.key, "draft": draft, **p})
                log.info("round %d draft %-3s %-18s %s", r, "on" if draft else "off", c.key, p)
    return passes


def run(
    images: str = "photos",
    breeds: int = 10,
    per_breed: int = PER_BREED,
    image_size: int = 224,
    batch_size: int = 32,
    workers: int = 2,
    prefetch: int = 4,
    passes: int = 5,
    peer_limit: int = 96,
    shard_size: int = 48,
    seed: int = 0,
    only: tuple[str, ...] = KEYS,
    delay: dict[str, float] | None = None,
    profile: bool = True,
    out: str | None = None,
) -> dict[str, Any]:
    """Run the benchmark; return its record (written under ``out`` unless ``out=""``).

    ``delay``: seconds slept after each batch of a contender (to check that ratios move).
    """
    settings = {k: v for k, v in locals().items() if k not in ("out",)}
    settings["only"], settings["loadavg_before"] = list(only), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-loading-") as tmp:
        with s3server.EmbeddedS3(Path(tmp) / "s3") as server:
            options = server.storage_options
            manifest = make_dataset(images, breeds, per_breed, options, seed)
            index = prepare.write_shards(
                URL, options, val_fraction=0.2, seed=seed, shard_size=shard_size, manifest=manifest
            )
            train = index["splits"]["train"]
            s = cn.Settings(
                manifest,
                data.split(manifest, 0.2, seed).train,
                options,
                transforms.train_transform(image_size),
                image_size,
                batch_size,
                workers,
                prefetch,
                seed=seed,
            )
            local = cn.copy_to_local(s, Path(tmp) / "local")
            names = [e["name"] for e in train["shards"]]
            build = {
                "shards": lambda: cn.shards(s),
                "objects": lambda: cn.objects(s),
                "imagefolder": lambda: cn.imagefolder(s, local),
                "s3torchconnector": lambda: cn.s3torchconnector(s),
                "webdataset": lambda: cn.webdataset(s, names),
                "dask_pytorch_ddp": lambda: cn.dask_pytorch_ddp(s, peer_limit),
            }
            cs, counted, errors = [], {}, {}
            for key in only:
                try:
                    c = build[key]()
                    counted[key] = counting_pass(c, c.drafts[0], server.endpoint_url)
                    cs.append(c)
                except Exception as err:  # noqa: BLE001 - a peer that fails is reported, not fatal
                    errors[key] = f"{type(err).__name__}: {err}"[:500]
                    log.warning("%s left out: %s", key, errors[key])
            pid = server.proc.pid if server.proc else None
            all_passes = timed_passes(cs, passes, server.endpoint_url, pid, delay or {})
            costs = (
                stages.stage_costs(
                    URL, options, s.keys, names, local, s.transform, image_size, batch_size
                )
                if profile
                else {}
            )
    summary = rt.summarise(all_passes)
    ratio = rt.ratios(all_passes, summary)
    settings |= {
        "images_per_pass": {c.key: c.images for c in cs},
        "train_shards": len(names),
        "s3_backend": server.backend,
        "loadavg_after": os.getloadavg(),
    }
    results = {
        "summary": summary,
        "ratios": ratio,
        "requests_per_epoch": counted,
        "request_cost": request_cost(counted),
        "errors": errors,
        "stage_ms_per_image": costs,
        "calibration": photos.calibrate() if images == "photos" and profile else None,
    }
    rec = record.build(
        f"bench_loading-{images}",
        settings,
        all_passes,
        rt.targets(ratio, summary, counted, errors, len(names), workers, stages.describe(costs)),
        results,
        extra_versions=("s3torchconnector", "webdataset", "dask-pytorch-ddp"),
    )
    if out != "":
        rec["path"] = str(record.write(rec, out or record.RESULTS))
    return rec


def report(rec: dict) -> str:
    """The medians (with the range of passes), requests per epoch, ratios and targets."""
    cfg, res = rec["settings"], rec["results"]
    lines = [
        f"{rec['benchmark']}: {cfg['images_per_pass']} images per pass, {cfg['image_size']} "
        f"px, batch {cfg['batch_size']}, {cfg['workers']} loader processes, prefetch "
        f"{cfg['prefetch']}, {cfg['passes']} rounds, load {cfg['loadavg_before']}",
        "",
        f"{'contender/draft':<24} {'median img/s':>12} {'min':>7} {'max':>7} "
        f"{'GET/img':>8} {'CPU ms/img loader':>18} {'server':>7}",
    ]
    for k, v in res["summary"].items():
        gets = res["requests_per_epoch"].get(k.split("/")[0], {}).get("gets_per_image", "")
        cpu = f"{v['cpu_loader_ms_per_img']:>18} {v['cpu_server_ms_per_img']:>7}"
        lines.append(
            f"{k:<24} {v['median_img_per_s']:>12.1f} {v['min']:>7.1f} {v['max']:>7.1f}"
            f" {gets!s:>8} {cpu}"
        )
    lines.append("")
    for k, v in res["errors"].items():
        lines.append(f"{k} left out: {v}")
    for t in rec["targets"]:
        r = res["ratios"].get(t["name"], {})
        spread = f" (rounds {r['per_round_min']}-{r['per_round_max']})" if r else ""
        lines.append(
            f"{t['name']}: {t['value']}{spread}  target {t['op']} {t['target']}  "
            f"{'MET' if t['met'] else 'MISSED'}"
        )
    cost = res.get("request_cost") or {}
    if cost:
        lines += ["", f"GETs and their cost at {cost['price']}:"]
        for k, row in cost["by_contender"].items():
            lines.append(f"{k:<18} " + ", ".join(f"{c} {v:,.6g}" for c, v in row.items()))
    if res.get("stage_ms_per_image"):
        lines += ["", "stages, one process: " + stages.describe(res["stage_ms_per_image"])]
    if res.get("calibration"):
        lines += ["", photos.describe(res["calibration"])]
    return "\n".join(lines + ([f"record: {rec['path']}"] if "path" in rec else []))


def main(argv: list[str] | None = None) -> None:
    """Run with the command line's settings, print the report, write the record."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", choices=["photos", "synthetic"], default="photos")
    for name, default in (
        ("breeds", 10),
        ("per-breed", PER_BREED),
        ("image-size", 224),
        ("batch-size", 32),
        ("workers", 2),
        ("prefetch", 4),
        ("passes", 5),
        ("peer-limit", 96),
        ("shard-size", 48),
        ("seed", 0),
    ):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--only", nargs="+", choices=KEYS, default=list(KEYS))
    p.add_argument("--out", default=None, help="records folder (default bench/results)")
    args = vars(p.parse_args(argv))
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)
    args["only"] = tuple(args["only"])
    print(report(run(**{k.replace("-", "_"): v for k, v in args.items()})))


if __name__ == "__main__":
    main()
