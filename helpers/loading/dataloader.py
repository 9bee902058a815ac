"""PyTorch DataLoaders for the datasets and the shard streams: where their processes come from,
how a batch is put together, and how those processes count their storage retries.

Every loader of the project is made here (:func:`make_loader`, :func:`stream_loader`), so they
share one collate function (skipped samples left out; under GPU decode, the bytes packed into a
:class:`~helpers.loading.gpudecode.JpegBatch`), one way of starting processes inside Dask workers
(a forkserver with the heavy imports done once), and one retry count per rank.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from helpers.loading.gpudecode import JpegBatch
from helpers.s3 import retry

if TYPE_CHECKING:  # names for annotations only: importing costs nothing at run time
    import multiprocessing.context

    import torch
    from torch.utils.data import DataLoader, Dataset, Sampler

    from helpers.shards.stream import ShardStream

# What a forkserver imports once, so that each loader process it forks has them already.
PRELOAD = [
    "torch",
    "torchvision.transforms.v2",
    "PIL.Image",
    "s3fs",
    "helpers.loading.objects",
    "helpers.loading.gpudecode",
    "helpers.shards.stream",
]


def collate(batch: list) -> tuple | None:
    """``default_collate`` without the skipped samples (None); ``None`` when the whole batch
    was skipped. Samples whose image is bytes (GPU decode) give a :class:`JpegBatch` first."""
    from torch.utils.data import default_collate

    batch = [b for b in batch if b is not None]
    if not batch:
        return None
    if isinstance(batch[0][0], bytes):
        return (JpegBatch.of([b[0] for b in batch]), *default_collate([b[1:] for b in batch]))
    return default_collate(batch)


def loader_context() -> multiprocessing.context.BaseContext | None:
    """Where loader processes come from: ``None`` (the default start method), except under the
    ``spawn`` start method, which Dask's worker processes run with. There each epoch's loader
    processes would start a fresh interpreter and import torch (seconds each, tens of seconds
    on a loaded machine); a forkserver, started once per worker process with :data:`PRELOAD`
    imported, forks them in milliseconds and, unlike a plain fork, copies none of the worker's
    threads (its event loop, gloo, s3fs)."""
    import multiprocessing

    if multiprocessing.get_start_method() != "spawn":
        return None
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return None  # Windows: spawn is all there is
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def make_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int = 2,
    shuffle: bool = False,
    sampler: Sampler | None = None,
    drop_last: bool = False,
    pin_memory: bool = False,
    generator: torch.Generator | None = None,
    persistent: bool = True,
    prefetch: int = 4,
) -> DataLoader:
    """A DataLoader with worker processes that prefetch ``prefetch`` whole batches each.

    ``generator`` seeds the worker processes (their augmentations) each time an epoch starts;
    with ``persistent=False`` they are started afresh each epoch, so a reseeded generator
    reproduces an epoch exactly (a resumed run), at the cost of starting them (a fork from
    :func:`loader_context`) each epoch.
    """
    from torch.utils.data import DataLoader

    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        drop_last=drop_last,
        pin_memory=pin_memory,
        generator=generator,
        persistent_workers=persistent and num_workers > 0,
        **_processes(num_workers, prefetch),
    )


def stream_loader(
    stream: ShardStream, num_workers: int = 2, pin_memory: bool = False, prefetch: int = 2
) -> DataLoader:
    """A DataLoader over a shard stream, batched at the stream's batch size.

    Its processes are not persistent: each epoch's start from the stream as it is then, so
    :meth:`~helpers.shards.stream.ShardStream.set_epoch` and ``load_state_dict`` reach them.
    """
    from torch.utils.data import DataLoader

    stream.num_workers = num_workers
    return DataLoader(
        stream,
        batch_size=stream.batch_size,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        persistent_workers=False,
        **_processes(num_workers, prefetch),
    )


def _processes(num_workers: int, prefetch: int) -> dict:
    """A DataLoader's settings for its processes: batches each keeps ready, where they come
    from, and what each does as it starts (:class:`LoaderProcess`)."""
    import os

    if not num_workers:
        return {}
    return {
        "prefetch_factor": prefetch,
        "multiprocessing_context": loader_context(),
        "worker_init_fn": LoaderProcess(retry.retry_counter(), os.getpid()),
    }


class LoaderProcess:
    """A DataLoader's ``worker_init_fn``, handed over as the process starts (Dask's workers
    start theirs by spawning, which inherits nothing):

    - the loader process counts its storage retries in the rank's
      :func:`helpers.s3.retry.retries`;
    - it leaves within :data:`OWNER_CHECK_S` of the process that made the loader (``owner``)
      dying. PyTorch's own check watches the parent, which under a forkserver is the forkserver:
      a Dask worker killed (out of memory, a lost node) left its loader processes waiting
      forever, and they, holding the forkserver's lifeline, kept it too (17 GB of them after a
      few killed workers).
    """

    def __init__(self, counter, owner: int) -> None:
        self.counter, self.owner = counter, owner

    def __call__(self, worker_id: int) -> None:
        import threading

        retry.use_retry_counter(self.counter)
        threading.Thread(target=_exit_with, args=(self.owner,), daemon=True).start()


OWNER_CHECK_S = 1.0


def _exit_with(owner: int) -> None:
    """Exit this process as soon as ``owner`` is gone (or only a zombie)."""
    import os
    import time

    while True:
        time.sleep(OWNER_CHECK_S)
        try:
            os.kill(owner, 0)
            with open(f"/proc/{owner}/stat", "rb") as f:  # Linux: a zombie has died
                dead = f.read().rsplit(b")", 1)[-1].split()[0] == b"Z"
        except ProcessLookupError:
            dead = True
        except OSError:  # no /proc (macOS): os.kill answered, so it lives
            dead = False
        if dead:
            os._exit(0)
