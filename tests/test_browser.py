"""JupyterLab as `make lab` runs it, driven by a real headless Chromium (Debian's, via Selenium).

One JupyterLab server (the project's config, a free loopback port, a token, the dask-dl kernel)
and one browser for the module. Notebook 01: run to its client, the dashboard URL it shows answers,
the Dask panel's search finds it, then the rest runs without an error. Notebook 04 (a copy with
tiny parameters, against an embedded S3 server this test starts): the live plot shows each epoch
while training runs, the saved notebook holds no error, its markdown images load; Jupyter's stop
button cancels training within seconds and the next job starts at once.

Screenshots go to build/browser/ for a person to look at. The browser is skipped only where none
can be installed; as root on Debian (where `make install` installs it) a missing one fails.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from helpers.s3 import server as s3server

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[1]
SHOTS = REPO / "build" / "browser"
ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
# JupyterLab 4 renders only the cells in view by default; the test looks at every cell.
SETTINGS = {
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/docmanager-extension/plugin": {
        "autosave": False
    },  # the test saves when it means to
}
# Notebook 04 in a couple of minutes on two loaded cores.
SMALL_04 = dict(arch="resnet18", image_size=32, batch_size=4, epochs=3, max_steps=3)
SMALL_04.update(images_per_breed=12, data_url="s3://dogs/browser")
# One rank, no DataLoader processes: on loaded cores each process start costs tens of seconds.
SMALL_04.update(n_workers=1, loader_workers=0)
TIMINGS: dict[str, float] = {}  # seconds per step, written to build/browser/timings.json


@contextlib.contextmanager
def _timed(step: str):
    start = time.monotonic()
    try:
        yield
    finally:
        TIMINGS[step] = round(time.monotonic() - start, 1)


def _browser() -> tuple[str, str] | None:
    chromium = next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)
    driver = shutil.which("chromedriver")
    return (chromium, driver) if chromium and driver else None


@pytest.fixture(scope="module")
def browser_paths():
    found = _browser()
    reason = "no chromium + chromedriver (`make test` installs Debian's when run as root)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        found, reason = None, "selenium is not installed (`make install` installs it)"
    if found is None:
        if ROOT and Path("/etc/debian_version").exists() and shutil.which("apt-get"):
            pytest.fail(f"{reason}: as root on Debian it can be installed, so this is a failure")
        pytest.skip(reason)
    return found


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on a free loopback port with a token: (base URL, token)."""
    tmp = tmp_path_factory.mktemp("lab")
    for name, values in SETTINGS.items():
        path = tmp / "settings" / f"{name}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    port, token = s3server.free_ports(1)[0], secrets.token_hex(16)
    cmd = [
        sys.executable,
        "-m",
        "jupyter",
        "lab",
        "--no-browser",
        f"--config={REPO / 'jupyter' / 'jupyter_server_config.py'}",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={REPO}",
        f"--LabApp.user_settings_dir={tmp / 'settings'}",
        f"--LabApp.workspaces_dir={tmp / 'workspaces'}",
        "--LabApp.expose_app_in_browser=True",  # window.jupyterapp: run commands, read models
        *(["--allow-root"] if ROOT else []),
    ]
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp / "config")}  # not the user's settings
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.pop("DASK_DL_PROGRESS", None)  # the kernels show what a reader sees: notebook bars
    log = open(tmp / "jupyter.log", "wb")  # noqa: SIM115 - lives with the process
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        with _timed("server start"):
            _wait_for(lambda: _get(f"{base}/api/status?token={token}") == 200 or proc.poll(), 90)
        assert proc.poll() is None, (tmp / "jupyter.log").read_text()[-3000:]
        yield base, token
    finally:
        _stop_lab(proc, base, token)
        log.close()
        SHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp / "jupyter.log", SHOTS / "jupyter.log")
        (SHOTS / "timings.json").write_text(json.dumps(TIMINGS, indent=1))


def _stop_lab(proc: subprocess.Popen, base: str, token: str) -> None:
    """Shut the kernels down first (their clusters close), then the server and its group."""
    with contextlib.suppress(Exception):
        for k in json.loads(urllib.request.urlopen(f"{base}/api/kernels?token={token}").read()):
            req = urllib.request.Request(
                f"{base}/api/kernels/{k['id']}?token={token}", method="DELETE"
            )
            urllib.request.urlopen(req, timeout=30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def driver(browser_paths, tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = browser_paths
    tmp = tmp_path_factory.mktemp("chromium")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1500,1000",
        f"--user-data-dir={tmp / 'profile'}",
    ):
        options.add_argument(arg)
    service = Service(chromedriver, log_output=str(tmp / "chromedriver.log"))
    browser = webdriver.Chrome(options=options, service=service)
    browser.set_script_timeout(60)
    try:
        yield browser
    finally:
        browser.quit()


@pytest.fixture(scope="module")
def s3_dir(tmp_path_factory):
    """An embedded S3 server; notebook 04's s3_data_dir points at its folder (it reuses it)."""
    with s3server.EmbeddedS3(tmp_path_factory.mktemp("s3")) as server:
        yield server.data_dir


# --- small tools -------------------------------------------------------------------------------


def _get(url: str, timeout: float = 5.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except Exception:  # noqa: BLE001 - not up yet
        return 0


def _wait_for(predicate, timeout: float, every: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _shot(driver, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


# The notebook open in the main area (other panels, the Dask ones, may have the focus).
NOTEBOOK_JS = (
    "const nb = Array.from(window.jupyterapp.shell.widgets('main'))"
    ".find(w => w.content && w.content.widgets && w.sessionContext); "
)


def _js(driver, body: str, *args):
    return driver.execute_script(NOTEBOOK_JS + body, *args)


def _open(driver, lab, path: str) -> None:
    """Open ``path`` in a fresh workspace and wait for its kernel to be idle."""
    base, token = lab
    driver.get(f"{base}/lab/tree/{path}?reset&token={token}")
    _wait_for(
        lambda: driver.execute_script(
            "const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;"
            "return !!(w && w.context && w.context.path === arguments[0] && w.sessionContext"
            " && w.sessionContext.session && w.sessionContext.session.kernel"
            " && w.sessionContext.session.kernel.status === 'idle');",
            path,
        ),
        120,
        what=f"{path} open with an idle kernel",
    )


def _show_main(label: str, driver) -> None:
    """Bring the main-area tab ``label`` to the front ("": the notebook)."""
    _js(
        driver,
        "const app = window.jupyterapp;"
        "const w = arguments[0] ? Array.from(app.shell.widgets('main'))"
        ".find(w => w.title.label === arguments[0]) : nb;"
        "app.shell.activateById(w.id);",
        label,
    )


def _run(driver, command: str, active: int | None = None) -> None:
    _js(driver, "window.jupyterapp.shell.activateById(nb.id);")
    if active is not None:
        _js(driver, "nb.content.activeCellIndex = arguments[0];", active)
    _js(driver, "window.jupyterapp.commands.execute(arguments[0]);", command)


def _executed(driver, index: int, idle: bool = True) -> bool:
    """Cell ``index`` has finished running (an execution count) and (``idle``) so has the rest."""
    return _js(
        driver,
        "const c = nb.content.widgets[arguments[0]].model;"
        "return c.executionCount !== null"
        " && (!arguments[1] || nb.sessionContext.session.kernel.status === 'idle');",
        index,
        idle,
    )


def _errors(driver) -> list[str]:
    return _js(
        driver,
        "const out = [];"
        "for (const c of nb.content.widgets) { if (c.model.type !== 'code') continue;"
        "  for (const o of c.model.outputs.toJSON()) if (o.output_type === 'error')"
        "    out.push(o.ename + ': ' + o.evalue); }"
        "return out;",
    )


def _output_text(driver, index: int) -> str:
    return _js(
        driver,
        "const c = nb.content.widgets[arguments[0]];"
        "return Array.from(c.node.querySelectorAll('.jp-OutputArea-output'))"
        ".map(e => e.innerText).join('\\n');",
        index,
    )


def _markdown_images(driver) -> list[list]:
    """[src, loaded width] of every image rendered from the notebook's markdown."""
    return _js(
        driver,
        "return Array.from(nb.content.node.querySelectorAll('.jp-MarkdownOutput img'))"
        ".map(i => [i.src, i.complete ? i.naturalWidth : 0]);",
    )


def _images_loaded(driver, path: str) -> int:
    """Every image the notebook's markdown references has loaded (natural width > 0)."""
    wanted = len(_referenced_images(REPO / path))
    images = (
        _wait_for(
            lambda: (imgs := _markdown_images(driver)) and all(w > 0 for _, w in imgs) and imgs,
            30,
            what="the markdown images to load",
        )
        if wanted
        else _markdown_images(driver)
    )
    assert len(images) == wanted, (images, wanted)
    return wanted


def _referenced_images(path: Path) -> list[str]:
    nb = nbformat.read(path, as_version=4)
    pattern = r"!\[[^\]]*\]\(([^)]+)\)"
    return [r for c in nb.cells if c.cell_type == "markdown" for r in re.findall(pattern, c.source)]


def _save(driver) -> None:
    _js(driver, "return window.jupyterapp.commands.execute('docmanager:save');")
    _wait_for(lambda: not _js(driver, "return nb.context.model.dirty;"), 30, what="the save")


def _cell_index(path: Path, needle: str) -> int:
    cells = nbformat.read(path, as_version=4).cells
    return next(i for i, c in enumerate(cells) if c.cell_type == "code" and needle in c.source)


def _copy_with_parameters(src: Path, dest: Path, values: dict) -> None:
    """A copy of notebook ``src`` whose parameters cell holds ``values`` instead."""
    nb = nbformat.read(src, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    for name, value in values.items():
        line = re.compile(rf"^({name}: \w+ = ).*?(\s+#.*)?$", re.M)
        cell.source, n = line.subn(
            lambda m, v=value: f"{m.group(1)}{v!r}{m.group(2) or ''}", cell.source
        )
        assert n == 1, f"{src.name} has no parameter {name}"
    nbformat.write(nb, dest)


@pytest.fixture
def notebook_copy():
    """A path for a notebook copy beside the originals (so its ../img links resolve); removed."""
    made = []

    def make(prefix: str, values: dict) -> str:
        (src,) = sorted((REPO / "notebooks").glob(f"{prefix}-*.ipynb"))
        dest = src.with_name(f"_browser-{secrets.token_hex(3)}-{src.name}")
        _copy_with_parameters(src, dest, values)
        made.append(dest)
        return str(dest.relative_to(REPO))

    yield make
    for path in made:
        path.unlink(missing_ok=True)
        checkpoints = path.parent / ".ipynb_checkpoints"  # what JupyterLab's save left
        (checkpoints / f"{path.stem}-checkpoint.ipynb").unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            checkpoints.rmdir()  # only when empty: never someone else's checkpoints


# --- the tests ---------------------------------------------------------------------------------


def test_notebook_01_runs_and_the_dask_panel_finds_its_client(driver, lab, notebook_copy):
    path = notebook_copy("01", {})  # as committed; a copy, so the original stays untouched
    client_cell = _cell_index(REPO / path, "client = make_client(")
    with _timed("01: open, kernel idle"):
        _open(driver, lab, path)
    # Up to the displayed client, so its dashboard can be checked while the cluster runs.
    with _timed("01: run to the client"):
        _run(driver, "notebook:run-all-above", active=client_cell + 1)
        _wait_for(lambda: _executed(driver, client_cell), 120, what="the client cell")
    shown = _output_text(driver, client_cell)
    link = re.search(r"Dashboard: (http://\S+/status)", shown)
    assert link, shown
    assert _get(link.group(1), timeout=30) == 200, link.group(1)

    # The Dask panel: its search runs default_client().dashboard_link in this notebook's kernel.
    panel_started = time.monotonic()
    driver.find_element("css selector", "li[data-id='dask-dashboard-launcher']").click()
    driver.find_element(
        "css selector", ".dask-URLInput [title='Auto-detect dashboard URL']"
    ).click()
    url_input = ".dask-URLInput input"
    found = _wait_for(
        lambda: driver.find_element("css selector", url_input).get_attribute("value"),
        30,
        what="the Dask panel's search",
    )
    assert found.rstrip("/") == link.group(1).removesuffix("/status"), found
    task_stream = _wait_for(
        lambda: next(
            (
                b
                for b in driver.find_elements("css selector", ".dask-DashboardListing-item button")
                if b.text.strip().lower() == "task stream" and b.is_enabled()
            ),
            None,
        ),
        30,
        what="the dashboard's Task Stream button",
    )
    task_stream.click()
    frame = _wait_for(
        lambda: driver.find_elements("css selector", "iframe[src*='individual-task-stream']"),
        30,
        what="the Task Stream panel",
    )[0]
    driver.switch_to.frame(frame)  # the dashboard's Bokeh page, served through the lab server
    try:
        _wait_for(
            lambda: driver.execute_script(
                "return !!(window.Bokeh && Bokeh.documents.length"
                " && Bokeh.documents[0].roots().length);"
            ),
            60,
            what="the Task Stream plot to render",
        )
    finally:
        driver.switch_to.default_content()
    time.sleep(1)  # let it paint before the screenshot
    _shot(driver, "01-dask-panel")
    TIMINGS["01: Dask panel search, Task Stream"] = round(time.monotonic() - panel_started, 1)
    # The GPU dashboard's panel is in the left bar too (its charts need an NVIDIA GPU for data).
    gpu = driver.find_element("css selector", "li[data-id='gpu-dashboard']")
    assert gpu.get_attribute("title") == "GPU Dashboards", gpu.get_attribute("outerHTML")[:300]

    last = _js(driver, "return nb.content.widgets.length;") - 1
    with _timed("01: run the rest"):
        _run(driver, "notebook:run-all-below", active=client_cell + 1)
        # Mid-run, while the cluster is up: the Task Stream panel with the notebook's tasks.
        array_cell = _cell_index(REPO / path, "b.compute()")
        _wait_for(lambda: _executed(driver, array_cell, idle=False), 120, what="dask.array")
        _show_main("Task Stream", driver)
        time.sleep(1.5)
        _shot(driver, "01-task-stream")
        _show_main("", driver)
        _wait_for(lambda: _executed(driver, last), 240, what="the last cell of notebook 01")
    _shot(driver, "01-dask-basics")
    assert _errors(driver) == []
    assert "this run took" in _output_text(driver, last)
    _images_loaded(driver, path)


def test_notebook_04_live_plot_changes_and_images_load(
    driver, lab, s3_dir, notebook_copy, tmp_path
):
    values = {**SMALL_04, "s3_data_dir": str(s3_dir), "checkpoint_url": str(tmp_path / "ckpt")}
    path = notebook_copy("04", values)
    train_cell = _cell_index(REPO / path, "watch.follow(")
    with _timed("04: open, kernel idle"):
        _open(driver, lab, path)
    # Every picture the kernel sends the training cell (each redraw replaces the one before):
    # kept as it arrives, so none is missed however fast the redraws come.
    _js(
        driver,
        "const c = nb.content.widgets[arguments[0]]; window.livePictures = [];"
        "c.model.outputs.changed.connect(() => { for (const o of c.model.outputs.toJSON()) {"
        "  const png = o.data && o.data['image/png'];"
        "  if (png && window.livePictures.at(-1) !== png) window.livePictures.push(png); } });",
        train_cell,
    )
    run_started = time.monotonic()
    _run(driver, "notebook:run-all-cells")

    shots, started = 0, time.monotonic()
    while not _executed(driver, train_cell, idle=False):
        assert time.monotonic() - started < 420, "notebook 04's training cell did not finish"
        seen = _js(driver, "return window.livePictures.length;")
        if shots < min(seen, 2):  # for a person: the plot while it is being redrawn
            _js(
                driver,
                "const img = nb.content.widgets[arguments[0]].node.querySelector("
                "'.jp-OutputArea-output img'); if (img) img.scrollIntoView({block: 'center'});",
                train_cell,
            )
            shots += 1
            _shot(driver, f"04-live-{shots}")
        time.sleep(0.3)
    TIMINGS["04: run to the end of training"] = round(time.monotonic() - run_started, 1)
    sent = _js(driver, "return window.livePictures;")
    pictures = list(dict.fromkeys(hashlib.sha1(p.encode()).hexdigest() for p in sent))
    # The synthetic data's upload showed tqdm's notebook bar (helpers.progress in a live kernel).
    upload = _output_text(driver, _cell_index(REPO / path, "prepare.ensure_synthetic("))
    upload = upload.replace("\u2007", " ")  # tqdm pads with figure spaces
    assert "synthetic s3://dogs/browser" in upload and "120/120" in upload, upload
    # One picture at least per epoch's end (helpers.monitor draws each, however fast): two
    # different ones before the last, which shows the final epoch's record.
    assert len(pictures) >= SMALL_04["epochs"], f"{len(pictures)} distinct live pictures"

    last = _js(driver, "return nb.content.widgets.length;") - 1
    with _timed("04: cells after training"):
        _wait_for(lambda: _executed(driver, last), 240, what="the last cell of notebook 04")
    assert _images_loaded(driver, path) >= 1
    _shot(driver, "04-distributed-training")
    _save(driver)
    saved = nbformat.read(REPO / path, as_version=4)
    errors = [o for c in saved.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert errors == [], errors
    assert _errors(driver) == []


def test_stop_button_cancels_the_training_job(driver, lab, s3_dir, notebook_copy, tmp_path):
    values = {
        **SMALL_04,
        "epochs": 100,
        "max_steps": 0,
        "s3_data_dir": str(s3_dir),
        "checkpoint_url": str(tmp_path / "ckpt"),
    }
    path = notebook_copy("04", values)
    train_cell = _cell_index(REPO / path, "watch.follow(")
    _open(driver, lab, path)
    _run(driver, "notebook:run-all-cells")
    has_picture = "return !!nb.content.widgets[arguments[0]].node.querySelector('img');"
    _wait_for(lambda: _js(driver, has_picture, train_cell), 300, what="training to start")
    driver.find_element("css selector", "[data-command='notebook:interrupt-kernel']").click()
    pressed = time.monotonic()
    _wait_for(
        lambda: _js(driver, "return nb.sessionContext.session.kernel.status === 'idle';"),
        15,  # Job.cancel's 10 s, and the kernel's answer
        what="the stop button to end the training cell",
    )
    TIMINGS["04: stop button to an idle kernel"] = round(time.monotonic() - pressed, 1)
    _js(driver, "nb.content.widgets[arguments[0]].node.scrollIntoView();", train_cell)
    _shot(driver, "04-stopped")
    stopped = _output_text(driver, train_cell)
    assert "KeyboardInterrupt" in stopped and "cancelling the job" in stopped, stopped
    # A new job starts at once: the lock was released (5 s to take it) and every rank ended.
    code = (
        "import dataclasses\n"
        "again = ddp.start(client, train.train_rank, dataclasses.replace(config, epochs=1,"
        " max_steps=1), options, lock_timeout_s=5)\n"
        "again.result(timeout=120)\n'started again'"
    )
    _js(
        driver,
        "nb.content.activeCellIndex = arguments[0];"
        "window.jupyterapp.commands.execute('notebook:insert-cell-below');"
        "nb.content.activeCell.model.sharedModel.setSource(arguments[1]);",
        train_cell,
        code,
    )
    started = time.monotonic()
    _run(driver, "notebook:run-cell")
    _wait_for(lambda: _executed(driver, train_cell + 1), 150, what="a new job after the stop")
    assert "started again" in _output_text(driver, train_cell + 1)
    assert time.monotonic() - started < 150
