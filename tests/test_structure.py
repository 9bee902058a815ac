"""The project's shape, checked: one source of defaults, notebooks that show the code as it is,
documented parameters, typed public helpers, small modules without import cycles."""

import ast
import dataclasses
import inspect
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import papermill
import pytest

from helpers import config, prepare, runner, train

HELPERS = Path(train.__file__).parent
MODULES = {p.stem: p for p in HELPERS.glob("*.py") if p.stem != "__init__"}
# Where the data and the checkpoints live is the notebook's to say, not a library default.
LOCATIONS = {"data_url", "checkpoint_url"}


def _declared(prefix: str) -> dict:
    (path,) = runner.notebook_paths([prefix])
    params = papermill.inspect_notebook(str(path))
    return {name: ast.literal_eval(p["default"]) for name, p in params.items()}


def _defaults(cls) -> dict:
    return {
        f.name: f.default
        for f in dataclasses.fields(cls)
        if f.default is not dataclasses.MISSING and f.name not in LOCATIONS
    }


@pytest.mark.parametrize(
    "prefix, cls", [("04", config.TrainConfig), ("05", config.InferenceConfig)]
)
def test_parameter_cells_use_the_config_defaults(prefix, cls):
    declared, defaults = _declared(prefix), _defaults(cls)
    shared = set(declared) & set(defaults)
    assert len(shared) >= 3, "the notebook should expose the config's main settings"
    assert {k: declared[k] for k in shared} == {k: defaults[k] for k in shared}


def test_synthetic_data_defaults_agree_across_notebooks():
    wanted = inspect.signature(prepare.ensure_synthetic).parameters
    for prefix in ("02", "04"):
        declared = _declared(prefix)
        assert declared["n_breeds"] == wanted["n_breeds"].default
        assert declared["images_per_breed"] == wanted["per_breed"].default


def test_help_notebook_lists_every_parameter_with_type_and_comment():
    for path in runner.notebook_paths():
        params = papermill.inspect_notebook(str(path))
        out = subprocess.run(
            [sys.executable, "-m", "papermill", "--help-notebook", str(path)],
            capture_output=True, text=True, timeout=120, check=True,
        ).stdout  # fmt: skip
        entries = re.findall(r"^  (\w+): (.*(?:\n {4,}.*)*)", out, re.M)  # help may wrap
        listed = {name: " ".join(text.split()) for name, text in entries}
        assert set(listed) == set(params), path.name
        for name, p in params.items():
            assert p["inferred_type_name"] != "None" and p["help"], (path.name, name)
            assert listed[name].startswith(p["inferred_type_name"]), (path.name, listed[name])
            assert " ".join(p["help"].split()) in listed[name], (path.name, listed[name])


def test_notebook_04_shows_train_rank_as_it_is_in_the_code():
    (path,) = runner.notebook_paths(["04"])
    cells = nbformat.read(path, as_version=4).cells
    blocks = [
        m.group(1)
        for c in cells
        if c.cell_type == "markdown"
        for m in re.finditer(r"```python\n(def train_rank\(.*?)```", c.source, re.S)
    ]
    assert blocks == [inspect.getsource(train.train_rank)]


def test_notebooks_print_no_source_and_every_image_exists():
    for path in runner.notebook_paths():
        nb = nbformat.read(path, as_version=4)
        assert not any("getsource" in c.source for c in nb.cells), path.name
        for c in nb.cells:
            for ref in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", c.source):
                assert (path.parent / ref).resolve().is_file(), (path.name, ref)


def test_public_helpers_are_typed():
    untyped = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
        public = (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name[0] != "_")
        for cls in public:
            funcs += [n for n in cls.body if isinstance(n, ast.FunctionDef)]
        for f in funcs:
            if f.name.startswith("_"):
                continue
            args = f.args.posonlyargs + f.args.args + f.args.kwonlyargs
            missing = [a.arg for a in args if a.annotation is None and a.arg not in ("self", "cls")]
            if missing or f.returns is None:
                untyped.append(f"{name}.{f.name}: {missing or 'return'}")
    assert not untyped


def _helper_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("helpers"):
            found |= {node.module.split(".")[-1]} | {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[-1] for a in node.names if a.name.startswith("helpers")}
    return found & set(MODULES) - {path.stem}


def test_modules_are_small_and_import_no_cycle():
    sizes = {n: len(p.read_text().splitlines()) for n, p in MODULES.items()}
    assert max(sizes.values()) <= 300, sizes
    graph = {n: _helper_imports(p) for n, p in MODULES.items()}

    def reach(start, node, seen):
        for nxt in graph[node]:
            if nxt == start:
                return True
            if nxt not in seen and reach(start, nxt, seen | {nxt}):
                return True
        return False

    assert not [n for n in graph if reach(n, n, {n})]


def test_plot_helpers_take_an_axes_and_return_axes():
    from helpers import plots

    for name, fn in inspect.getmembers(plots, inspect.isfunction):
        if (
            fn.__module__ != plots.__name__
            or name.startswith("_")
            or name in ("to_image", "task_graph")
        ):
            continue
        params = inspect.signature(fn).parameters
        assert "ax" in params or "axes" in params, name
        assert (params.get("ax") or params.get("axes")).default is None, name
