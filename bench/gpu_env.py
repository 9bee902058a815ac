"""What the GPU route needs on the GPU runner; whether its packages and the carried wheels have it.

The GPU runner (bench/gpu_machine.txt) has Python 3.12, torch and a few hundred packages but no
Dask, s3fs or S3 server; what the route needs beyond its image travels as wheels
(bench/gpu_carry.txt), within 64 MiB together with the repository. A first run that stops on an
ImportError spends the lease and leaves no record, so this module reads the route's own sources
(the benchmark, the helpers it reaches, the GPU tests) for every import, at any depth (imports
inside functions run too), and names any that neither list covers. ``bash bench/gpu_route.sh``
uses it to install and to size what travels; ``tests/test_gpu_route.py`` runs the check::

    python -m bench.gpu_env route-packages   # the image's packages the route imports (rehearsal)
    python -m bench.gpu_env carry            # the wheels that travel, pinned
    python -m bench.gpu_env check            # what the route imports and nobody provides
    python -m bench.gpu_env size             # what travels, against the limit
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MACHINE = ROOT / "bench" / "gpu_machine.txt"
CARRY = ROOT / "bench" / "gpu_carry.txt"
WHEELS = ROOT / ".whl"
LIMIT_MIB, BUDGET_MIB = 64, 56  # the runner's limit; ours, leaving room for the repository to grow
CARRIED_MIB = 42.2  # the wheels of gpu_carry.txt, as `download` measured them (2026-12-04)
# Where the route starts: the benchmarks, and the GPU tests with the conftest they load.
ENTRY = ["bench/bench_gpu.py", "bench/decoders.py", "bench/bench_fsdp.py", "tests/conftest.py"]
OWN = ("helpers", "bench")
# Imports in the route's files that the route never executes, each with where and why.
UNREACHED = {
    "IPython": "helpers.monitor's Monitor.follow draws in a notebook (the benchmark samples GPUs "
    "instead); helpers.progress asks whether it runs in one, and without IPython it does not",
    "matplotlib": "helpers.monitor: figures for Monitor.follow, which the benchmark does not call",
    "scipy": "helpers.data: reads the official split lists, which the benchmark's data lacks",
}
# Requirements of carried packages that the route does not need, each with why.
NOT_NEEDED = {
    "rapids-dask-dependency": "dask-cuda's pin of dask/distributed; its patches for RAPIDS "
    "libraries load from a .pth hook that a PYTHONPATH install skips, and the route uses none",
}
# Needs that no metadata states: moto's server runs on Flask (its [server] extra, which also
# lists a dozen packages for other AWS services).
IMPLIED = {"moto": ["flask", "flask-cors"]}


def norm(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _entries(path: Path) -> list[tuple[str, str | None, set[str]]]:
    out = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        spec, *marks = line.split()
        name, _, version = spec.partition("==")
        out.append((norm(name), version or None, set(marks)))
    return out


def machine() -> dict[str, str | None]:
    """The runner's packages: ``{name: version or None}`` (``python`` included)."""
    return {name: version for name, version, _ in _entries(MACHINE)}


def route_packages() -> dict[str, str | None]:
    """The runner's packages the route imports (marked ``route``): what the rehearsal installs."""
    return {name: version for name, version, marks in _entries(MACHINE) if "route" in marks}


def carried() -> dict[str, str]:
    """The wheels that travel: ``{name: version}``."""
    return {name: version for name, version, _ in _entries(CARRY)}


def gpu_tests() -> list[str]:
    """Test files holding GPU tests (``pytest.mark.gpu``): ``run`` executes them there."""
    tests = sorted((ROOT / "tests").rglob("test_*.py"))
    return [str(p.relative_to(ROOT)) for p in tests if "mark.gpu" in p.read_text()]


def _own_module(name: str) -> Path | None:
    """The file of one of this repository's modules (``helpers.x.y``), if it is one."""
    parts = name.split(".")
    if parts[0] not in OWN:
        return None
    base = ROOT.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in it (functions included), fully named."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "__future__":
                continue
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # maybe submodules
    return found


def route_imports(entry: list[str] | None = None) -> dict[str, set[str]]:
    """Third-party top-level modules the route imports: ``{module: {files importing it}}``.

    Follows this repository's own modules from the entry files (default: the benchmark, the
    conftest and the GPU tests); leaves out the standard library."""
    todo = [ROOT / p for p in (entry or [*ENTRY, *gpu_tests()])]
    seen: set[Path] = set()
    out: dict[str, set[str]] = {}
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imports(path):
            own = _own_module(name)
            if own is not None:
                todo.append(own)
                continue
            top = name.split(".")[0]
            if top in OWN or top in sys.stdlib_module_names:
                continue
            out.setdefault(top, set()).add(_shown(path))
    return out


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def distributions() -> dict[str, list[str]]:
    """``{import name: [distributions]}`` from this environment's installed metadata."""
    from importlib.metadata import packages_distributions

    return {k: [norm(d) for d in v] for k, v in packages_distributions().items()}


def _requirements(dist: str) -> list[tuple[str, str]]:
    """``(name, specifier)`` of a distribution's requirements on the runner (Python 3.12,
    Linux x86_64, no extras), read from this environment's metadata of the same version."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    env = {
        "python_version": "3.12",
        "python_full_version": "3.12.3",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "extra": "",
    }
    out = []
    for text in requires(dist) or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate(env):
            out.append((norm(req.name), str(req.specifier)))
    return [*out, *((n, "") for n in IMPLIED.get(dist, []))]


def problems(entry: list[str] | None = None) -> list[str]:
    """Why the route would fail on the runner (or its rehearsal would miss a package), one
    sentence each; empty when it would not. ``entry``: as :func:`route_imports`."""
    from packaging.specifiers import SpecifierSet

    have, route, carry = machine(), route_packages(), carried()
    provided = {**route, **carry}
    out = []

    def lacks(dist: str, who: str) -> str | None:
        if dist in provided:
            return None
        if dist in have:
            return (
                f"{dist} ({who}) is on the runner but not marked 'route' in {MACHINE.name}: "
                "the rehearsal would not install it"
            )
        return (
            f"{dist} ({who}) is neither on the runner ({MACHINE.name}) nor carried ({CARRY.name})"
        )

    where = distributions()
    for module, files in sorted(route_imports(entry).items()):
        if module in UNREACHED:
            continue
        who = f"import {module} in {', '.join(sorted(files))}"
        dists = where.get(module)
        if not dists:
            out.append(f"{who}: no installed distribution provides it here, so it cannot be named")
        elif all(lacks(d, who) for d in dists):
            out.append(lacks(dists[0], who))
    todo, seen = list(carry), set()
    while todo:  # what the carried packages need, and whether its version fits
        dist = todo.pop()
        if dist in seen:
            continue
        seen.add(dist)
        for name, spec in _requirements(dist):
            if name in NOT_NEEDED:
                continue
            if missing := lacks(name, f"needed by the carried {dist}"):
                out.append(missing)
                continue
            version = provided[name]
            if version and spec and not SpecifierSet(spec).contains(version, prereleases=True):
                out.append(f"{name}=={version} does not satisfy {dist}'s {name}{spec}")
            if name in carry:
                todo.append(name)
    return out


def travel_bytes() -> tuple[int, int]:
    """``(repository, wheels)``: bytes of what travels to the runner (the files git tracks or
    would add, and ``.whl/*.whl``)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    repo = sum(
        (ROOT / p.decode()).stat().st_size for p in listed if p and (ROOT / p.decode()).is_file()
    )
    return repo, sum(p.stat().st_size for p in WHEELS.glob("*.whl"))


def size_report() -> tuple[str, bool]:
    """A line of what travels against the limits, and whether it fits our budget."""
    repo, wheels = travel_bytes()
    mib = (repo + wheels) / 2**20
    line = (
        f"travels: repository {repo / 2**20:.1f} MiB + {len(list(WHEELS.glob('*.whl')))} "
        f"wheels {wheels / 2**20:.1f} MiB = {mib:.1f} MiB (budget {BUDGET_MIB} MiB, the "
        f"runner's limit {LIMIT_MIB} MiB)"
    )
    return line, mib <= BUDGET_MIB


def main(argv: list[str] | None = None) -> int:
    command = (argv or sys.argv[1:] or ["check"])[0]
    if command == "route-packages":
        print("\n".join(f"{n}=={v}" if v else n for n, v in route_packages().items()))
    elif command == "carry":
        print("\n".join(f"{n}=={v}" for n, v in carried().items()))
    elif command == "tests":
        print(" ".join(gpu_tests()))
    elif command == "size":
        line, ok = size_report()
        print(line)
        return 0 if ok else 1
    elif command == "check":
        found = problems()
        print("\n".join(found) or "the runner's packages and the carried wheels cover the route")
        return 1 if found else 0
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
