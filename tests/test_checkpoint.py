"""Checkpoints: verified, pruned to the newest, whole after a kill mid-write, and refused with a
clear error when missing or of another run."""

import dataclasses
import sys
import time

import pytest

from helpers import checkpoint
from helpers.config import TrainConfig
from helpers.errors import CheckpointError, NotFound


def _state(epoch):
    import torch

    return {"epoch": epoch, "config": {}, "blob": torch.zeros(0)}


def test_checkpoints_are_verified_and_pruned_to_the_newest(tmp_path):
    folder = str(tmp_path / "ck")
    for epoch in range(1, 5):
        checkpoint.save(folder, None, _state(epoch), keep=2)
    names = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert len(names) == 2 and "checkpoint.pt" in names  # the newest and one before it
    assert checkpoint.load(folder)["epoch"] == 4
    raw = bytearray((tmp_path / "ck" / "checkpoint.pt").read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped bit in the middle: torch.load alone may not notice
    (tmp_path / "ck" / "checkpoint.pt").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt is corrupt: its sha256 does not"):
        checkpoint.load(folder)


# Checkpoints of 64 MiB written in a loop, in a fresh interpreter: a child forked from this
# process (its threads, torch's OpenMP pool already started) can deadlock before writing at all.
_SAVE_FOREVER = """
import sys, torch
from helpers import checkpoint
for epoch in range(2, 10_000):
    state = {"epoch": epoch, "config": {}, "blob": torch.zeros(64 * 2**18)}
    checkpoint.save(sys.argv[1], None, state, keep=2)
"""


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one(tmp_path):
    import os
    import subprocess
    from pathlib import Path

    folder = str(tmp_path / "ck")
    checkpoint.save(folder, None, _state(1), keep=2)
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
    state = checkpoint.load(folder)
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
        checkpoint.save(str(folder), None, _state(epoch), keep=2)
    assert victim.read_bytes() == b"keep me"
    names = [name for kind, name in events if kind == "replace"]
    assert len(set(names)) == 2 and not any(str(os.getpid()) in n for n in names), names
    kinds = [name if kind == "fsync" else kind for kind, name in events]
    assert kinds == ["file", "replace", "folder"] * 2  # the rename made durable, each time
    assert checkpoint.load(str(folder))["epoch"] == 2


def test_transient_failures_of_exists_mv_ls_and_rm_are_retried(tmp_path):
    from helpers.s3 import retry, storage

    folder = str(tmp_path / "ck")
    fs = storage.filesystem(checkpoint.path(folder), None)
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
            checkpoint.save(folder, None, _state(epoch), keep=2)
    finally:
        for name in ("exists", "mv", "ls", "rm"):
            vars(fs).pop(name, None)
    assert sorted(failed) == ["exists", "ls", "mv", "rm"]
    assert retry.retries() - before == 4
    assert checkpoint.load(folder)["epoch"] == 3
    assert len(list((tmp_path / "ck").glob("checkpoint*.pt"))) == 2


def test_missing_checkpoint_names_the_url(tmp_path):
    with pytest.raises(NotFound, match=f"no checkpoint at {tmp_path}/none/checkpoint.pt"):
        checkpoint.model_from(str(tmp_path / "none"))


def test_resume_refuses_another_runs_checkpoint(tmp_path):
    cfg = TrainConfig("s3://dogs/tiny", epochs=3, checkpoint_url=str(tmp_path), resume=True)
    state = {"epoch": 1, "config": dataclasses.asdict(dataclasses.replace(cfg, seed=7))}
    with pytest.raises(CheckpointError, match="cannot resume from .*seed: 7 -> 0"):
        checkpoint.check_resumable(state, cfg)
    state = {"epoch": 3, "config": dataclasses.asdict(cfg)}
    with pytest.raises(CheckpointError, match="already at epoch 3; resume needs epochs > 3"):
        checkpoint.check_resumable(state, cfg)


def test_resume_refuses_another_number_of_ranks_or_another_batch_size(tmp_path):
    """The objects path's position is a count of batches, and the learning rate was scaled to
    ranks x batch_size: another world size or batch size would repeat or skip images."""
    cfg = TrainConfig("s3://dogs/tiny", epochs=3, checkpoint_url=str(tmp_path), resume=True)
    state = {"epoch": 1, "world_size": 2, "config": dataclasses.asdict(cfg)}
    checkpoint.check_resumable(state, cfg, world_size=2)
    with pytest.raises(CheckpointError, match="world_size: 2 -> 3"):
        checkpoint.check_resumable(state, cfg, world_size=3)
    bigger = dataclasses.replace(cfg, batch_size=32)
    with pytest.raises(CheckpointError, match="batch_size: 16 -> 32"):
        checkpoint.check_resumable(state, bigger, world_size=2)
