"""FSDP's sharded checkpoints (DCP) in one process group of one rank, local and on the embedded
S3: restored bitwise, gathered whole for inference, counted only once complete, pruned."""

import pytest

from helpers.errors import CheckpointError
from helpers.loop import parallel, sharded
from helpers.loop.model import build_model
from helpers.loop.state import TrainState


@pytest.fixture
def alone(tmp_path):
    """A process group of one (gloo), in this process."""
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()


def _trained(seed: int, steps: int = 1) -> TrainState:
    """A sharded resnet18 of 3 classes after ``steps`` SGD steps with momentum."""
    import torch

    torch.manual_seed(seed)
    model = parallel.wrap(build_model("resnet18", 3), "fsdp", torch.device("cpu"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    trained = TrainState(model, torch.nn.CrossEntropyLoss(), opt, sched)
    for i in range(steps):
        g = torch.Generator().manual_seed(i)
        images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=g)
        trained.criterion(model(images), torch.tensor([0, 1, 2, 0])).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return trained


def _local(trained: TrainState) -> dict:
    """Every parameter's and momentum's local shard, by name."""
    out = {}
    for name, p in trained.model.named_parameters():
        out[name] = p.to_local().clone()
        out[f"{name}.momentum"] = trained.optimizer.state[p]["momentum_buffer"].to_local().clone()
    return out


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_sharded_save_restores_bitwise_and_gathers_whole(alone, tmp_path, s3, where):
    import torch

    folder, options = str(tmp_path / "ck"), None
    if where == "s3":
        folder, options = f"s3://dogs/sharded-{tmp_path.name}", s3.storage_options
    trained = _trained(0, steps=2)
    url = sharded.save(folder, options, trained, {"epoch": 1, "note": "meta"})
    assert url.startswith(f"{folder}/sharded/")
    fresh = _trained(1, steps=1)  # other weights, other momentum
    assert _local(fresh).keys() == _local(trained).keys()
    found, meta = sharded.latest(folder, options)
    assert (found, meta) == (url, {"epoch": 1, "note": "meta"})
    sharded.load_into(fresh, url, options)
    want, got = _local(trained), _local(fresh)
    assert all(torch.equal(want[k], got[k]) for k in want), [
        k for k in want if not torch.equal(want[k], got[k])
    ]
    plain = build_model("resnet18", 3)  # one process, no sharding: inference's way
    sharded.load_model(plain, url, options)
    full = {n: p.full_tensor() for n, p in trained.model.named_parameters()}
    assert all(torch.equal(p, full[n]) for n, p in plain.named_parameters())


def test_a_save_counts_once_its_record_is_written_and_old_ones_go(alone, tmp_path):
    folder = str(tmp_path / "ck")
    trained = _trained(0)
    urls = [sharded.save(folder, None, trained, {"epoch": e}, keep=2) for e in (1, 2, 3)]
    kept = sorted(p.name for p in (tmp_path / "ck" / "sharded").iterdir())
    assert kept == [u.rsplit("/", 1)[-1] for u in urls[1:]]  # the newest two
    assert sharded.latest(folder)[1] == {"epoch": 3}
    # A save cut short (its shards, no record) is never resumed from, and goes at the next save
    newest = tmp_path / "ck" / "sharded" / kept[-1]
    (newest / sharded.META).unlink()
    assert sharded.latest(folder) == (urls[1], {"epoch": 2})
    urls.append(sharded.save(folder, None, trained, {"epoch": 4}, keep=2))
    kept = sorted(p.name for p in (tmp_path / "ck" / "sharded").iterdir())
    assert kept == [u.rsplit("/", 1)[-1] for u in (urls[1], urls[3])]


def test_a_damaged_record_or_shard_names_the_checkpoint(alone, tmp_path):
    folder = str(tmp_path / "ck")
    url = sharded.save(folder, None, _trained(0), {"epoch": 1})
    shard = next((tmp_path / "ck" / "sharded").glob("*/__0_0.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])  # cut short
    with pytest.raises(CheckpointError, match=f"could not read the sharded checkpoint: .*{url}"):
        sharded.load_into(_trained(1), url, None)
    meta = tmp_path / "ck" / "sharded" / url.rsplit("/", 1)[-1] / sharded.META
    raw = bytearray(meta.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    meta.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"meta\.pt is corrupt"):
        sharded.latest(folder)


# Two processes, two jobs: each process is rank 0 in one and rank 1 in the other, as a Dask
# worker is when a restart plans the ranks afresh. A fresh interpreter: spawn needs a file.
_SWAPPED = """
import sys, torch, torch.distributed as dist, torch.multiprocessing as mp
from helpers.loop import parallel, sharded
from helpers.loop.model import build_model
from helpers.loop.state import TrainState

def job(rank, folder, name, load):
    dist.init_process_group("gloo", init_method=f"file://{folder}/rv-{name}", rank=rank,
                            world_size=2)
    torch.manual_seed(0)
    model = parallel.wrap(build_model("resnet18", 3), "fsdp", torch.device("cpu"))
    opt = torch.optim.SGD(model.parameters(), 0.1, 0.9)
    trained = TrainState(model, torch.nn.CrossEntropyLoss(), opt,
                         torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))
    if load:
        sharded.load_into(trained, sharded.newest(f"{folder}/ck"), None)
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    trained.criterion(model(x), torch.tensor([0, 1, 2, 0])).backward()
    opt.step()
    sharded.save(f"{folder}/ck", None, trained, {"job": name})
    print(f"{name} rank {rank} saved", flush=True)
    dist.destroy_process_group()

def both(i, folder):
    torch.set_num_threads(1)
    job(i, folder, "first", False)
    job(i, folder, "again", True)
    job(1 - i, folder, "swapped", True)

if __name__ == "__main__":
    mp.spawn(both, args=(sys.argv[1],), nprocs=2)
"""


def test_a_process_that_was_another_rank_before_keeps_its_own_shards(tmp_path):
    """DTensor caches sharding decisions by the mesh's shape, not by the process's rank in it:
    without parallel.wrap emptying them, the swapped job's shards load and save as the other
    rank's (DCP: 'invalid fill tensor-volume: 9408 chunks-volume: 4704')."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "swapped.py"
    script.write_text(_SWAPPED)
    repo = str(Path(__file__).resolve().parents[2])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, cwd=repo,
                          capture_output=True, text=True, timeout=240)  # fmt: skip
    saved = sorted(line for line in done.stdout.splitlines() if line.endswith("saved"))
    assert done.returncode == 0 and len(saved) == 6, done.stderr[-2000:]
    assert sharded.latest(str(tmp_path / "ck"))[1] == {"job": "swapped"}
