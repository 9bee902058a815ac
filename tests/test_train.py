"""Real DDP training (gloo, 2 ranks on a LocalCluster) on the tiny synthetic dataset."""

import dataclasses
import sys

import cloudpickle
import pytest

from helpers import checkpoint, data, ddp, monitor, prepare, train
from helpers.cluster import make_client
from helpers.config import TrainConfig
from helpers.loading.batches import Batches
from helpers.loading.gpudecode import ToDevice
from helpers.loading.loaders import share_of
from helpers.loop.model import build_model
from helpers.loop.state import TrainState

cloudpickle.register_pickle_by_value(sys.modules[__name__])
pytestmark = pytest.mark.slow


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
        epochs=3,
        loader_workers=1,
        log_every=2,
        lr=0.4,
        warmup_epochs=0.5,
        threads=1,
        data_format="objects",
    )
    return TrainConfig(**{**base, **kw})


def _split_on_rank(url, options, *, rank, device):
    manifest = data.load_manifest(url, options)
    split = data.split(manifest)
    return {
        "train": split.train,
        "val": split.val,
        "shard": share_of(split.val, rank),
    }


def test_train_and_validation_are_disjoint_and_identical_on_every_rank(client, dogs):
    url, options, _ = dogs
    r0, r1 = ddp.run(client, _split_on_rank, url, options)
    assert r0["train"] == r1["train"] and r0["val"] == r1["val"]
    assert not set(r0["train"]) & set(r0["val"])
    assert not set(r0["shard"]) & set(r1["shard"])
    assert set(r0["shard"]) | set(r1["shard"]) == set(r0["val"])


def test_two_ranks_learn_in_step_and_stream_metrics(client, dogs, tmp_path):
    _, options, manifest = dogs
    cfg = _config(dogs, epochs=4, checkpoint_url=str(tmp_path / "ckpt"))
    watch = monitor.Monitor(client, "test-train")
    history = ddp.run(
        client, train.train_rank, dataclasses.replace(cfg, topic="test-train"), options
    )
    r0, r1 = history
    assert [e["epoch"] for e in r0] == [1, 2, 3, 4]
    assert [e["param_sum"] for e in r0] == pytest.approx([e["param_sum"] for e in r1], rel=1e-6)
    assert r0[-1]["param_sum"] != r0[0]["param_sum"]  # the optimizer stepped every epoch
    assert r0[-1]["val_images"] == r1[-1]["val_images"] == 8  # the whole val split, once
    steps = watch.frame("step")
    assert {0, 1} <= set(steps["rank"]) and steps["img_per_s"].gt(0).all()
    assert len(watch.frame("epoch")) == 4
    watch.close()
    model, state = checkpoint.model_from(cfg.checkpoint_url, options)
    assert state["epoch"] == 4 and state["classes"] == list(manifest.classes)


def test_a_resumed_run_logs_what_a_straight_run_logs(client, dogs, tmp_path):
    _, options, _ = dogs
    keys = ("train_loss", "train_acc", "val_loss", "val_top1", "param_sum")
    straight = ddp.run(client, train.train_rank, _config(dogs, epochs=3), options)[0]
    ckpt = str(tmp_path / "resume")
    first = _config(dogs, epochs=3, checkpoint_url=ckpt, stop_after_epoch=1)  # "interrupted"
    assert [e["epoch"] for e in ddp.run(client, train.train_rank, first, options)[0]] == [1]
    then = dataclasses.replace(first, stop_after_epoch=0, resume=True)
    resumed = ddp.run(client, train.train_rank, then, options)[0]
    assert [e["epoch"] for e in resumed] == [2, 3]
    for late, same in zip(straight[1:], resumed, strict=True):  # same seed: same numbers
        assert [same[k] for k in keys] == pytest.approx([late[k] for k in keys], rel=1e-4)
    assert checkpoint.load(ckpt, options)["epoch"] == 3


def _uneven_batches(*, rank, device):
    """Rank 1 gets an all-unreadable batch (None) where rank 0 gets images: both must finish."""
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = DDP(build_model("resnet18", 3))
    batch = (torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), torch.tensor([0, 1, 2, 0]))
    loader = [batch, None if rank.rank == 1 else batch, batch]
    batches = Batches(
        loader, ToDevice(32, train=True), source="objects", image_size=32, batch_size=4
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    trained = TrainState(model, torch.nn.CrossEntropyLoss(), opt, sched)
    cfg = TrainConfig("unused", image_size=32, log_every=1, topic="uneven")
    out = train.train_one_epoch(trained, batches, device, 1, cfg, rank)
    return {
        "seen": out["train_images"],
        "param_sum": float(sum(p.double().sum() for p in model.parameters())),
    }


def test_an_unreadable_batch_on_one_rank_keeps_ranks_in_step(client):
    r0, r1 = ddp.run(client, _uneven_batches, timeout_s=60)
    assert (r0["seen"], r1["seen"]) == (12, 8)
    assert r0["param_sum"] == pytest.approx(r1["param_sum"], rel=1e-6)


def test_two_ranks_train_from_uneven_shards_and_validate_every_image_once(client, dogs):
    url, options, _ = dogs
    index = prepare.write_shards(url, options, shard_size=7)  # 32 train, 8 val: uneven
    cfg = _config(dogs, epochs=1, data_format="shards", log_every=1)
    r0, r1 = (h[-1] for h in ddp.run(client, train.train_rank, cfg, options))
    val_split = index["splits"]["val"]["images"]
    assert r0["val_images"] == r1["val_images"] == val_split  # padding never counted
    assert r0["train_images"] == r1["train_images"] > 0  # the same number of steps on each rank
    assert r0["param_sum"] == pytest.approx(r1["param_sum"], rel=1e-6)


@pytest.fixture
def alone(tmp_path):
    """A process group of one (gloo), in this process: the loop's collectives really run."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0,
                            world_size=1)  # fmt: skip
    yield
    dist.destroy_process_group()


def _one_rank(batches_list, cfg, tmp_path):
    """A resnet18 of 3 classes, its training state and Batches over ``batches_list``."""
    import torch

    from helpers.config import Rank

    torch.manual_seed(0)
    model = build_model("resnet18", 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    trained = TrainState(model, torch.nn.CrossEntropyLoss(), opt, sched)
    batches = Batches(batches_list, ToDevice(32, train=True), source="objects", image_size=32,
                      batch_size=4)  # fmt: skip
    return trained, batches, Rank.alone()


def _batch(seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=g),
            torch.tensor([0, 1, 2, 0]))  # fmt: skip


def test_the_loop_syncs_the_host_and_talks_to_the_ranks_once_per_log_every(
    alone, tmp_path, monkeypatch
):
    """20 steps, a record every 5: the SIGTERM check's all-reduce and the metrics' .item()
    come per window, not per step (they would stall the GPU's overlap with the next batch)."""
    import torch
    import torch.distributed as dist

    cfg = TrainConfig("unused", image_size=32, log_every=5, topic="syncs")
    trained, batches, rank = _one_rank([_batch(i) for i in range(20)], cfg, tmp_path)
    saver = train.Saver(cfg, None, rank, trained, ["a", "b", "c"], batches)
    calls = {"all_reduce": 0, "item": 0}
    real_reduce, real_item = dist.all_reduce, torch.Tensor.item

    def counted(name, real):
        def call(*a, **kw):
            calls[name] += 1
            return real(*a, **kw)

        return call

    monkeypatch.setattr(dist, "all_reduce", counted("all_reduce", real_reduce))
    monkeypatch.setattr(torch.Tensor, "item", counted("item", real_item))
    train.train_one_epoch(trained, batches, torch.device("cpu"), 1, cfg, rank, 0, saver.step)
    assert calls["all_reduce"] == 20 // 5, calls  # one SIGTERM check a window
    assert calls["item"] <= 3 * (20 // 5) + 2, calls  # the window's record, the check, the end


def test_a_placeholder_step_changes_no_weight_no_statistic_and_no_metric(alone, tmp_path):
    """Every image of the second batch unreadable (None): the rank still steps (its peers would
    wait for it) but that step weighs nothing: alone, the weights and BatchNorm's running
    statistics stay as they were, and the metrics count the real batches only."""
    import copy

    import torch

    cfg = TrainConfig("unused", image_size=32, log_every=1, topic="placeholder")
    trained, batches, rank = _one_rank([_batch(0), None], cfg, tmp_path)
    after_one = []
    train.train_one_epoch(trained, batches, torch.device("cpu"), 1, cfg, rank, 0,
                          lambda done: after_one.append(copy.deepcopy(
                              trained.model.state_dict())))  # fmt: skip
    first, second = after_one
    assert all(torch.equal(first[k], second[k]) for k in first), [
        k for k in first if not torch.equal(first[k], second[k])
    ]
    out = train.train_one_epoch(trained, batches, torch.device("cpu"), 1, cfg, rank)
    assert out["train_images"] == 4  # the real batch only


def test_a_rank_told_to_go_without_a_checkpoint_folder_says_it_wrote_none(monkeypatch):
    import torch

    from helpers.errors import Terminated
    from helpers.jobs import rankctl

    cfg = TrainConfig("unused", image_size=32, log_every=1, topic="term")
    trained, batches, rank = _one_rank([_batch(0)], cfg, None)
    monkeypatch.setitem(rankctl._TERM, "at", 1.0)
    saver = train.Saver(cfg, None, rank, trained, ["a", "b", "c"], batches)
    with pytest.raises(Terminated, match=r"step 1; no checkpoint \(checkpoint_url=''\)") as err:
        train.train_one_epoch(trained, batches, torch.device("cpu"), 1, cfg, rank, 0, saver.step)
    assert "checkpointed" not in str(err.value)
