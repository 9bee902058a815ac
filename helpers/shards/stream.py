"""Stream the tar shards of :mod:`helpers.shards.format` into PyTorch, in step on every DDP rank.

Every epoch, in every rank and DataLoader process alike:

1. the shards are put in an order seeded by (seed, epoch): the same order on every rank;
2. that order, read as one stream of samples, is cut into contiguous runs, one per rank and then
   one per loader process, each at most its quota (:func:`rank_quota`, :func:`worker_batches`):
   every image of the split goes to exactly one process. A shard straddling two runs is fetched
   by both, each keeping its part: at most one extra GET per process and epoch;
3. a process GETs its shards whole (by URLs presigned in the training process: no S3 client to
   start in each loader process), a background thread fetching the next ``prefetch`` while the
   current one decodes, and mixes the samples in a seeded shuffle buffer;
4. a process whose samples fall short of its quota (rounding up to whole batches, a corrupt
   image, a missing shard) repeats its own samples, so every rank yields the same number of
   batches and DDP's collectives never wait for a rank that has stopped.

Training yields ``(image, label)``; validation (``train=False``) keeps the shards' order, no
shuffle, and yields ``(image, label, key, is_padding)`` (``with_keys=True`` gives training
these too): validation's padding is a blank image (label 0, key "") the evaluation leaves out.

A stream is told its place (:class:`Share`: rank, world size, batch size, seed) and how to read
(:class:`Reading`: the decode and transform functions, which the loading layer gives, the
shuffle buffer, the prefetch depth); the caller has read and checked the shard index.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

from torch.utils.data import IterableDataset, get_worker_info

from helpers.errors import ParameterError, StorageError
from helpers.shards import read
from helpers.shards.format import location, rebuild_command
from helpers.shards.plan import (
    consumed_batches,
    plan,
    rank_quota,
    share,
    shuffled,
    worker_batches,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Share:
    """A stream's place in the job: every rank builds its streams with the same ``world_size``,
    ``batch_size`` and ``seed``, and its own ``rank``."""

    rank: int = 0
    world_size: int = 1
    batch_size: int = 16
    seed: int = 0  # the shard order and the shuffle buffer, per epoch


@dataclass(frozen=True)
class Reading:
    """How a stream turns shards into items: ``decode(bytes, key, draft)`` (an image, or the
    bytes themselves under GPU decode; raising ``ValueError`` for what is not an image, which
    is skipped), then ``transform`` (validation's blank padding goes through it too)."""

    decode: Callable
    transform: Callable
    image_size: int = 224  # draft decoding down to it; the blank padding's size
    draft: bool = True  # JPEG draft decoding at image_size (off: full-size decodes)
    shuffle_buffer: int = 256  # training only
    prefetch: int = 2  # shards fetched ahead by each loader process
    presign: bool = True  # presigned URLs for the loader processes' GETs (S3 only)


class ShardStream(IterableDataset):
    """One rank's share of a split's shards, epoch after epoch; see the module's docstring.

    ``index``: the dataset's shard index, read and checked by the caller
    (:func:`helpers.shards.format.read_index`, :func:`~helpers.shards.format.check_index`).
    Picklable and fork-safe (a URL, the index and options; no filesystem, no thread) so each
    DataLoader process builds its own. The DataLoader over it must batch at ``share.batch_size``
    and start fresh processes every epoch (``helpers.loading.dataloader.stream_loader``), so
    that :meth:`set_epoch` reaches them. ``stats`` counts what the last iteration in *this*
    process met (corrupt samples, missing or damaged shards, padding); loader processes log
    theirs.
    """

    def __init__(
        self,
        index: dict,
        url: str,
        split: str,
        options: dict | None,
        share: Share,
        reading: Reading,
        *,
        train: bool | None = None,
        with_keys: bool | None = None,
        shards_url: str | None = None,
    ):
        if split not in ("train", "val"):
            raise ParameterError(f"split={split!r}; allowed: 'train', 'val'")
        if not 0 <= share.rank < share.world_size or share.batch_size < 1:
            raise ParameterError(
                f"rank={share.rank}, world_size={share.world_size}, batch_size="
                f"{share.batch_size}; allowed: 0 <= rank < world_size, batch_size >= 1"
            )
        entries = index["splits"][split]["shards"]
        self.names, self.counts = [e["name"] for e in entries], [e["images"] for e in entries]
        self.url, self.split, self.options = url, split, dict(options or {})
        self.where = location(url, shards_url)
        self.classes = list(index["classes"])
        self.total = sum(self.counts)
        self.share, self.reading = share, reading
        self.batch_size = share.batch_size
        self.train = split == "train" if train is None else train
        self.with_keys = not self.train if with_keys is None else with_keys
        self.epoch, self.num_workers, self._resume = 0, 0, None
        self.stats: dict[str, int] = {}
        self._signed: dict = {}
        self.set_epoch(0)

    def __len__(self) -> int:
        """Samples this rank yields per epoch, the same on every rank (whole batches)."""
        return rank_quota(self.total, self.share.world_size, self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Use the shard order and shuffle of ``epoch`` (and presign its shard URLs); a restored
        position of another epoch is dropped."""
        if self._resume is not None and self._resume["epoch"] != epoch:
            self._resume = None
        self.epoch = epoch
        if self.reading.presign:  # here, in the training process: see read.presign
            self._signed = read.presign(self.where, self.options, self.names)

    def shard_order(self) -> list[int]:
        """The shards in this epoch's order: seeded by (seed, epoch), the same on every rank."""
        order = list(range(len(self.names)))
        if self.train:
            random.Random(f"{self.share.seed}:{self.epoch}").shuffle(order)
        return order

    def rank_span(self) -> tuple[int, int]:
        """``(start, n)``: this rank's run of the epoch's sample stream (n differs by <= 1)."""
        n, w, r = self.total, self.share.world_size, self.share.rank
        return r * (n // w) + min(r, n % w), n // w + (r < n % w)

    def assignment(self, worker: int, num_workers: int) -> tuple[list, int, int]:
        """``(ranges, real, quota)`` of a loader process: its :func:`plan`, how many distinct
        samples it reads, and how many it yields (the rest is padding)."""
        caps = [
            b * self.batch_size for b in worker_batches(len(self), self.batch_size, num_workers)
        ]
        start, n = self.rank_span()
        real = share(n, caps)
        start += sum(real[:worker])
        return (
            plan(self.counts, self.shard_order(), start, start + real[worker]),
            real[worker],
            caps[worker],
        )

    def state_dict(self, batches: int) -> dict:
        """The position after this rank's loader has yielded ``batches`` batches this epoch.

        Every rank is at the same position, so rank 0's state resumes all of them. It restores
        exactly because each loader process's stream is a function of (seed, epoch, rank,
        process): the shard order, its run of samples, the shuffle buffer (seeded per process,
        fed the same raw samples) and the padding. The DataLoader takes batches from its
        processes in turn, so ``batches`` says how many each one gave
        (:func:`consumed_batches`); on resume each regenerates its stream and skips that many
        batches (decoding them, to skip the same corrupt ones, but not transforming them),
        and the new loader's process 0 takes the stream whose turn was next. Needs the same
        ``batch_size``, ``world_size``, ``seed`` and ``num_workers``; a shard that was missing
        when the state was saved but readable on resume (or the reverse) shifts positions.
        """
        return {
            "epoch": self.epoch,
            "samples": batches * self.batch_size,
            "batch_size": self.batch_size,
            "world_size": self.share.world_size,
            "loader_processes": max(1, self.num_workers),
            "seed": self.share.seed,
            "split": self.split,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume the epoch of ``state``: the next iteration yields exactly the samples left."""
        now = {
            "batch_size": self.batch_size,
            "world_size": self.share.world_size,
            "seed": self.share.seed,
            "split": self.split,
        }
        for name, value in now.items():
            if state[name] != value:
                raise ParameterError(
                    f"cannot resume a stream saved with {name}={state[name]!r} as "
                    f"{name}={value!r}: positions would not match"
                )
        self.epoch, self._resume = state["epoch"], dict(state)

    def __iter__(self):
        info = get_worker_info()
        worker, k = (info.id, info.num_workers) if info else (0, 1)
        skip = 0
        if self._resume is not None:
            if self._resume["loader_processes"] != k:
                raise ParameterError(
                    f"the saved position is of {self._resume['loader_processes']} loader "
                    f"processes per rank, this loader has {k}: use the same num_workers"
                )
            per_worker = worker_batches(len(self), self.batch_size, k)
            done, first = consumed_batches(self._resume["samples"] // self.batch_size, per_worker)
            # A new DataLoader asks process 0 first; hand it the stream whose turn it is, so the
            # remaining batches come in the order they would have come without the interruption.
            worker = (worker + first) % k
            skip = done[worker] * self.batch_size
        ranges, real, quota = self.assignment(worker, k)
        self.stats = stats = dict.fromkeys(
            ("samples", "padding", "corrupt", "missing_shards", "damaged_shards"), 0
        )
        cache: dict = {}  # the first shard, for the padding
        parts = [self._decoded(ranges, worker, stats, warn=True, cache=cache)]
        if self.train:  # then repeat samples until the quota is met: see _padding
            parts.append(self._padding(ranges, worker, stats, cache))
        produced = 0
        for key, img, label, padding in itertools.chain(*parts) if quota else ():
            if produced >= skip:
                yield self._item(img, label, key, padding)
            produced += 1
            stats["padding" if padding else "samples"] += 1
            if produced == quota:
                break  # before pulling one more: that would start the padding's shard GETs
        for part in parts:
            part.close()  # ends its prefetch thread now, not when garbage-collected
        if produced < quota:  # validation pads with blank images
            stats["padding"] += quota - produced
            blank = self.reading.transform(_blank(self.reading.image_size))
            for _ in range(max(produced, skip), quota):
                yield (blank, 0, "", True) if self.with_keys else (blank, 0)
        if any(stats[k] for k in ("corrupt", "missing_shards", "damaged_shards")) or real < quota:
            log.info("rank %d loader %d epoch %d: %s", self.share.rank, worker, self.epoch, stats)

    def _item(self, img, label: int, key: str, padding: bool):
        x = self.reading.transform(img)
        return (x, label, key, padding) if self.with_keys else (x, label)

    def _decoded(self, ranges, worker, stats: dict, warn: bool, padding=False, cache=None):
        """``(key, image, label, padding)`` of the samples in ``ranges``, decoded, in this
        process's deterministic order (seeded by seed, epoch, rank and process)."""
        reading = self.reading
        raw = read.raw_samples(
            self.where,
            self.options,
            [(self.names[i], first, end) for i, first, end in ranges],
            classes=len(self.classes),
            prefetch=0 if padding else reading.prefetch,  # padding: a few samples, fetched lazily
            stats=stats,
            warn=warn,
            rebuild=rebuild_command(self.url),
            signed=self._signed,
            cache=cache,
            counts=dict(zip(self.names, self.counts, strict=True)),
        )
        if self.train and reading.shuffle_buffer > 1 and not padding:  # padding: as stored
            rng = random.Random(f"{self.share.seed}:{self.epoch}:{self.share.rank}:{worker}")
            raw = shuffled(raw, reading.shuffle_buffer, rng)
        for key, blob, label, shard in raw:
            try:
                img = reading.decode(blob, key, reading.image_size if reading.draft else None)
            except ValueError as err:  # not an image; the message names the key
                if warn:
                    stats["corrupt"] += 1
                    log.warning("skipping a sample of shard %s: %s", shard, err)
                continue
            yield key, img, label, padding

    def _padding(self, ranges, worker: int, stats: dict, cache: dict | None = None):
        """Samples to repeat once the process's own run out: its own again, in the same order;
        if it has none (a tiny split over many processes, all its shards missing), its rank's,
        else any. Endless: the caller stops at the quota."""
        (start, n), order = self.rank_span(), self.shard_order()
        mine = plan(self.counts, order, start, start + n)
        for source in (ranges, mine, plan(self.counts, order, 0, self.total)):
            got = True
            while got:
                got = False
                for item in self._decoded(source, worker, stats, False, True, cache):
                    got = True
                    yield item
        raise StorageError(
            f"no readable sample in the {self.split} shards of {self.where}; rebuild them with: "
            f"{rebuild_command(self.url)}"
        )


def _blank(size: int):
    from PIL import Image

    return Image.new("RGB", (size, size))
