"""A rank's batches for a config: bytes shipped and decoded on the device, the run's crops."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers import data, prepare
from helpers.config import CROP_SCALE, Rank, TrainConfig
from helpers.loading import gpudecode, loaders, transforms


@pytest.mark.parametrize("data_format", ["objects", "shards", "synthetic"])
def test_loaders_ship_bytes_and_the_rank_decodes_them(tmp_path, monkeypatch, data_format):
    url = str(tmp_path / "dogs")
    manifest = prepare.write_synthetic(url, None, 2, 6, seed=0)
    prepare.write_shards(url, None, val_fraction=0.25, seed=0, shard_size=4, manifest=manifest)
    monkeypatch.setattr(gpudecode, "resolve_decode", lambda decode, device: "gpu")  # on CPU
    scales, crops = [], transforms.train_tensors
    monkeypatch.setattr(transforms, "train_tensors", lambda *a: scales.append(a[3]) or crops(*a))
    cfg = TrainConfig(
        data_url=url,
        image_size=32,
        batch_size=3,
        loader_workers=0,
        val_fraction=0.25,
        data_format=data_format,
        decode="gpu",
        crop_scale=0.3,
    )
    rank, device = Rank.alone(), torch.device("cpu")
    split = data.split(manifest, 0.25, 0)
    train, val = loaders.make_loaders(cfg, None, manifest, split, rank, device)
    assert train.source == val.source == data_format
    train.start_epoch(1)
    batch = next(iter(train))
    if data_format != "synthetic":
        assert isinstance(batch[0], gpudecode.JpegBatch)
    x, y, real = train.to_device(batch, device)
    assert real and x.shape == (3, 3, 32, 32) and x.dtype == torch.uint8 and len(y) == 3
    assert scales == ([] if data_format == "synthetic" else [0.3])  # the run's crops, on device
    assert set(y.tolist()) <= set(range(len(manifest.classes)))
    seen = sum(len(val.to_device(b, device).labels) for b in val)
    assert seen == (len(split.val) if data_format != "synthetic" else -(-len(split.val) // 3) * 3)
    monkeypatch.undo()
    again = dataclasses.replace(cfg, decode="auto")  # on CPU: the loader processes decode
    if data_format != "synthetic":
        cpu_train, _ = loaders.make_loaders(again, None, manifest, split, rank, device)
        cpu_train.start_epoch(1)
        assert isinstance(next(iter(cpu_train))[0], torch.Tensor)


def test_crop_scale_is_checked_and_reaches_the_cpu_crops():
    with pytest.raises(ValueError, match="crop_scale=0; allowed: above 0, at most 1"):
        TrainConfig(data_url="x", crop_scale=0)
    train_tf = loaders._transforms(TrainConfig(data_url="x", crop_scale=0.3))[0]
    assert train_tf.transforms[0].scale == (0.3, 1.0)
    default = loaders._transforms(TrainConfig(data_url="x"))[0].transforms[0]
    assert default.scale == (CROP_SCALE, 1.0)
