"""Run the notebooks headless with papermill: ``make demo`` (and the notebook tests).

Starts an embedded S3 server (or reuses one serving the same folder), executes each notebook in
order with its parameters, writes the executed copies and an HTML export of each under
``build/notebooks/``, and prints where they are::

    python -m helpers.demo                     # every notebook, demo parameters
    python -m helpers.demo --only 02 -p images_per_breed=40
"""

from __future__ import annotations

import argparse
import ast
import logging
import time
from contextlib import contextmanager
from pathlib import Path

from helpers import storage

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
KERNEL = "dask-dl"


def notebook_paths(only: list[str] | None = None) -> list[Path]:
    paths = sorted(NOTEBOOKS.glob("[0-9][0-9]-*.ipynb"))
    if only:
        paths = [p for p in paths if any(p.name.startswith(o) for o in only)]
        if not paths:
            raise ValueError(
                f"--only {only}: no notebook starts with that; have "
                f"{[p.name for p in sorted(NOTEBOOKS.glob('*.ipynb'))]}"
            )
    return paths


def execute(
    path: Path, out_dir: Path, parameters: dict, html: bool = True, timeout: int = 1800
) -> Path:
    """Execute one notebook with papermill (kernel cwd: ``notebooks/``); export HTML too."""
    import papermill

    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / path.name
    papermill.execute_notebook(
        str(path),
        str(out),
        parameters=parameters,
        cwd=str(path.parent),
        kernel_name=KERNEL,
        progress_bar=False,
        execution_timeout=timeout,
    )
    if html:
        from nbconvert import HTMLExporter

        body, _ = HTMLExporter().from_filename(str(out))
        out.with_suffix(".html").write_text(body)
    return out


@contextmanager
def embedded_s3(s3_dir: Path):
    """Reuse the server already serving ``s3_dir``, or run one for the duration."""
    server = None
    if storage.running_server(s3_dir) is None:
        server = storage.EmbeddedS3(s3_dir).start()
    try:
        yield
    finally:
        if server is not None:
            server.stop()


def run(
    only: list[str] | None,
    out_dir: Path,
    overrides: dict,
    s3_dir: Path,
    html: bool = True,
    sweep_workers: list[int] | None = None,
) -> list[Path]:
    """Execute the notebooks in order against the embedded S3 server.

    With ``sweep_workers``, the scaling sweep (notebook 04 per worker count) runs before the
    notebook that plots it (06).
    """
    from helpers import sweep

    done = []
    with embedded_s3(s3_dir):
        for path in notebook_paths(only):
            if path.name.startswith("06") and sweep_workers:
                log.info("scaling sweep over %s workers ...", sweep_workers)
                sweep.run(sweep_workers, out_dir.parent / "sweep", {}, s3_dir)
            # "embedded" + the folder: the kernel finds this server through its server.json.
            params = {"s3_endpoint": "embedded", "s3_data_dir": str(s3_dir), **overrides}
            start = time.perf_counter()
            log.info("running %s ...", path.name)
            done.append(execute(path, out_dir, params, html))
            log.info("%s done in %.0f s", path.name, time.perf_counter() - start)
    return done


def summary(build: Path) -> list[str]:
    """What the demo measured, read back from the files the notebooks wrote."""
    import pandas as pd

    lines = []
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


def _parse_parameter(text: str) -> tuple[str, object]:
    name, _, value = text.partition("=")
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name, value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m helpers.demo",
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
        "--sweep",
        type=int,
        nargs="*",
        default=[1, 2],
        help="worker counts for the scaling sweep before notebook 06",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    overrides = dict(_parse_parameter(p) for p in args.parameter)
    out_dir = Path(args.out).resolve()  # kernels run in notebooks/
    start = time.perf_counter()
    done = run(
        args.only, out_dir, overrides, Path(args.s3_dir).resolve(), not args.no_html, args.sweep
    )
    print(
        f"\nExecuted {len(done)} notebooks in {time.perf_counter() - start:.0f} s; "
        f"they and their .html exports are in {out_dir}:"
    )
    for path in done:
        print(f"  {path.name}")
    for line in summary(out_dir.parent):
        print(line)


if __name__ == "__main__":
    main()
