"""What the training loop receives from the loading layer: :class:`Batches`, one loader's batches
with everything the loop asks of them, and nothing hung on the loader.

- ``for batch in batches`` and ``len(batches)``: the loader's batches (a batch is ``None`` when
  every image of it was unreadable and skipped);
- :meth:`Batches.to_device`: a batch on the device (under GPU decode, decoded and augmented
  there), or a zero-weight placeholder where a rank has nothing real to step with;
- :meth:`Batches.start_epoch`: a new shuffle, the same on every rank, and the augmentations
  seeded by (seed, epoch, rank);
- :meth:`Batches.position` and :meth:`Batches.seek`: where a rank is in an epoch, saved with a
  mid-epoch checkpoint and restored on resume. Both paths are deterministic functions of
  (seed, epoch, rank), so a position is a count of batches: the objects path skips that many
  batches' indices in its sampler's order, the shard path hands
  :meth:`~helpers.shards.stream.ShardStream.state_dict` to the stream. The rest of the epoch then
  sees each remaining image once, in the order a straight run sees them: no repeats, no gaps
  (``TrainConfig.keys_log`` records it; tests/test_faults.py compares). Their augmentations are
  seeded by (seed, epoch, rank) as before, but the loader processes' random streams start
  afresh at the resumed position, so the crops and flips after it differ from a straight run's.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, NamedTuple

from torch.utils.data.distributed import DistributedSampler

from helpers.errors import ParameterError

if TYPE_CHECKING:  # names for annotations only: importing costs nothing at run time
    import torch

    from helpers.loading.gpudecode import ToDevice
    from helpers.shards.stream import ShardStream


class ResumableSampler(DistributedSampler):
    """A ``DistributedSampler`` that can start an epoch ``skip`` indices in; ``set_epoch``
    (the next epoch) starts at the beginning again. ``len`` stays the whole epoch's."""

    skip = 0

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        indices = super().__iter__()
        for _ in range(self.skip):
            next(indices, None)
        return indices


class OnDevice(NamedTuple):
    """A batch on the device: uint8 images (N, 3, S, S), int64 labels (N,), and whether it is
    real (False: a placeholder, which must weigh nothing)."""

    images: torch.Tensor
    labels: torch.Tensor
    real: bool


def augment_seed(seed: int, epoch: int, rank: int) -> int:
    """The augmentations' seed for an epoch of a rank (an epoch's crops and flips are the same
    every time it is trained from its start)."""
    return seed * 1_000_003 + epoch * 1_009 + rank


class Batches:
    """One rank's batches of one split; see the module docstring.

    ``loader``: a DataLoader (or any iterable of batches with a length); ``to_device``: the
    :class:`~helpers.loading.gpudecode.ToDevice` that moves them; ``source``: where they come
    from ("objects", "shards" or "synthetic"); ``sampler`` (the objects path) or ``stream`` (the
    shard path): what each epoch reshuffles and a resume skips into; ``generator``: the
    DataLoader's, which seeds its processes' augmentations each epoch.
    """

    def __init__(
        self,
        loader: Iterable,
        to_device: ToDevice,
        *,
        source: str,
        image_size: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        sampler: ResumableSampler | None = None,
        stream: ShardStream | None = None,
        generator: torch.Generator | None = None,
    ):
        self.loader, self.mover, self.source = loader, to_device, source
        self.image_size, self.batch_size, self.seed, self.rank = image_size, batch_size, seed, rank
        self.sampler, self.stream, self.generator = sampler, stream, generator

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        return iter(self.loader)

    @property
    def stats(self) -> dict[str, int]:
        """What moving the batches met: images decoded on the device, fallbacks by cause."""
        return dict(self.mover.stats)

    def start_epoch(self, epoch: int) -> None:
        """A new shuffle, the same on every rank, and the augmentations of (seed, epoch, rank)."""
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        if self.stream is not None:
            self.stream.set_epoch(epoch)
        seed = augment_seed(self.seed, epoch, self.rank)
        if self.generator is not None:
            self.generator.manual_seed(seed)
        self.mover.generator.manual_seed(seed)  # augmentations drawn on the rank (GPU decode)

    def position(self, batches: int) -> dict:
        """The data position after ``batches`` batches of this epoch (every rank's is rank 0's)."""
        if self.stream is not None:
            return {"stream": self.stream.state_dict(batches)}
        return {"batches": batches}

    def seek(self, batches: int, position: dict | None) -> None:
        """Start the current epoch ``batches`` batches in (after :meth:`start_epoch`)."""
        if not batches:
            return
        if self.stream is not None and position and "stream" in position:
            self.stream.load_state_dict(position["stream"])
        elif self.sampler is not None:
            self.sampler.skip = batches * self.batch_size
        else:
            raise ParameterError(
                f"cannot resume {batches} batches into an epoch of these batches: they have "
                "neither a shard stream position nor a resumable sampler"
            )

    def keys(self, batch: tuple | None) -> list[str]:
        """The keys of ``batch``'s images, a shard stream's padding (repeats) marked ``+``."""
        if batch is None or len(batch) < 3:
            return []
        padding = batch[3].tolist() if len(batch) == 4 else [False] * len(batch[2])
        return [f"{k}+" if pad else k for k, pad in zip(batch[2], padding, strict=True) if k]

    def to_device(self, batch: tuple | None, device: torch.device) -> OnDevice:
        """``batch`` on ``device``, without a shard stream's padding; a placeholder (two black
        images, ``real=False``) when nothing of it could be read, so that every rank still
        takes the step DDP's collectives wait for."""
        if batch is not None:
            images, labels = without_padding(batch)
            if len(labels):
                images, labels = self.mover(images, labels, device)
                if len(labels):
                    return OnDevice(images, labels, True)
        return OnDevice(*placeholder(self.image_size, device), False)


def without_padding(batch: tuple) -> tuple:
    """``(images, labels)`` of a batch, without the blank padding a shard stream adds to
    validation to even out ranks (its batches are ``(images, labels, keys, is_padding)``;
    training's padding repeats real images, trained on like the rest)."""
    if len(batch) == 4:
        import torch

        images, labels, keys = batch[:3]
        real = torch.tensor([bool(k) for k in keys])  # a blank has no key
        return images[real], labels[real]
    return batch[0], batch[1]


def placeholder(size: int, device: torch.device | str = "cpu") -> tuple:
    """Two black images of class 0: the step a rank takes when it has nothing real to train on.

    Every rank must run the same steps, or DDP's gradient all-reduce falls out of step."""
    import torch

    return (
        torch.zeros(2, 3, size, size, dtype=torch.uint8, device=device),
        torch.zeros(2, dtype=torch.long, device=device),
    )
