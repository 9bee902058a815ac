"""The whole checkpoint file (DDP's): verified, pruned to the newest, whole after a kill
mid-write, written through a temporary name no one can guess, retried through transient
failures."""

import sys
import time

import pytest

from helpers.errors import CheckpointError
from helpers.loop import whole


def _state(epoch):
    import torch

    return {"epoch": epoch, "config": {}, "blob": torch.zeros(0)}


def test_checkpoints_are_verified_and_pruned_to_the_newest(tmp_path):
    folder = str(tmp_path / "ck")
    for epoch in range(1, 5):
        whole.save(folder, None, _state(epoch), keep=2)
    names = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert len(names) == 2 and "checkpoint.pt" in names  # the newest and one before it
    assert whole.load(folder)["epoch"] == 4
    raw = bytearray((tmp_path / "ck" / "checkpoint.pt").read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped bit in the middle: torch.load alone may not notice
    (tmp_path / "ck" / "checkpoint.pt").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt is corrupt: its sha256 does not"):
        whole.load(folder)


# Checkpoints of 64 MiB written in a loop, in a fresh interpreter: a child forked from this
# process (its threads, torch's OpenMP pool already started) can deadlock before writing at all.
_SAVE_FOREVER = """
import sys, torch
from helpers.loop import whole
for epoch in range(2, 10_000):
    state = {"epoch": epoch, "config": {}, "blob": torch.zeros(64 * 2**18)}
    whole.save(sys.argv[1], None, state, keep=2)
"""


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one(tmp_path):
    import os
    import subprocess
    from pathlib import Path

    folder = str(tmp_path / "ck")
    whole.save(folder, None, _state(1), keep=2)
    repo = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    child = subprocess.Popen([sys.executable, "-c", _SAVE_FOREVER, folder], env=env, cwd=repo)
    deadline, partial = time.monotonic() + 60, []
    while not partial and time.monotonic() < deadline:  # a write under way: a growing .tmp
        partial = [p for p in (tmp_path / "ck").glob(".checkpoint.pt.*") if _size(p) > 0]
        time.sleep(0.01)
    child.kill()  # SIGKILL: no handler, no cleanup
    child.wait(10)
    assert partial and partial[0].exists()  # killed mid-write, the partial file is still there
    state = whole.load(folder)
    assert state is not None and state["epoch"] == 1  # the previous checkpoint, whole


def _size(path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # renamed since it was listed
        return 0


def test_the_temporary_name_is_unpredictable_and_the_folder_synced(tmp_path, monkeypatch):
    import os
    import stat

    folder = tmp_path / "ck"
    folder.mkdir()
    # A link where a temporary name made of the pid would be: writing through it would
    # overwrite what it points at.
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    (folder / f"checkpoint.pt.tmp-{os.getpid()}").symlink_to(victim)
    events, replace, fsync = [], os.replace, os.fsync

    def spy_replace(src, dst):
        events.append(("replace", os.path.basename(src)))
        replace(src, dst)

    def spy_fsync(fd):
        events.append(("fsync", "folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"))
        fsync(fd)

    monkeypatch.setattr(os, "replace", spy_replace)
    monkeypatch.setattr(os, "fsync", spy_fsync)
    for epoch in (1, 2):
        whole.save(str(folder), None, _state(epoch), keep=2)
    assert victim.read_bytes() == b"keep me"
    names = [name for kind, name in events if kind == "replace"]
    assert len(set(names)) == 2 and not any(str(os.getpid()) in n for n in names), names
    kinds = [name if kind == "fsync" else kind for kind, name in events]
    assert kinds == ["file", "replace", "folder"] * 2  # the rename made durable, each time
    assert whole.load(str(folder))["epoch"] == 2


def test_transient_failures_of_exists_mv_ls_and_rm_are_retried(tmp_path):
    from helpers.s3 import retry, storage

    folder = str(tmp_path / "ck")
    fs = storage.filesystem(whole.path(folder), None)
    failed = []

    def flaky(name):
        real = getattr(fs, name)

        def call(*args, **kwargs):
            if name not in failed:  # the first call of each: a reset connection
                failed.append(name)
                raise ConnectionResetError(f"injected into {name}")
            return real(*args, **kwargs)

        return call

    before = retry.retries()
    try:
        for name in ("exists", "mv", "ls", "rm"):
            setattr(fs, name, flaky(name))
        for epoch in range(1, 4):  # the third save prunes: exists, mv, ls and rm all run
            whole.save(folder, None, _state(epoch), keep=2)
    finally:
        for name in ("exists", "mv", "ls", "rm"):
            vars(fs).pop(name, None)
    assert sorted(failed) == ["exists", "ls", "mv", "rm"]
    assert retry.retries() - before == 4
    assert whole.load(folder)["epoch"] == 3
    assert len(list((tmp_path / "ck").glob("checkpoint*.pt"))) == 2
