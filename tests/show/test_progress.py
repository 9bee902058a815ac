"""helpers.progress: plain log lines under papermill and in scripts, tqdm's bar in a live
notebook kernel, and the caller's callback either way."""

import logging

import pytest

from helpers.show import progress


@pytest.fixture
def plain(monkeypatch):
    monkeypatch.delenv("DASK_DL_PROGRESS", raising=False)
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)  # as in papermill's kernels


def test_plain_log_lines_and_callback_outside_a_notebook(plain, caplog, capsys):
    seen = []
    with caplog.at_level(logging.INFO, logger="helpers.show.progress"):
        items = list(progress.progress(range(5), "upload", lambda d, t: seen.append((d, t)), "img"))
    assert items == list(range(5))
    assert seen == [(i, 5) for i in range(1, 6)]
    assert [r.getMessage().split(" img/s")[0].rsplit(" ", 1)[0] for r in caplog.records] == [
        "upload [5/5] 100%"
    ]  # one line at the end (none sooner: it took under every_s)
    assert "\r" not in capsys.readouterr().err  # no carriage-return bar


def test_a_total_counts_with_update_and_logs_every_few_seconds(plain, caplog):
    with caplog.at_level(logging.INFO, logger="helpers.show.progress"):
        with progress.progress(0, "stream", unit="img", every_s=0.0) as bar:
            bar.update(3)
            bar.update(2)
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(" ")[1] for line in lines] == ["[3]", "[5]"], lines


def test_the_bar_only_in_a_live_notebook_kernel(plain, monkeypatch):
    assert not progress.use_bar()
    monkeypatch.setenv("JPY_SESSION_NAME", "notebooks/01-dask-basics.ipynb")
    assert not progress.use_bar()  # not an IPython kernel here
    monkeypatch.setenv("DASK_DL_PROGRESS", "bar")
    assert progress.use_bar()
    monkeypatch.setenv("DASK_DL_PROGRESS", "log")
    assert not progress.use_bar()
