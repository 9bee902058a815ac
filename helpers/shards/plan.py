"""Who reads which samples of an epoch: the pure arithmetic behind :mod:`helpers.shards.stream`.

No I/O and no torch: quotas per rank and loader process, which ranges of which shards cover a
run of the epoch's sample stream, the order in which a DataLoader takes batches from its
processes (for resuming), and the seeded shuffle buffer.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def rank_quota(total: int, world_size: int, batch_size: int) -> int:
    """Samples per rank and epoch: all ``total`` over all ranks, rounded up to whole batches."""
    return -(-total // (world_size * batch_size)) * batch_size


def worker_batches(quota: int, batch_size: int, num_workers: int) -> list[int]:
    """Batches per loader process: as even as can be, the first processes taking the extra."""
    n = quota // batch_size
    return [n // num_workers + (w < n % num_workers) for w in range(num_workers)]


def consumed_batches(batches: int, per_worker: list[int]) -> tuple[list[int], int]:
    """How many of the first ``batches`` came from each loader process, and which process the
    next one comes from: the DataLoader takes batches from its processes in turn (0, 1, 2, ...),
    passing over those already finished."""
    done, rnd = [0] * len(per_worker), 0
    while any(b > rnd for b in per_worker):
        for w, b in enumerate(per_worker):
            if b > rnd:
                if batches == 0:
                    return done, w
                done[w], batches = done[w] + 1, batches - 1
        rnd += 1
    return done, 0


def share(n: int, caps: list[int]) -> list[int]:
    """``n`` split over ``caps`` in proportion, none over its cap (``sum(caps) >= n``)."""
    total = sum(caps)
    out = [n * c // total if total else 0 for c in caps]
    while sum(out) < n:
        w = max(range(len(caps)), key=lambda i: (caps[i] - out[i], -i))
        out[w] += 1
    return out


def plan(counts: list[int], order: list[int], start: int, stop: int) -> list[tuple[int, int, int]]:
    """``(shard, first, end)`` sample ranges that cover positions ``[start, stop)`` of the stream
    made of the shards in ``order``."""
    out, pos = [], 0
    for i in order:
        a, b = max(start, pos), min(stop, pos + counts[i])
        if a < b:
            out.append((i, a - pos, b - pos))
        pos += counts[i]
        if pos >= stop:
            break
    return out


def shuffled(items: Iterable[T], size: int, rng: random.Random) -> Iterator[T]:
    """A shuffle buffer of up to ``size`` items that starts yielding once ``size // 8`` are held:
    while it grows, two items come in for each that goes out, so an epoch's first batch waits
    for a few samples, not for a whole buffer of them."""
    initial = max(1, size // 8)
    items, buf = iter(items), []
    for item in items:
        buf.append(item)
        if len(buf) < size:
            buf.extend(itertools.islice(items, 1))
        if len(buf) >= initial:
            j = rng.randrange(len(buf))
            buf[j], buf[-1] = buf[-1], buf[j]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf
