"""helpers.inference: each image's own softmax, one model per worker, clear checkpoint errors."""

import dataclasses

import pytest
import torch

from helpers import checkpoint, data, inference, prepare
from helpers.cluster import make_client
from helpers.config import InferenceConfig, TrainConfig
from helpers.errors import CheckpointError, NotFound
from helpers.loop import whole
from helpers.loop.model import build_model


@pytest.fixture(scope="module")
def saved(dogs, tmp_path_factory):
    """An untrained (random) resnet18 checkpoint over the tiny dataset's classes."""
    url, options, manifest = dogs
    folder = str(tmp_path_factory.mktemp("ckpt"))
    torch.manual_seed(0)
    model = build_model("resnet18", len(manifest.classes))
    cfg = TrainConfig(data_url=url, arch="resnet18", image_size=32)
    whole.save(
        folder,
        None,
        {
            "model": model.state_dict(),
            "epoch": 1,
            "config": dataclasses.asdict(cfg),
            "classes": list(manifest.classes),
            "metrics": {},
        },
    )
    return folder


def _settings(url, folder):
    return InferenceConfig(data_url=url, checkpoint_url=folder)


def test_probabilities_are_each_images_own_softmax(dogs, saved):
    url, options, manifest = dogs
    keys = list(manifest.keys[::5])
    rows = inference.predict(_settings(url, saved), options, keys)
    model, state, _ = checkpoint.cached_model(saved, options)
    ds = data.dataset(manifest, keys, options, 32, train=False)
    for row, (_, x, _) in zip(rows, ds.samples(list(range(len(keys)))), strict=True):
        with torch.inference_mode():
            own = model(x[None]).float().softmax(1)[0]  # this image alone
        assert row["probability"] == pytest.approx(float(own.max()), abs=1e-4)
        assert [p for _, p in row["top5"]] == pytest.approx(
            own.topk(len(row["top5"])).values.tolist(), abs=1e-3
        )
    assert len({round(r["probability"], 6) for r in rows}) > 1  # not the first image's, copied


@pytest.mark.slow
def test_model_is_built_once_per_worker_for_many_tasks(dogs, saved):
    url, options, manifest = dogs
    with make_client("local", n_workers=2) as client:
        settings = _settings(url, saved)
        client.run(inference.warm, settings, options, manifest.keys[:2])  # one build each
        assert set(client.run(inference.builds).values()) == {1}
        work = inference.batches(manifest.keys, 4)  # 10 tasks
        rows = inference.predict_on_cluster(client, settings, options, work)
        builds = client.run(inference.builds)
    assert len(rows) == len(manifest.keys)
    assert set(builds.values()) == {1}  # no task built its own


def test_missing_checkpoint_names_the_url(tmp_path):
    with pytest.raises(NotFound, match=f"no checkpoint at {tmp_path}/none/checkpoint.pt"):
        checkpoint.cached_model(str(tmp_path / "none"))


def test_incompatible_checkpoint_says_what_was_expected(tmp_path, saved):
    whole.save(str(tmp_path / "odd"), None, {"weights": {}})
    with pytest.raises(ValueError, match=r"odd/checkpoint.pt is not a checkpoint.*'classes'"):
        checkpoint.cached_model(str(tmp_path / "odd"))
    state = checkpoint.load(saved)
    state["classes"] = state["classes"] + ["n00000000-extra"]
    whole.save(str(tmp_path / "wrong"), None, state)
    with pytest.raises(CheckpointError, match="does not fit a resnet18 with 5 classes"):
        checkpoint.cached_model(str(tmp_path / "wrong"))


def test_predictions_from_shards_keep_the_original_keys(dogs, saved):
    url, options, manifest = dogs
    index = prepare.ensure_shards(url, options)
    first = index["splits"]["val"]["shards"][0]
    settings = _settings(url, saved)
    rows = inference.predict(settings, options, first["name"])
    assert len(rows) == first["images"] and {r["key"] for r in rows} <= set(manifest.keys)
    by_keys = inference.predict(settings, options, [r["key"] for r in rows])
    assert [r["probability"] for r in rows] == pytest.approx(
        [r["probability"] for r in by_keys], abs=1e-5
    )  # the same images, the same model: the same answer from either layout


def _odd_shards(dogs, folder: str, samples) -> str:
    """A dataset URL whose one shard, ``val-000000.tar``, holds ``samples``: ``(key, label,
    bytes)``, or bytes (the shard itself)."""
    from helpers.s3 import storage
    from helpers.shards import format as shard_format

    url, options, _ = dogs
    odd = storage.join(url, folder)
    blob = samples if isinstance(samples, bytes) else shard_format.pack_shard(samples)
    fs = storage.filesystem(odd, options)
    fs.pipe_file(f"{storage.split_url(odd)[1]}/shards/val-000000.tar", blob)
    return odd


def _photos(dogs, n):
    from helpers.s3 import storage

    url, options, manifest = dogs
    fs = storage.filesystem(url, options)
    keys = [manifest.keys[i] for i in range(0, len(manifest.keys), len(manifest.keys) // n)][:n]
    return keys, [fs.cat_file(f"{storage.split_url(url)[1]}/{k}") for k in keys]


def test_shard_inference_reads_jpeg_and_png_members_and_labels_them_by_key(dogs, saved):
    import io

    from PIL import Image

    url, options, manifest = dogs
    keys, blobs = _photos(dogs, 3)
    png = io.BytesIO()
    Image.open(io.BytesIO(blobs[1])).save(png, "PNG")
    named = [keys[0][: -len(".jpg")] + ".jpeg", keys[1][: -len(".jpg")] + ".png", keys[2]]
    # Every label member says 0: the shards' class list need not be the checkpoint's; the key's
    # class folder, looked up among the checkpoint's classes, is the true label.
    odd = _odd_shards(
        dogs,
        "odd-members",
        list(zip(named, [0] * 3, [blobs[0], png.getvalue(), blobs[2]], strict=True)),
    )
    rows = inference.predict(_settings(odd, saved), options, "val-000000.tar")
    assert [r["key"] for r in rows] == named
    assert [r["true"] for r in rows] == [data.breed(data.class_folder(k)) for k in keys]
    assert len({r["true"] for r in rows}) > 1


def test_shard_inference_skips_and_names_damaged_members(dogs, saved, caplog):
    import logging

    from helpers.shards import format as shard_format

    url, options, manifest = dogs
    keys, blobs = _photos(dogs, 3)
    labels = [manifest.label(k) for k in keys]
    blob = shard_format.pack_shard(
        zip(keys, labels, [blobs[0], b"not an image", blobs[2]], strict=True)
    )
    cut = blob[: blob.index(keys[2][: -len(".jpg")].encode() + b".jpg") + 1000]  # in the third
    odd = _odd_shards(dogs, "odd-damaged", cut)
    with caplog.at_level(logging.WARNING):
        rows = inference.predict(_settings(odd, saved), options, "val-000000.tar")
    assert [r["key"] for r in rows] == keys[:1]
    assert f"{keys[1]}" in caplog.text and "val-000000.tar" in caplog.text  # the bad image
    assert "shard " in caplog.text and "damaged after" in caplog.text  # the cut-off third


def test_shard_inference_refuses_a_key_of_a_class_the_model_does_not_know(dogs, saved):
    from helpers.errors import ParameterError

    keys, blobs = _photos(dogs, 1)
    stranger = "Images/n99999999-stranger/n99999999_1.jpg"
    odd = _odd_shards(dogs, "odd-class", [(stranger, 0, blobs[0])])
    with pytest.raises(ParameterError, match=f"{stranger}: its class 'n99999999-stranger'"):
        inference.predict(_settings(odd, saved), dogs[1], "val-000000.tar")


def test_a_sharded_checkpoint_in_s3_predicts_what_the_whole_one_does(dogs, saved, tmp_path):
    """FSDP's checkpoint (every rank's shards, here one rank's) gathered whole for inference:
    the same weights as ``saved``, so the same predictions and probabilities."""
    import torch.distributed as dist

    from helpers.loop import parallel, sharded
    from helpers.loop.state import TrainState

    url, options, manifest = dogs
    state = whole.load(saved)
    folder = f"s3://dogs/fsdp-{tmp_path.name}"
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rv", rank=0, world_size=1)
    try:
        model = build_model("resnet18", len(manifest.classes))
        model.load_state_dict(state["model"])
        model = parallel.wrap(model, "fsdp", torch.device("cpu"))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        trained = TrainState(model, torch.nn.CrossEntropyLoss(), opt, sched)
        meta = {k: state[k] for k in ("epoch", "config", "classes", "metrics")}
        sharded.save(
            folder, options, trained, meta | {"config": {**meta["config"], "strategy": "fsdp"}}
        )
    finally:
        dist.destroy_process_group()
    keys = list(manifest.keys[::7])
    rows = inference.predict(_settings(url, folder), options, keys)
    want = inference.predict(_settings(url, saved), options, keys)
    assert [r["predicted"] for r in rows] == [r["predicted"] for r in want]
    assert [r["probability"] for r in rows] == pytest.approx([r["probability"] for r in want])
    assert checkpoint.cached_model(folder, options)[1]["shards"].startswith(f"{folder}/sharded/")
