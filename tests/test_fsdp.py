"""FSDP (strategy="fsdp") on 2 CPU ranks with gloo: the same training as DDP, the model sharded."""

import dataclasses
import sys

import cloudpickle
import pytest

from helpers import ddp, monitor, train
from helpers.cluster import make_client
from helpers.config import TrainConfig
from helpers.errors import ParameterError

cloudpickle.register_pickle_by_value(sys.modules[__name__])

# FSDP's reduce-scatter sums in another order than DDP's all-reduce: the same numbers, up to
# float32 rounding, which grows a little with each step.
LOSS_RTOL = 1e-4


@pytest.fixture(scope="module")
def client():
    with make_client("local", n_workers=2) as c:
        yield c


def _config(dogs, **kw):
    url, _, _ = dogs
    base = dict(
        data_url=url,
        arch="resnet18",
        image_size=32,
        batch_size=4,
        epochs=2,
        loader_workers=1,
        log_every=1,
        lr=0.4,
        warmup_epochs=0.5,
        threads=1,
        data_format="objects",
    )
    return TrainConfig(**{**base, **kw})


def _losses(watch) -> dict:
    steps = watch.frame("step")
    return {(int(r.rank), int(r.epoch), int(r.step)): r.loss for r in steps.itertuples(index=False)}


@pytest.mark.slow
def test_two_fsdp_ranks_train_what_two_ddp_ranks_do_holding_half_each(client, dogs):
    """The same data, seed and steps: every rank's running loss at every step, and the whole
    model's parameter sum after each epoch, match DDP's within LOSS_RTOL; each rank holds
    about half of DDP's parameters, gradients and optimizer state."""
    _, options, _ = dogs
    runs = {}
    for strategy in ("ddp", "fsdp"):
        cfg = _config(dogs, strategy=strategy, topic=f"fsdp-test-{strategy}")
        watch = monitor.Monitor(client, cfg.topic)
        runs[strategy] = (ddp.run(client, train.train_rank, cfg, options), _losses(watch))
        watch.close()
    (ddp_hist, ddp_loss), (fsdp_hist, fsdp_loss) = runs["ddp"], runs["fsdp"]
    assert len(ddp_loss) >= 8 and ddp_loss.keys() == fsdp_loss.keys()
    assert [fsdp_loss[k] for k in sorted(ddp_loss)] == pytest.approx(
        [ddp_loss[k] for k in sorted(ddp_loss)], rel=LOSS_RTOL
    )
    for d, f in zip(ddp_hist[0], fsdp_hist[0], strict=True):  # rank 0's epochs
        assert f["param_sum"] == pytest.approx(d["param_sum"], rel=LOSS_RTOL)
        assert f["val_loss"] == pytest.approx(d["val_loss"], rel=LOSS_RTOL)
    assert fsdp_hist[0][-1]["param_sum"] == fsdp_hist[1][-1]["param_sum"]  # one model
    assert ddp_hist[0][-1]["param_sum"] != ddp_hist[0][0]["param_sum"]  # it did train
    for part in ("param_bytes", "grad_bytes", "optim_bytes"):
        whole, shards = ddp_hist[0][-1][part], [h[-1][part] for h in fsdp_hist]
        assert whole > 0 and sum(shards) == pytest.approx(whole, rel=0.01), part
        assert max(shards) <= 0.55 * whole, part


@pytest.mark.slow
def test_an_fsdp_run_resumed_from_its_shards_logs_what_a_straight_run_logs(client, dogs, tmp_path):
    """As DDP's resume test (tests/test_train.py): stopped after epoch 1, resumed from the
    sharded checkpoint, epochs 2 and 3 give the straight run's numbers."""
    from helpers import checkpoint

    _, options, _ = dogs
    keys = ("train_loss", "train_acc", "val_loss", "val_top1", "param_sum")
    cfg = _config(dogs, strategy="fsdp", epochs=3, log_every=2)
    straight = ddp.run(client, train.train_rank, cfg, options)[0]
    ckpt = str(tmp_path / "resume")
    first = dataclasses.replace(cfg, checkpoint_url=ckpt, stop_after_epoch=1)  # "interrupted"
    assert [e["epoch"] for e in ddp.run(client, train.train_rank, first, options)[0]] == [1]
    assert [p.name for p in (tmp_path / "resume").iterdir()] == ["sharded"]  # no whole one
    then = dataclasses.replace(first, stop_after_epoch=0, resume=True)
    resumed = ddp.run(client, train.train_rank, then, options)[0]
    assert [e["epoch"] for e in resumed] == [2, 3]
    for late, same in zip(straight[1:], resumed, strict=True):  # same seed: same numbers
        assert [same[k] for k in keys] == pytest.approx([late[k] for k in keys], rel=1e-4)
    assert checkpoint.load(ckpt, options, "fsdp")["epoch"] == 3


def test_a_model_without_blocks_is_refused_by_fsdp_naming_what_it_shards(tmp_path):
    import torch
    import torch.distributed as dist

    from helpers.loop import parallel

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1
    )
    try:
        with pytest.raises(ParameterError, match="strategy='fsdp'.*Sequential has no BasicBlock"):
            parallel.wrap(torch.nn.Sequential(torch.nn.Linear(2, 2)), "fsdp", torch.device("cpu"))
    finally:
        dist.destroy_process_group()


def test_fsdp_with_fp16_is_refused_in_the_config_naming_both():
    with pytest.raises(ParameterError, match="amp='fp16' with strategy='fsdp'"):
        TrainConfig("s3://b/x", strategy="fsdp", amp="fp16")
    with pytest.raises(ParameterError, match="strategy='zero'; allowed: 'ddp', 'fsdp'"):
        TrainConfig("s3://b/x", strategy="zero")
    assert dataclasses.replace(TrainConfig("s3://b/x"), strategy="fsdp").amp == "auto"
