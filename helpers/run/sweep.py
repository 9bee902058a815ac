"""Scaling sweep: train notebook 04 through papermill for several worker counts, then measure.

Each run is an executed notebook kept as an artefact (``<out>/workers-N/04-...ipynb``) with its
metrics next to its checkpoint; :func:`results` reads them back for notebook 06::

    python -m helpers.run.sweep --workers 1 2            # a 2-core laptop
    python -m helpers.run.sweep --workers 1 2 4 8 -p cluster='"tcp://scheduler:8786"'
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from helpers.errors import NotFound
from helpers.run import runner
from helpers.s3 import storage

if TYPE_CHECKING:  # names for annotations only: importing costs nothing at run time
    import pandas as pd

log = logging.getLogger(__name__)

# Short runs: throughput settles within a few dozen steps. threads=1 gives every rank one core,
# so on a CPU box the sweep measures what adding workers (not threads) buys.
DEFAULTS = {"epochs": 2, "max_steps": 20, "threads": 1}
RESULTS = "sweep.csv"


def run(workers: list[int], out_dir: Path, params: dict, s3_dir: Path) -> list[Path]:
    """Execute notebook 04 once per worker count; returns the executed notebooks."""
    (nb,) = runner.notebook_paths(["04"])
    out_dir.mkdir(parents=True, exist_ok=True)
    done = []
    for n in workers:
        run_dir = out_dir / f"workers-{n}"
        p = {
            "s3_endpoint": "embedded",
            "s3_data_dir": str(s3_dir),
            **DEFAULTS,
            **params,
            "n_workers": n,
            "checkpoint_url": str(run_dir / "checkpoint"),
        }
        log.info("sweep: %d workers ...", n)
        done.append(runner.execute(nb, run_dir, p, html=False))
    results(out_dir).to_csv(out_dir / RESULTS, index=False)
    return done


def results(out_dir: str | Path) -> pd.DataFrame:
    """One row per run: workers, measured img/s (last epoch, all ranks), its notebook."""
    import pandas as pd

    rows = []
    for run_dir in sorted(Path(out_dir).glob("workers-*"), key=lambda p: int(p.name[8:])):
        metrics = Path(storage.join(str(run_dir / "checkpoint"), "metrics.csv"))
        if not metrics.exists():
            continue
        epochs = pd.read_csv(metrics).query("kind == 'epoch'")
        last = epochs.iloc[-1]
        rows.append(
            {
                "workers": int(run_dir.name[8:]),
                "img_per_s": last.train_img_per_s,
                "val_top1": last.val_top1,
                "data_wait": last.data_wait,
                "notebook": str(next(run_dir.glob("04-*.ipynb"))),
            }
        )
    if not rows:
        raise NotFound(
            f"no sweep results under {out_dir}; run `python -m helpers.run.sweep --workers 1 2` "
            "first"
        )
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m helpers.run.sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", default=str(runner.ROOT / "build" / "sweep"))
    parser.add_argument("--s3-dir", default=str(runner.ROOT / ".s3data"))
    parser.add_argument(
        "-p",
        "--parameter",
        action="append",
        default=[],
        help="NAME=VALUE for notebook 04 (papermill -p)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    params = dict(runner.parse_parameter(p) for p in args.parameter)
    with runner.embedded_s3(Path(args.s3_dir).resolve()):
        run(args.workers, Path(args.out).resolve(), params, Path(args.s3_dir).resolve())
    print(results(args.out).to_string(index=False))


if __name__ == "__main__":
    main()
