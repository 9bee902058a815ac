"""DataLoaders inside Dask workers: their processes come from a forkserver where Dask spawns."""

from helpers.loading import dataloader


def test_loader_processes_are_forked_from_a_forkserver_where_dask_spawns(monkeypatch):
    import multiprocessing

    assert multiprocessing.get_start_method() == "fork"  # this process: the default stays
    assert dataloader.make_loader(list(range(4)), 2, num_workers=1).multiprocessing_context is None
    # Dask's worker processes run under "spawn": a fresh interpreter (torch imported) per epoch
    monkeypatch.setattr(multiprocessing, "get_start_method", lambda *a, **k: "spawn")
    loader = dataloader.make_loader(list(range(4)), 2, num_workers=1)
    assert loader.multiprocessing_context.get_start_method() == "forkserver"
    assert dataloader.make_loader(list(range(4)), 2, num_workers=0).multiprocessing_context is None


# A process that makes a loader as a Dask worker does (spawned, so its loader processes come
# from a forkserver), takes one batch, says who its loader processes are, and waits.
_OWNER = """
import multiprocessing, sys, time
from helpers.loading import dataloader

if __name__ == "__main__":
    multiprocessing.set_start_method("spawn", force=True)
    loader = dataloader.make_loader([(i, 0) for i in range(64)], 2, num_workers=2)
    batches = iter(loader)
    next(batches)
    from multiprocessing import forkserver
    pids = [w.pid for w in batches._workers] + [forkserver._forkserver._forkserver_pid]
    print(" ".join(map(str, pids)), flush=True)
    time.sleep(600)
"""


def _gone(pid: int) -> bool:
    """No such process, or a zombie (it has exited; its new parent has not reaped it yet)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[-1].split()[0] == b"Z"
    except FileNotFoundError:
        return True


def test_loader_processes_and_their_forkserver_leave_when_their_owner_is_killed(tmp_path):
    """A Dask worker killed (out of memory, SIGKILL) left its loader processes and their
    forkserver running forever: PyTorch's check watches the parent, the forkserver."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    script = tmp_path / "owner.py"
    script.write_text(_OWNER)
    repo = str(Path(__file__).resolve().parents[2])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])),
    }
    owner = subprocess.Popen([sys.executable, str(script)], env=env, cwd=repo,
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        pids = [int(p) for p in owner.stdout.readline().split()]
        assert len(pids) == 3 and not any(_gone(p) for p in pids)
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not all(_gone(p) for p in pids):
        time.sleep(0.2)
    left = [p for p in pids if not _gone(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)  # do not leave them to the next test
    assert not left, f"still running after their owner was killed: {left} of {pids}"
