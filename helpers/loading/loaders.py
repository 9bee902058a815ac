"""The training and validation batches of one DDP rank, from objects or from shards.

``data_format`` picks the path: ``"objects"`` (one GET per image,
:mod:`helpers.loading.objects`, with a resumable ``DistributedSampler``), ``"shards"`` (tar
shards streamed whole, :mod:`helpers.shards.stream`), or ``"auto"``: shards where
``<data_url>/shards/index.json`` exists. Both give every rank the same split, a disjoint share
of it, the same number of batches, and the same transforms. ``"synthetic"`` reads nothing: one
random batch already on the device, every step, the ceiling a benchmark compares the real paths
with (``bench/bench_gpu.py``).

``decode`` picks where JPEGs are decoded: in the loader processes (``"cpu"``, PIL), or on the
GPU (``"gpu"``, :mod:`helpers.loading.gpudecode`: the loaders ship bytes); ``"auto"`` is the
GPU on CUDA. Either way the loop receives :class:`~helpers.loading.batches.Batches`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from helpers.errors import ParameterError
from helpers.loading import dataloader, gpudecode
from helpers.loading.batches import Batches, ResumableSampler
from helpers.loading.objects import S3ImageDataset
from helpers.loading.transforms import (
    Compose,
    ShufflePixels,
    decode_image,
    eval_transform,
    train_transform,
)
from helpers.shards import format as shard_format
from helpers.shards.format import Halves, Listing
from helpers.shards.stream import Reading, ShardStream, Share

if TYPE_CHECKING:  # names for annotations only: importing costs nothing at run time
    import torch

    from helpers.config import Rank, TrainConfig


def make_loaders(
    cfg: TrainConfig,
    options: dict | None,
    manifest: Listing,
    split: Halves,
    rank: Rank,
    device: torch.device,
) -> tuple[Batches, Batches]:
    """``(train, val)`` batches of ``split`` (``helpers.data.Split``) of ``manifest``
    (``helpers.data.Manifest``), this rank's disjoint share of each.

    Each rank validates its own slice of the validation split (padding, when shards are uneven,
    is flagged and never counted). A run resumed mid-epoch trains on the images a straight run
    trains on, in the same order (:mod:`helpers.loading.batches`); their augmentations are
    drawn afresh from the resumed position.
    """
    gpu = gpudecode.resolve_decode(cfg.decode, device) == "gpu"
    if cfg.data_format == "synthetic":
        return _synthetic(cfg, rank, manifest, split, device)
    fmt = shard_format.resolve_format(cfg.data_format, cfg.data_url, options)
    make = _shard_batches if fmt == "shards" else _object_batches
    pin = device.type == "cuda"
    return make(cfg, options, rank, manifest, split, pin, gpu)


def _transforms(cfg: TrainConfig, gpu: bool = False) -> tuple:
    if gpu:  # decoded and augmented on the device (gpudecode.ToDevice)
        if cfg.shuffle_pixels:
            raise ParameterError(
                "shuffle_pixels=True needs decode='cpu' (the control runs on the CPU path)"
            )
        return gpudecode.KeepBytes(), gpudecode.KeepBytes()
    train_tf = train_transform(cfg.image_size, cfg.crop_scale)
    val_tf = eval_transform(cfg.image_size)
    if cfg.shuffle_pixels:  # the control run: the same colours, no spatial structure
        train_tf, val_tf = Compose([train_tf, ShufflePixels()]), Compose([val_tf, ShufflePixels()])
    return train_tf, val_tf


def _mover(cfg: TrainConfig, train: bool) -> gpudecode.ToDevice:
    return gpudecode.ToDevice(
        cfg.image_size, train, cfg.decode_batch, cfg.crop_scale, cfg.gpu_decoder
    )


def _object_batches(cfg, options, rank, manifest, split, pin: bool, gpu: bool) -> tuple:
    import torch

    train_tf, val_tf = _transforms(cfg, gpu)
    kind = gpudecode.ObjectBytes if gpu else S3ImageDataset
    cache = cfg.cache_dir or None

    def dataset(keys, tf, with_keys):
        labels = [manifest.label(k) for k in keys]
        return kind(manifest.url, keys, labels, options, tf, draft=cfg.image_size,
                    cache_dir=cache, with_keys=with_keys)  # fmt: skip

    train_ds = dataset(split.train, train_tf, with_keys=True)  # keys: what a rank trained on
    val_ds = dataset(share_of(split.val, rank), val_tf, with_keys=False)
    sampler = ResumableSampler(
        train_ds, rank.world_size, rank.rank, shuffle=True, seed=cfg.seed, drop_last=True
    )
    prefetch = cfg.prefetch or 4
    generator = torch.Generator()  # reseeded by Batches.start_epoch
    train = dataloader.make_loader(
        train_ds,
        cfg.batch_size,
        cfg.loader_workers,
        sampler=sampler,
        drop_last=True,
        pin_memory=pin,
        generator=generator,
        persistent=False,
        prefetch=prefetch,
    )
    val = dataloader.make_loader(
        val_ds, cfg.batch_size * 2, cfg.loader_workers, pin_memory=pin, prefetch=prefetch
    )
    common = dict(source="objects", image_size=cfg.image_size, seed=cfg.seed, rank=rank.rank)
    return (
        Batches(
            train,
            _mover(cfg, train=True),
            batch_size=cfg.batch_size,
            sampler=sampler,
            generator=generator,
            **common,
        ),
        Batches(val, _mover(cfg, train=False), batch_size=cfg.batch_size * 2, **common),
    )


def _shard_batches(cfg, options, rank, manifest, split, pin: bool, gpu: bool) -> tuple:
    index = shard_format.read_index(cfg.data_url, options)
    shard_format.check_index(index, manifest, cfg.val_fraction, cfg.seed)
    train_tf, val_tf = _transforms(cfg, gpu)
    decode = gpudecode.keep_jpeg if gpu else decode_image  # bytes as they are, for the GPU
    prefetch = cfg.prefetch or 2
    out = []
    for name, batch_size, tf in (
        ("train", cfg.batch_size, train_tf),
        ("val", cfg.batch_size * 2, val_tf),
    ):
        share = Share(rank.rank, rank.world_size, batch_size, cfg.seed)
        reading = Reading(decode, tf, image_size=cfg.image_size)
        stream = ShardStream(index, cfg.data_url, name, options, share, reading, with_keys=True)
        loader = dataloader.stream_loader(stream, cfg.loader_workers, pin, prefetch)
        out.append(
            Batches(
                loader,
                _mover(cfg, train=name == "train"),
                source="shards",
                image_size=cfg.image_size,
                batch_size=batch_size,
                seed=cfg.seed,
                rank=rank.rank,
                stream=stream,
            )
        )
    return tuple(out)


def share_of(keys: Sequence[str], rank: Rank) -> tuple[str, ...]:
    """Rank ``rank``'s share of ``keys``: disjoint across ranks, together all of them."""
    return tuple(keys[rank.rank :: rank.world_size])


class SyntheticLoader:
    """``steps`` batches of one random uint8 batch already on the device: no fetch, no decode,
    no copy."""

    def __init__(self, batch: tuple, steps: int):
        self.batch, self.steps = batch, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        return iter([self.batch] * self.steps)


def _synthetic(cfg, rank, manifest, split, device) -> tuple:
    """As many steps as the objects path would take (its DistributedSampler drops the rest)."""
    import torch

    g = torch.Generator().manual_seed(cfg.seed + rank.rank)
    s, n = cfg.image_size, cfg.batch_size
    images = torch.randint(0, 256, (n, 3, s, s), dtype=torch.uint8, generator=g).to(device)
    labels = torch.randint(0, len(manifest.classes), (n,), generator=g).to(device)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    steps = max(1, len(split.train) // (rank.world_size * n))
    own_val = len(share_of(split.val, rank))
    common = dict(source="synthetic", image_size=s, batch_size=n, seed=cfg.seed, rank=rank.rank)
    return (
        Batches(SyntheticLoader((images, labels), steps), _mover(cfg, True), **common),
        Batches(SyntheticLoader((images, labels), -(-own_val // n)), _mover(cfg, False), **common),
    )
