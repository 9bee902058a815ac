"""The project's shape, checked: one source of defaults, notebooks that show the code as it is,
documented parameters, typed public helpers, and the layer map of ``helpers/__init__.py``:
imports run downwards only, no cycle, modules and functions of a readable size, the top of
``helpers/`` holding what the notebooks import, and the README's layout listing every module."""

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

import helpers
from helpers import config, prepare, train
from helpers.run import runner

HELPERS = Path(helpers.__file__).parent
ROOT = HELPERS.parent
BOTTOM = ("config", "errors")  # importable from every layer
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 500, 60


def _name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in sorted(HELPERS.rglob("*.py"))}
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
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout
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


def _imports(path: Path) -> set[str]:
    """The project modules ``path`` imports, anywhere in it (functions and TYPE_CHECKING blocks
    included: an import there is a dependency all the same)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("helpers"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("helpers")}
    return found & set(MODULES)


def _layer(module: str) -> tuple[int, str]:
    """``(rank, room)`` of a module: the bottom (config, errors), a subpackage in the order of
    ``helpers.LAYERS``, or the top (the notebooks' modules)."""
    parts = module.split(".")
    if len(parts) == 2 and parts[1] in BOTTOM:
        return 0, "bottom"
    if len(parts) >= 2 and parts[1] in helpers.LAYERS:
        return 1 + helpers.LAYERS.index(parts[1]), parts[1]
    return 1 + len(helpers.LAYERS), "top"


def upward_imports(modules: dict[str, Path]) -> list[str]:
    """Every import that breaks the layer map: one to a higher layer, or from a subpackage to a
    notebook's module."""
    bad = []
    for name, path in modules.items():
        rank, room = _layer(name)
        for other in _imports(path):
            their_rank, their_room = _layer(other)
            if other == name or their_room == room and room != "top" or their_rank < rank:
                continue
            if room == "top" and their_room == "top":
                continue  # the notebooks' modules may import each other (no cycle: below)
            bad.append(f"{name} imports {other}")
    return sorted(bad)


def test_imports_run_downwards_through_the_layer_map():
    assert upward_imports(MODULES) == []
    # The rule can fail: an import of a notebook's module from a subpackage is caught.
    shards_path = MODULES["helpers.shards.stream"]
    mutated = shards_path.with_name("_probe.py")
    mutated.write_text(shards_path.read_text() + "\nfrom helpers import train  # upward\n")
    try:
        found = upward_imports({**MODULES, "helpers.shards._probe": mutated})
    finally:
        mutated.unlink()
    assert found == ["helpers.shards._probe imports helpers.train"]


def test_the_layer_map_names_every_subpackage_in_its_order():
    rooms = sorted({p.parent.name for p in HELPERS.glob("*/__init__.py")})
    assert sorted(helpers.LAYERS) == rooms
    doc = helpers.__doc__
    assert [doc.index(f"    {room}/") for room in helpers.LAYERS] == sorted(
        doc.index(f"    {room}/") for room in helpers.LAYERS
    )
    tops = [m.split(".")[1] for m in MODULES if m.count(".") == 1]
    for module in set(tops) - set(BOTTOM) - set(helpers.LAYERS):
        assert f"    {module} " in doc, f"helpers.{module} is not in the layer map"


def test_no_import_cycle():
    graph = {n: _imports(p) - {n} for n, p in MODULES.items()}

    def reach(start, node, seen):
        for nxt in graph[node]:
            if nxt == start:
                return True
            if nxt not in seen and reach(start, nxt, seen | {nxt}):
                return True
        return False

    assert not [n for n in graph if reach(n, n, {n})]


def test_modules_and_functions_are_a_readable_size():
    long_modules = {n: len(p.read_text().splitlines()) for n, p in MODULES.items()}
    assert {n: c for n, c in long_modules.items() if c > MAX_MODULE_LINES} == {}
    long_functions = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long_functions.append(f"{name}.{node.name}: {lines} lines")
    assert long_functions == []


def _notebook_imports() -> set[str]:
    """The project modules the notebooks' code cells import."""
    found = set()
    for path in runner.notebook_paths():
        for cell in nbformat.read(path, as_version=4).cells:
            if cell.cell_type != "code":
                continue
            code = [ln for ln in cell.source.splitlines() if not ln.startswith(("%", "!"))]
            for node in ast.walk(ast.parse("\n".join(code))):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("helpers"):
                    found |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
                elif isinstance(node, ast.Import):
                    found |= {a.name for a in node.names if a.name.startswith("helpers")}
    return found & set(MODULES)


def test_the_top_of_helpers_is_what_the_notebooks_import():
    used = _notebook_imports()
    rooms = {f"helpers.{r}" for r in (*BOTTOM, *helpers.LAYERS)}
    top = {n for n in MODULES if n.count(".") == 1} - rooms
    assert top - used == set(), "at the top, but no notebook imports it"
    assert {n for n in used if n.count(".") > 1} == set(), "notebooks import from a subpackage"


def readme_layout(text: str) -> set[str]:
    """The modules the README's layout block lists under ``helpers/``: two spaces in, a module
    of the top or a subpackage (``s3/``); four spaces in, a module of that subpackage."""
    block = text[text.index("## Layout") :].split("```")[1]
    named, room, inside = set(), "", False
    for line in block.splitlines():
        if not line.startswith(" "):
            inside = line.startswith("helpers/")
            continue
        token = line.split()[0]
        indent = len(line) - len(line.lstrip())
        if inside and indent == 2:
            room = token[:-1] if token.endswith("/") else ""
            if not room and token != "__init__.py":
                named.add(f"helpers.{token}")
        elif inside and indent == 4 and room:
            named.add(f"helpers.{room}.{token}")
    return named


def test_the_readme_layout_lists_every_module():
    modules = {n for n in MODULES if n != "helpers"} - {f"helpers.{r}" for r in helpers.LAYERS}
    named = readme_layout((ROOT / "README.md").read_text())
    assert modules - named == set(), "modules missing from the README's layout"
    assert named - modules == set(), "the README's layout names modules that do not exist"


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
