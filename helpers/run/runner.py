"""Running notebooks headless with papermill: what ``make demo``, the sweep and the tests share.

A notebook runs with its kernel's working directory in ``notebooks/`` and gets only the parameters
its ``parameters`` cell declares, so one set of overrides can go to every notebook.
"""

from __future__ import annotations

import ast
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from helpers.errors import ParameterError
from helpers.s3 import server as s3server

if TYPE_CHECKING:  # names for annotations only: importing costs nothing at run time
    import nbformat

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
KERNEL = "dask-dl"
HTML = Path(__file__).resolve().parent / "html"  # the HTML export's template (alt texts)


def notebook_paths(only: list[str] | None = None) -> list[Path]:
    """The numbered notebooks in order; ``only``: number prefixes such as ``["02", "04"]``."""
    paths = sorted(NOTEBOOKS.glob("[0-9][0-9]-*.ipynb"))
    if only:
        paths = [p for p in paths if any(p.name.startswith(o) for o in only)]
        if not paths:
            raise ParameterError(
                f"--only {only}: no notebook starts with that; have "
                f"{[p.name for p in sorted(NOTEBOOKS.glob('*.ipynb'))]}"
            )
    return paths


def stated_runtime(path: Path) -> str:
    """What a notebook's first cell says it takes ("**Expected runtime:** ..." up to the end of
    that sentence), or "not stated"."""
    import json
    import re

    first = "".join(json.loads(path.read_text())["cells"][0]["source"])
    found = re.search(r"\*\*Expected runtime:\*\*\s*(.+?)(?:\.\s|\.$|$)", first, re.S)
    return " ".join(found.group(1).split()) if found else "not stated"


def declared(path: Path) -> dict:
    """The parameters a notebook declares: name -> papermill's description (type, default...)."""
    import papermill

    return papermill.inspect_notebook(str(path))


def execute(
    path: Path, out_dir: Path, parameters: dict, html: bool = True, timeout: int = 1800
) -> Path:
    """Execute one notebook with papermill (kernel cwd: ``notebooks/``); export HTML too.

    Parameters the notebook does not declare are left out (papermill would warn about each).
    """
    import papermill

    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / path.name
    known = declared(path)
    papermill.execute_notebook(
        str(path),
        str(out),
        parameters={k: v for k, v in parameters.items() if k in known},
        cwd=str(path.parent),
        kernel_name=KERNEL,
        progress_bar=False,
        execution_timeout=timeout,
        kernel_manager_class=_ipc_kernel_manager(),
    )
    if html:
        out.with_suffix(".html").write_text(export_html(out))
    return out


def export_html(path: Path) -> str:
    """An executed notebook as HTML, JupyterLab's look, every output figure with alt text."""
    import nbformat
    from nbconvert import HTMLExporter

    nb = describe_figures(nbformat.read(path, as_version=4))
    exporter = HTMLExporter(template_name="described", extra_template_basedirs=[str(HTML)])
    return exporter.from_notebook_node(nb)[0]


def describe_figures(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Give every output figure an alt text for the HTML export: the first sentence of the prose
    just before its cell (what the notebook says the figure shows), with the cell's number."""
    import re

    said = ""
    for number, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown":
            text = re.sub(r"[#*`>]|!\[[^\]]*\]\([^)]*\)|\[([^\]]*)\]\([^)]*\)", r"\1", cell.source)
            said = re.split(r"(?<=[.:!?])\s", " ".join(text.split()), maxsplit=1)[0][:240]
            continue
        for output in cell.get("outputs", []):
            if "image/png" in output.get("data", {}):
                meta = output.setdefault("metadata", {}).setdefault("image/png", {})
                meta.setdefault("alt", f"Figure of cell {number}: {said}" if said else
                                f"Figure of cell {number}")  # fmt: skip
    return nb


def _ipc_kernel_manager() -> type:
    """nbclient's kernel manager, talking to the kernel over Unix sockets (in Jupyter's private
    runtime folder) instead of TCP: no port opens, and the kernel has nothing to warn about
    ("Kernel is running over TCP without encryption", once per notebook)."""
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import CaselessStrEnum

    class IPCKernelManager(AsyncKernelManager):
        transport = CaselessStrEnum(["tcp", "ipc"], default_value="ipc", config=True)

    return IPCKernelManager


@contextmanager
def embedded_s3(s3_dir: Path) -> Iterator[None]:
    """Reuse the server already serving ``s3_dir``, or run one for the duration."""
    server = None
    if s3server.running_server(s3_dir) is None:
        server = s3server.EmbeddedS3(s3_dir).start()
    try:
        yield
    finally:
        if server is not None:
            server.stop()


def parse_parameter(text: str) -> tuple[str, object]:
    """``NAME=VALUE`` (as papermill's ``-p``): VALUE a Python literal, else a string."""
    name, _, value = text.partition("=")
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name, value
