"""The training and validation loaders of one DDP rank, from objects or from shards.

``data_format`` picks the path: ``"objects"`` (one GET per image, ``helpers.objects``, with a
``DistributedSampler``), ``"shards"`` (tar shards streamed whole, ``helpers.stream``), or
``"auto"``: shards where ``<data_url>/shards/index.json`` exists. Both give every rank the same
split, a disjoint share of it, the same number of batches, and the same transforms.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from helpers import data, objects, stream
from helpers.transforms import Compose, ShufflePixels, eval_transform, train_transform

if TYPE_CHECKING:  # names for annotations only: importing costs nothing at run time
    import torch

    from helpers.config import TrainConfig
    from helpers.ddp import Rank


def make_loaders(cfg: TrainConfig, options: dict | None, rank: Rank, device: torch.device) -> tuple:
    """``(classes, train_loader, val_loader)``: the same split on every rank, disjoint shares.

    Each rank validates its own slice of the validation split (padding, when shards are uneven,
    is flagged and never counted). The training loader's generator is reseeded every epoch
    (:func:`start_epoch`), so augmentations are reproducible and a resumed run sees what a
    straight run saw.
    """
    import torch

    manifest = data.load_manifest(cfg.data_url, options)
    fmt = stream.resolve_format(cfg.data_format, cfg.data_url, options)
    make = _shard_loaders if fmt == "shards" else _object_loaders
    train_loader, val_loader = make(cfg, options, rank, manifest, device.type == "cuda")
    train_loader.generator = torch.Generator()  # reseeded by start_epoch
    return manifest.classes, train_loader, val_loader


def _transforms(cfg: TrainConfig) -> tuple:
    train_tf, val_tf = train_transform(cfg.image_size), eval_transform(cfg.image_size)
    if cfg.shuffle_pixels:  # the control run: the same colours, no spatial structure
        train_tf, val_tf = Compose([train_tf, ShufflePixels()]), Compose([val_tf, ShufflePixels()])
    return train_tf, val_tf


def _object_loaders(cfg, options, rank, manifest, pin: bool) -> tuple:
    from helpers.position import ResumableSampler  # a DistributedSampler that can resume

    split = data.split(manifest, cfg.val_fraction, cfg.seed)
    train_tf, val_tf = _transforms(cfg)
    cache = cfg.cache_dir or None
    train_ds = objects.S3ImageDataset(manifest.url, split.train, manifest.classes, options,
                                      train_tf, draft=cfg.image_size, cache_dir=cache)  # fmt: skip
    own_val = data.shard(split.val, rank.rank, rank.world_size)
    val_ds = objects.S3ImageDataset(manifest.url, own_val, manifest.classes, options, val_tf,
                                    draft=cfg.image_size, cache_dir=cache)  # fmt: skip
    sampler = ResumableSampler(
        train_ds, rank.world_size, rank.rank, shuffle=True, seed=cfg.seed, drop_last=True
    )
    train = data.make_loader(train_ds, cfg.batch_size, cfg.loader_workers, sampler=sampler,
                             drop_last=True, pin_memory=pin, persistent=False)  # fmt: skip
    val = data.make_loader(val_ds, cfg.batch_size * 2, cfg.loader_workers, pin_memory=pin)
    return train, val


def _shard_loaders(cfg, options, rank, manifest, pin: bool) -> tuple:
    train_tf, val_tf = _transforms(cfg)
    common = dict(options=options, image_size=cfg.image_size, rank=rank.rank,
                  world_size=rank.world_size, seed=cfg.seed, manifest=manifest,
                  val_fraction=cfg.val_fraction, split_seed=cfg.seed)  # fmt: skip
    train_ds = stream.ShardStream(cfg.data_url, "train", batch_size=cfg.batch_size,
                                  transform=train_tf, **common)  # fmt: skip
    val_ds = stream.ShardStream(cfg.data_url, "val", batch_size=cfg.batch_size * 2,
                                transform=val_tf, **common)  # fmt: skip
    train = stream.make_shard_loader(train_ds, cfg.loader_workers, pin_memory=pin)
    val = stream.make_shard_loader(val_ds, cfg.loader_workers, pin_memory=pin)
    return train, val


def augment_seed(cfg: TrainConfig, epoch: int, rank: Rank) -> int:
    """The loader processes' seed for an epoch: a resumed run augments as a straight run did."""
    return cfg.seed * 1_000_003 + epoch * 1_009 + rank.rank


def start_epoch(loader: Iterable, epoch: int, cfg: TrainConfig, rank: Rank) -> None:
    """A new shuffle each epoch, the same on every rank (the ``DistributedSampler``'s
    ``set_epoch``, or the shard stream's), and augmentations seeded by (seed, epoch, rank)."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    else:
        loader.dataset.set_epoch(epoch)
    loader.generator.manual_seed(augment_seed(cfg, epoch, rank))


def without_padding(batch: tuple) -> tuple:
    """``(images, labels)`` of a batch, without the padding a shard stream adds to even out
    ranks (its batches are ``(images, labels, keys, is_padding)``)."""
    if len(batch) == 4:
        images, labels, _, padding = batch
        return images[~padding], labels[~padding]
    return batch[0], batch[1]
