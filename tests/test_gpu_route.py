"""The GPU route's packages: what it imports is on the GPU runner or travels with it as a wheel.

A first run on the runner that stops on an ImportError spends its lease and leaves no record;
``bench.gpu_env`` reads every import the route can reach (the benchmark, the helpers it uses, the
GPU tests), and this checks it against the runner's documented packages and the carried wheels.
"""

import re
from pathlib import Path

from bench import gpu_env

ROOT = Path(__file__).resolve().parent.parent


def test_the_runner_and_the_carried_wheels_cover_every_import_of_the_route():
    assert gpu_env.problems() == []


def test_a_new_import_the_runner_lacks_is_named_with_the_file_importing_it(tmp_path):
    module = tmp_path / "new_step.py"  # as if bench_gpu.py started importing these
    module.write_text("import nbformat\n\ndef later():\n    import selenium.webdriver\n")
    found = gpu_env.problems(entry=[*gpu_env.ENTRY, str(module)])
    assert len(found) == 2, found
    assert all("is neither on the runner" in p and "new_step.py" in p for p in found), found
    assert any(p.startswith("nbformat") for p in found) and any("selenium" in p for p in found)


def test_a_runner_package_the_rehearsal_would_not_install_is_named(monkeypatch):
    route = gpu_env.route_packages()
    monkeypatch.setattr(
        gpu_env, "route_packages", lambda: {k: v for k, v in route.items() if k != "pillow"}
    )
    assert [p.split(" ")[0] for p in gpu_env.problems()] == ["pillow"]


def test_carried_wheels_are_the_versions_the_project_pins():
    pinned = dict(
        re.findall(r'"([\w-]+)(?:\[[^\]]*\])?==([^";]+)', (ROOT / "pyproject.toml").read_text())
    )
    carried = gpu_env.carried()
    for name in ("dask", "distributed", "dask-cuda"):
        assert carried[name] == pinned[name], name


def test_the_gpu_tests_run_on_the_runner_and_what_travels_fits():
    assert "tests/loading/test_gpudecode.py" in gpu_env.gpu_tests()
    repo, _ = gpu_env.travel_bytes()
    assert repo / 2**20 + gpu_env.CARRIED_MIB <= gpu_env.BUDGET_MIB
