"""Run the notebooks headless with papermill: ``make demo`` (and the notebook tests).

Starts an embedded S3 server (or reuses one serving the same folder), executes each notebook in
order with its parameters, writes the executed copies and an HTML export of each under
``build/notebooks/``, and prints where they are::

    python -m helpers.run.demo                     # every notebook, demo parameters
    python -m helpers.run.demo --only 02 -p images_per_breed=40
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from helpers.errors import ClaimMissed
from helpers.run import runner, sweep
from helpers.run.runner import ROOT

log = logging.getLogger(__name__)


def run(
    only: list[str] | None,
    out_dir: Path,
    overrides: dict,
    s3_dir: Path,
    html: bool = True,
    sweep_workers: list[int] | None = None,
) -> list[tuple[Path, float]]:
    """Execute the notebooks in order against the embedded S3 server.

    With ``sweep_workers``, the scaling sweep (notebook 04 per worker count) runs before the
    notebook that plots it (06). Returns each executed notebook (and the sweep's folder) with
    its seconds.
    """
    done = []
    with runner.embedded_s3(s3_dir):
        for path in runner.notebook_paths(only):
            if path.name.startswith("06") and sweep_workers:
                log.info("scaling sweep over %s workers ...", sweep_workers)
                start = time.perf_counter()
                sweep.run(sweep_workers, out_dir.parent / "sweep", {}, s3_dir)
                done.append((out_dir.parent / "sweep", time.perf_counter() - start))
            # "embedded" + the folder: the kernel finds this server through its server.json.
            params = {"s3_endpoint": "embedded", "s3_data_dir": str(s3_dir), **overrides}
            start = time.perf_counter()
            log.info("running %s ...", path.name)
            out = runner.execute(path, out_dir, params, html)
            done.append((out, time.perf_counter() - start))
            log.info("%s done in %.0f s", path.name, done[-1][1])
    return done


def timings(done: list[tuple[Path, float]]) -> list[str]:
    """Each notebook's time in this run beside the time its first cell states."""
    lines = []
    for path, seconds in done:
        source = runner.NOTEBOOKS / path.name
        stated = runner.stated_runtime(source) if source.exists() else "notebook 04 per count"
        stated = stated.split(" (`bench/results/")[0]  # its figure, not the record it cites
        lines.append(f"  {path.name:<42} {seconds:5.0f} s   stated: {stated}")
    return lines


# The demo fails unless the CNN reaches this multiple of the stronger of its baselines.
BEAT = 1.5


def check_claim(path: Path, strict: bool = True) -> str:
    """Notebook 04's claim, read back. When the CNN did not beat the colour count and chance
    clearly (``BEAT`` times the stronger), raise (``strict``) or return a loud warning line."""
    claim = json.loads(path.read_text())
    cnn = claim["ResNet from scratch (validation top-1)"]
    bar = max(v for k, v in claim.items() if not k.startswith("ResNet"))
    line = ", ".join(f"{k} {v:.1%}" for k, v in claim.items())
    if cnn < BEAT * bar:
        failed = (
            f"the CNN did not learn what colour and chance cannot: {line} "
            f"(needs {BEAT}x {bar:.1%}); see {path}"
        )
        if strict:
            raise ClaimMissed(failed)
        return f"WARNING (04): {failed}"
    return f"claim (04): {line}"


def summary(build: Path, strict: bool = True) -> list[str]:
    """What the demo measured, read back from the files the notebooks wrote (``strict``: raise
    when notebook 04's network did not beat its baselines; else a WARNING line)."""
    import pandas as pd

    lines = []
    claim = build / "checkpoints" / "dogs" / "claim.json"
    if claim.exists():
        lines.append(check_claim(claim, strict))
    metrics = build / "checkpoints" / "dogs" / "metrics.csv"
    if metrics.exists():
        last = pd.read_csv(metrics).query("kind == 'epoch'").iloc[-1]
        lines.append(
            f"training (04): epoch {int(last.epoch)}, validation top-1 "
            f"{last.val_top1:.1%}, top-5 {last.val_top5:.1%}, "
            f"{last.train_img_per_s:.0f} img/s over {int(last.world_size)} workers"
        )
    predictions = build / "checkpoints" / "dogs" / "predictions.csv"
    if predictions.exists():
        p = pd.read_csv(predictions)
        lines.append(
            f"inference (05): {len(p)} images, accuracy {(p.true == p.predicted).mean():.1%}"
        )
    sweep_csv = build / "sweep" / "sweep.csv"
    if sweep_csv.exists():
        sw = pd.read_csv(sweep_csv)
        pairs = ", ".join(
            f"{w} workers {v:.0f} img/s" for w, v in zip(sw.workers, sw.img_per_s, strict=True)
        )
        lines.append(f"scaling sweep: {pairs}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m helpers.run.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--only", nargs="*", help="notebook number prefixes, e.g. 01 02")
    parser.add_argument("--out", default=str(ROOT / "build" / "notebooks"))
    parser.add_argument("--s3-dir", default=str(ROOT / ".s3data"))
    parser.add_argument(
        "-p",
        "--parameter",
        action="append",
        default=[],
        help="NAME=VALUE, passed to every notebook (papermill -p)",
    )
    parser.add_argument("--no-html", action="store_true")
    parser.add_argument(
        "--warn-only",
        action="store_true",
        help="print a WARNING instead of failing when notebook 04's CNN did not beat the colour "
        "baseline and chance (for runs shorter than the demo's, e.g. -p epochs=2)",
    )
    parser.add_argument(
        "--sweep",
        type=int,
        nargs="*",
        default=[1, 2],
        help="worker counts for the scaling sweep before notebook 06",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    overrides = dict(runner.parse_parameter(p) for p in args.parameter)
    out_dir = Path(args.out).resolve()  # kernels run in notebooks/
    start = time.perf_counter()
    done = run(
        args.only, out_dir, overrides, Path(args.s3_dir).resolve(), not args.no_html, args.sweep
    )
    print(
        f"\nExecuted {sum(p.suffix == '.ipynb' for p, _ in done)} notebooks in "
        f"{time.perf_counter() - start:.0f} s; "
        f"they and their .html exports are in {out_dir}:"
    )
    for line in timings(done):
        print(line)
    for line in summary(out_dir.parent, strict=not args.warn_only):
        print(line)


if __name__ == "__main__":
    main()
