"""The training and validation loaders of one DDP rank, from objects or from shards.

``data_format`` picks the path: ``"objects"`` (one GET per image, ``helpers.objects``, with a
``DistributedSampler``), ``"shards"`` (tar shards streamed whole, ``helpers.stream``), or
``"auto"``: shards where ``<data_url>/shards/index.json`` exists. Both give every rank the same
split, a disjoint share of it, the same number of batches, and the same transforms.
``"synthetic"`` reads nothing: one random batch already on the device, every step, the ceiling
a benchmark compares the real paths with (``bench/bench_gpu.py``).

``decode`` picks where JPEGs are decoded: in the loader processes (``"cpu"``, PIL), or on the
GPU (``"gpu"``, ``helpers.gpudecode``: the loaders ship bytes); ``"auto"`` is the GPU on CUDA.
Each loader carries ``on_device``, which :func:`batch_to_device` calls to move (and, with GPU
decode, decode and augment) a batch.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from helpers import data, gpudecode, objects, storage, stream
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
    gpu = gpudecode.resolve_decode(cfg.decode, device) == "gpu"
    if cfg.data_format == "synthetic":
        train_loader, val_loader = _synthetic_loaders(cfg, rank, manifest, device)
    else:
        fmt = stream.resolve_format(cfg.data_format, cfg.data_url, options)
        make = _shard_loaders if fmt == "shards" else _object_loaders
        train_loader, val_loader = make(cfg, options, rank, manifest, device.type == "cuda", gpu)
        for loader in (train_loader, val_loader):
            if cfg.prefetch and loader.num_workers:
                loader.prefetch_factor = cfg.prefetch
            if gpu:
                loader.collate_fn = gpudecode.collate
    for loader, train in ((train_loader, True), (val_loader, False)):
        loader.on_device = gpudecode.ToDevice(
            cfg.image_size, train, cfg.decode_batch, cfg.crop_scale
        )
        count_retries(loader)
    train_loader.generator = torch.Generator()  # reseeded by start_epoch
    return manifest.classes, train_loader, val_loader


class _CountRetries:
    """A DataLoader's ``worker_init_fn``: the loader process counts its storage retries in the
    rank's :func:`helpers.storage.retries`. Handed over as the process starts, as Dask's
    workers start theirs by spawning, which inherits nothing."""

    def __init__(self, counter, then=None) -> None:
        self.counter, self.then = counter, then

    def __call__(self, worker_id: int) -> None:
        storage.use_retry_counter(self.counter)
        if self.then is not None:
            self.then(worker_id)


def count_retries(loader: Iterable) -> None:
    """Count the retries of ``loader``'s processes in this one's (the rank's epoch records)."""
    init = getattr(loader, "worker_init_fn", None)
    if getattr(loader, "num_workers", 0) and not isinstance(init, _CountRetries):
        loader.worker_init_fn = _CountRetries(storage.retry_counter(), init)


def batch_to_device(batch: tuple, loader: Iterable, device: torch.device) -> tuple:
    """``(images, labels)`` of a batch on ``device``, by the loader's ``on_device`` (decoded
    and augmented there under GPU decode); a plain copy for any other iterable."""
    on_device = getattr(loader, "on_device", None)
    if on_device is None:
        return tuple(t.to(device, non_blocking=True) for t in batch[:2])
    return on_device(batch, device)


def _transforms(cfg: TrainConfig, gpu: bool = False) -> tuple:
    if gpu:  # decoded and augmented on the device (gpudecode.ToDevice)
        if cfg.shuffle_pixels:
            raise ValueError("shuffle_pixels=True needs decode='cpu' (the control runs on CPU)")
        return gpudecode.KeepBytes(), gpudecode.KeepBytes()
    train_tf = train_transform(cfg.image_size, cfg.crop_scale)
    val_tf = eval_transform(cfg.image_size)
    if cfg.shuffle_pixels:  # the control run: the same colours, no spatial structure
        train_tf, val_tf = Compose([train_tf, ShufflePixels()]), Compose([val_tf, ShufflePixels()])
    return train_tf, val_tf


def _object_loaders(cfg, options, rank, manifest, pin: bool, gpu: bool) -> tuple:
    from helpers.position import ResumableSampler  # a DistributedSampler that can resume

    split = data.split(manifest, cfg.val_fraction, cfg.seed)
    train_tf, val_tf = _transforms(cfg, gpu)
    cache = cfg.cache_dir or None
    kind = gpudecode.ObjectBytes if gpu else objects.S3ImageDataset
    train_ds = kind(manifest.url, split.train, manifest.classes, options, train_tf,
                    draft=cfg.image_size, cache_dir=cache)  # fmt: skip
    own_val = data.shard(split.val, rank.rank, rank.world_size)
    val_ds = kind(manifest.url, own_val, manifest.classes, options, val_tf,
                  draft=cfg.image_size, cache_dir=cache)  # fmt: skip
    sampler = ResumableSampler(
        train_ds, rank.world_size, rank.rank, shuffle=True, seed=cfg.seed, drop_last=True
    )
    train = data.make_loader(train_ds, cfg.batch_size, cfg.loader_workers, sampler=sampler,
                             drop_last=True, pin_memory=pin, persistent=False)  # fmt: skip
    val = data.make_loader(val_ds, cfg.batch_size * 2, cfg.loader_workers, pin_memory=pin)
    return train, val


def _shard_loaders(cfg, options, rank, manifest, pin: bool, gpu: bool) -> tuple:
    train_tf, val_tf = _transforms(cfg, gpu)
    common = dict(options=options, image_size=cfg.image_size, rank=rank.rank,
                  world_size=rank.world_size, seed=cfg.seed, manifest=manifest,
                  val_fraction=cfg.val_fraction, split_seed=cfg.seed)  # fmt: skip
    train_ds = stream.ShardStream(cfg.data_url, "train", batch_size=cfg.batch_size,
                                  transform=train_tf, **common)  # fmt: skip
    val_ds = stream.ShardStream(cfg.data_url, "val", batch_size=cfg.batch_size * 2,
                                transform=val_tf, **common)  # fmt: skip
    if gpu:  # the shards' bytes go to the GPU as they are
        train_ds.decode = val_ds.decode = gpudecode.keep_jpeg
    train = stream.make_shard_loader(train_ds, cfg.loader_workers, pin_memory=pin)
    val = stream.make_shard_loader(val_ds, cfg.loader_workers, pin_memory=pin)
    return train, val


class SyntheticLoader:
    """``steps`` batches of one random uint8 batch already on the device: no fetch, no decode,
    no copy. Quacks like the real loaders where the training loop looks (``len``, a sampler
    with ``set_epoch``, a ``generator``)."""

    def __init__(self, batch: tuple, steps: int):
        import torch

        self.batch, self.steps = batch, steps
        self.sampler, self.generator = self, torch.Generator()

    def set_epoch(self, epoch: int) -> None:
        """Nothing to reshuffle."""

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        return iter([self.batch] * self.steps)


def _synthetic_loaders(cfg, rank, manifest, device) -> tuple:
    """As many steps as the objects path would take (its DistributedSampler drops the rest)."""
    import torch

    split = data.split(manifest, cfg.val_fraction, cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed + rank.rank)
    s, n = cfg.image_size, cfg.batch_size
    images = torch.randint(0, 256, (n, 3, s, s), dtype=torch.uint8, generator=g).to(device)
    labels = torch.randint(0, len(manifest.classes), (n,), generator=g).to(device)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    steps = max(1, len(split.train) // (rank.world_size * n))
    own_val = len(data.shard(split.val, rank.rank, rank.world_size))
    return SyntheticLoader((images, labels), steps), SyntheticLoader(
        (images, labels), -(-own_val // n)
    )


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
    if hasattr(loader, "on_device"):  # augmentations drawn on the rank (GPU decode)
        loader.on_device.generator.manual_seed(augment_seed(cfg, epoch, rank))


def without_padding(batch: tuple) -> tuple:
    """``(images, labels)`` of a batch, without the padding a shard stream adds to even out
    ranks (its batches are ``(images, labels, keys, is_padding)``)."""
    if len(batch) == 4:
        images, labels, _, padding = batch
        return images[~padding], labels[~padding]
    return batch[0], batch[1]
