"""Benchmark records: one JSON file per run under ``bench/results/``, and the README table.

Every benchmark script ends with :func:`write`, which stores what is needed to trust a number
later: the commit (and whether the tree was dirty), date, machine (CPU model and cores, memory,
GPU, load average), versions, every setting, every timed pass, and the ``targets`` (name,
measured value, target, met or not, and what limits it when missed). A figure in the README
without a record behind it is a bug, so the README's table is generated from the newest record
of each benchmark::

    python -m bench.record report          # rewrite README.md's table between the markers
    python -m bench.record report --check  # fail if the table is not what the records say
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
README = ROOT / "README.md"
START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"
VERSIONED = ("torch", "torchvision", "dask", "distributed", "s3fs", "Pillow", "numpy")
OPS = {
    ">=": lambda v, t: v >= t,
    "<=": lambda v, t: v <= t,
    ">": lambda v, t: v > t,
    "<": lambda v, t: v < t,
}


def target(
    name: str, value: float | None, op: str, goal: float, limited_by: str | None = None
) -> dict[str, Any]:
    """One target entry: ``value op goal`` decides ``met``; ``value=None`` (not measured) is a
    miss, and ``limited_by`` should then say why."""
    if op not in OPS:
        raise ValueError(f"op={op!r}; allowed: {', '.join(OPS)}")
    met = value is not None and OPS[op](value, goal)
    entry = {"name": name, "value": value, "op": op, "target": goal, "met": met}
    if limited_by:
        entry["limited_by"] = limited_by
    return entry


def pinned_torch() -> str | None:
    """The torch version pyproject.toml pins (``torch==X``), if any."""
    found = re.search(r'"torch==([^";]+)', (ROOT / "pyproject.toml").read_text())
    return found.group(1).strip() if found else None


def commit() -> dict[str, Any]:
    """The checked-out commit and whether tracked files differ from it."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()

    return {
        "sha": git("rev-parse", "HEAD") or None,
        "dirty": bool(git("status", "--short", "-uno")),
    }


def versions(extra: tuple[str, ...] = ()) -> dict[str, str | None]:
    """Python and the installed versions of the packages that shape the numbers."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in (*VERSIONED, *extra):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def machine() -> dict[str, Any]:
    """CPU model and cores (all, and usable by this process), memory, GPUs, load average."""
    cpu = platform.processor() or None
    with _quiet(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = None
    with _quiet(OSError, ValueError):
        kb = re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)
        mem = round(int(kb) / 2**20, 1)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "memory_gib": mem,
        "gpus": _gpus(),
        "os": platform.platform(),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def _gpus() -> list[str]:
    with _quiet(Exception):
        import torch

        if torch.cuda.is_available():
            return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return []


class _quiet:
    """``contextlib.suppress`` that also works as a plain class (no import-time state)."""

    def __init__(self, *kinds):
        self.kinds = kinds

    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        return kind is not None and issubclass(kind, self.kinds)


def build(
    benchmark: str,
    settings: dict[str, Any],
    passes: list[dict[str, Any]],
    targets: list[dict[str, Any]],
    results: dict[str, Any] | None = None,
    notes: list[str] | None = None,
    extra_versions: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The record of one run (see the module docstring), not yet written."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return {
        "benchmark": benchmark,
        "date": now.isoformat(timespec="seconds"),
        "commit": commit(),
        "machine": machine(),
        "versions": versions(extra_versions),
        "pinned_torch": pinned_torch(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "settings": settings,
        "passes": passes,
        "results": results or {},
        "targets": targets,
        "notes": notes or [],
    }


def write(record: dict[str, Any], directory: str | Path = RESULTS) -> Path:
    """Write ``record`` as ``<benchmark>-<UTC time>-<commit>.json`` in ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stamp = record["date"].replace("-", "").replace(":", "")[:15]
    sha = (record["commit"]["sha"] or "nogit")[:8]
    path = directory / f"{record['benchmark']}-{stamp}-{sha}.json"
    path.write_text(json.dumps(record, indent=1, default=str) + "\n")
    return path


def newest(directory: str | Path = RESULTS) -> dict[str, tuple[Path, dict]]:
    """The newest record of each benchmark in ``directory``: ``{benchmark: (path, record)}``."""
    out: dict[str, tuple[Path, dict]] = {}
    for path in sorted(Path(directory).glob("*.json")):
        rec = json.loads(path.read_text())
        if "runs" in rec and "benchmark" not in rec:
            continue  # a log of runs (calibration.json): its summary record is in the table
        if "benchmark" not in rec or "targets" not in rec:
            raise ValueError(f"{path} is not a benchmark record (no 'benchmark' or 'targets')")
        have = out.get(rec["benchmark"])
        if have is None or rec["date"] >= have[1]["date"]:
            out[rec["benchmark"]] = (path, rec)
    return out


def _fmt(value: Any) -> str:
    if value is None:
        return "not measured"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def where(rec: dict) -> str:
    """``2 cores (Intel Xeon ...), torch 2.14.1``, flagging a torch other than the pinned one."""
    m, torch = rec["machine"], rec["versions"].get("torch")
    cores = m.get("usable_cores") or m.get("cores")
    text = f"{cores} cores ({m.get('cpu') or 'unknown CPU'})"
    if m.get("gpus"):
        text += f", {m['gpus'][0]}" + (f" x{len(m['gpus'])}" if len(m["gpus"]) > 1 else "")
    pinned = rec.get("pinned_torch")
    text += f", torch {torch}"
    if pinned and torch and not torch.startswith(pinned):
        text += f" **(not the pinned {pinned})**"
    if m.get("loadavg"):
        text += f", load {m['loadavg'][0]:.1f}"
    if rec["commit"].get("dirty"):
        text += ", uncommitted changes"
    return text


def table(records: dict[str, tuple[Path, dict]], root: Path = ROOT) -> str:
    """The README's Markdown table: one row per target of the newest record of each benchmark."""
    lines = [
        "| benchmark | measure | measured | target | met | run on | record |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in sorted(records):
        path, rec = records[name]
        rel = Path(os.path.relpath(path.resolve(), root.resolve())).as_posix()
        for t in rec["targets"]:
            met = "yes" if t["met"] else "**no**"
            lines.append(
                f"| `{name}` | {t['name']} | {_fmt(t['value'])} | {t['op']} {_fmt(t['target'])} "
                f"| {met} | {where(rec)}, {rec['date'][:10]} | [{path.name}]({rel}) |"
            )
    return "\n".join(lines)


def splice(text: str, block: str) -> str:
    """``text`` with everything between the table markers replaced by ``block``."""
    if START not in text or END not in text:
        raise ValueError(f"README has no {START} ... {END} markers in its Benchmarks section")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{block}\n{END}{tail}"


def report(readme: Path = README, directory: Path = RESULTS, check: bool = False) -> bool:
    """Regenerate the README table from the records; with ``check``, only compare. True when
    the README already said (or now says) what the records say."""
    text = readme.read_text()
    new = splice(text, table(newest(directory), readme.parent))
    if check or new == text:
        return new == text
    readme.write_text(new)
    return True


def main(argv: list[str] | None = None) -> None:
    """``report``: regenerate (or ``--check``) the README's benchmark table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["report"])
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--check", action="store_true", help="fail if the table is stale")
    args = parser.parse_args(argv)
    before = args.readme.read_text()
    ok = report(args.readme, args.results, args.check)
    if args.check and not ok:
        sys.exit(f"{args.readme}'s benchmark table differs from {args.results}: make bench-report")
    changed = args.readme.read_text() != before
    print(f"{args.readme}: benchmark table {'rewritten' if changed else 'up to date'}")


if __name__ == "__main__":
    main()
