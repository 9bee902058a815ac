"""Where a rank is in an epoch, saved with a mid-epoch checkpoint and restored on resume.

Both loaders are deterministic functions of (seed, epoch, rank), so a position is a count of
batches: the objects path skips that many batches' indices in its sampler's order, the shard
path hands :meth:`helpers.stream.ShardStream.state_dict` to the stream. The rest of the epoch
then sees each remaining image once: no repeats, no gaps. Augmentations of the remaining images
are seeded as before but not identical to an uninterrupted run's (the loader processes' random
streams start afresh at the resumed position).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from torch.utils.data.distributed import DistributedSampler


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


def position_of(loader: Iterable, batches: int) -> dict:
    """The data position after ``batches`` batches of this epoch (rank 0's: all are equal)."""
    dataset = getattr(loader, "dataset", None)
    if hasattr(dataset, "state_dict"):  # a shard stream
        return {"stream": dataset.state_dict(batches)}
    return {"batches": batches}


def seek(loader: Iterable, batches: int, position: dict | None, batch_size: int) -> None:
    """Start the current epoch ``batches`` batches in (after ``start_epoch``)."""
    if not batches:
        return
    if position and "stream" in position:
        loader.dataset.load_state_dict(position["stream"])
        return
    sampler = getattr(loader, "sampler", None)
    if not isinstance(sampler, ResumableSampler):
        raise ValueError(
            f"cannot resume {batches} batches into an epoch: the loader's sampler is a "
            f"{type(sampler).__name__}, not a helpers.position.ResumableSampler"
        )
    sampler.skip = batches * batch_size
