"""Checkpoints: refused with a clear error when missing, of another run, or of the other
strategy; FSDP's shards saved, counted once complete, pruned, resumed and gathered whole."""

import dataclasses

import pytest

from helpers import checkpoint
from helpers.config import TrainConfig
from helpers.errors import CheckpointError, NotFound
from helpers.s3 import storage


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


def test_a_run_resumes_only_a_checkpoint_of_its_own_strategy(tmp_path):
    """In the notebook's first cells (check_resume), before any worker starts: DDP's whole
    checkpoint refused to an FSDP run and FSDP's shards to a DDP run, naming both."""
    from helpers.loop import sharded, whole

    ddp_cfg = TrainConfig("s3://dogs/tiny", epochs=3, checkpoint_url=str(tmp_path / "d"),
                          resume=True)  # fmt: skip
    whole.save(ddp_cfg.checkpoint_url, None, {"epoch": 1, "config": dataclasses.asdict(ddp_cfg)})
    assert checkpoint.check_resume(ddp_cfg, None)["epoch"] == 1
    fsdp_cfg = dataclasses.replace(ddp_cfg, strategy="fsdp")
    with pytest.raises(CheckpointError, match=r"strategy='fsdp' from .*/d: it holds a checkpoint "
                       r"of strategy='ddp', .*checkpoint\.pt \(DDP's whole model\)"):  # fmt: skip
        checkpoint.check_resume(fsdp_cfg, None)

    fsdp_cfg = dataclasses.replace(fsdp_cfg, checkpoint_url=str(tmp_path / "f"))
    meta = {"epoch": 2, "config": dataclasses.asdict(fsdp_cfg)}
    save = storage.join(fsdp_cfg.checkpoint_url, sharded.FOLDER, "20261204T000000000000")
    whole.write(storage.join(save, sharded.META), None, whole.seal(meta))
    assert checkpoint.check_resume(fsdp_cfg, None)["shards"] == save
    with pytest.raises(CheckpointError, match=r"strategy='ddp' from .*/f: it holds a checkpoint "
                       r"of strategy='fsdp', .*/f/sharded/ \(FSDP's shards\)"):  # fmt: skip
        checkpoint.check_resume(dataclasses.replace(fsdp_cfg, strategy="ddp"), None)
    # nothing to resume of either kind: the run starts afresh
    empty = dataclasses.replace(fsdp_cfg, checkpoint_url=str(tmp_path / "e"))
    assert checkpoint.check_resume(empty, None) is None
