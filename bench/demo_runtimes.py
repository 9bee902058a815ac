"""The demo's runtimes: ``make demo`` as a new user runs it, each notebook timed, beside the time
its first cell states ("**Expected runtime:** ...").

What: ``helpers.run.demo.run`` with the demo's defaults (every notebook, the scaling sweep over
1 and 2 workers before notebook 06), against the embedded S3 in ``.s3data/`` as ``make demo``
uses it. Each notebook's wall time, and the sweep's, goes in the record with the statement its
notebook makes. The first figure of each statement (``16 s``, ``516 s``) is what the targets
compare: a statement is true when this run took between 0.67x and 1.5x of it (a shared 2-core
machine varies by a third from run to run), or within 10 s of it for the notebooks of seconds.
The notebooks' statements quote this record.

    python -m bench.demo_runtimes [--records DIR]
"""

from __future__ import annotations

import argparse
import logging
import re
import tempfile
import time
from pathlib import Path
from typing import Any

TRUE_WITHIN = (0.67, 1.5)  # measured / stated
SLACK_S = 10.0  # or this close: a notebook of seconds varies by more than a third


def stated_seconds(stated: str) -> float | None:
    """The first figure of a runtime statement, in seconds ("516 s (under 9 min) ..." -> 516)."""
    found = re.search(r"(\d[\d,]*)\s*(s|min)\b", stated)
    if not found:
        return None
    value = float(found.group(1).replace(",", ""))
    return value * 60 if found.group(2) == "min" else value


def run(s3_dir: Path, sweep_workers: tuple[int, ...] = (1, 2)) -> dict[str, Any]:
    """The demo, timed; every notebook's (and the sweep's) seconds beside its statement."""
    from helpers.run import demo, runner

    with tempfile.TemporaryDirectory(prefix="demo_runtimes_") as tmp:
        start = time.perf_counter()
        done = demo.run(None, Path(tmp) / "notebooks", {}, s3_dir, False, list(sweep_workers))
        wall = time.perf_counter() - start
    passes = []
    for path, seconds in done:
        source = runner.NOTEBOOKS / path.name
        stated = runner.stated_runtime(source) if source.exists() else None
        passes.append({"notebook": path.name, "seconds": round(seconds, 1), "stated": stated,
                       "stated_s": stated_seconds(stated) if stated else None})  # fmt: skip
    return {"passes": passes, "wall_s": round(wall, 1), "sweep_workers": list(sweep_workers)}


def to_record(result: dict[str, Any]) -> dict[str, Any]:
    from bench import record

    low, high = TRUE_WITHIN
    targets = []
    for p in result["passes"]:
        stated = p["stated_s"]
        if stated:  # within a ratio of the statement, or SLACK_S of it for the short ones
            name = f"{p['notebook']}: seconds, stated {stated:.0f}"
            most, least = max(high * stated, stated + SLACK_S), min(low * stated, stated - SLACK_S)
            targets.append(record.target(f"{name} (at most)", p["seconds"], "<=", round(most, 1)))
            targets.append(record.target(f"{name} (at least)", p["seconds"], ">=", round(least, 1)))
    settings = {"notebooks": "all, demo defaults", "sweep_workers": result["sweep_workers"],
                "s3": "embedded (.s3data/, data already there)"}  # fmt: skip
    return record.build("demo_runtimes", settings, result["passes"], targets,
                        {"wall_s": result["wall_s"]})  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    from bench import record
    from helpers.run.runner import ROOT

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--s3-dir", default=str(ROOT / ".s3data"))
    p.add_argument("--records", default=None, help="records folder (default bench/results)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = run(Path(args.s3_dir).resolve())
    for q in result["passes"]:
        print(f"{q['notebook']:<42} {q['seconds']:7.1f} s   stated: {q['stated']}")
    print(f"record: {record.write(to_record(result), args.records or record.RESULTS)}")


if __name__ == "__main__":
    main()
