"""Training from scratch, data-parallel: the per-rank function and its loops.

The split follows torchvision's ``references/classification``: :func:`train_one_epoch`,
:func:`evaluate`, and the per-rank function :func:`train_rank` that :func:`helpers.ddp.run` calls
on every Dask worker (notebook 04 shows it line by line). The ranks hold the model whole (DDP)
or sharded (FSDP, ``strategy="fsdp"``: :mod:`helpers.loop.parallel`); the loop is the same.
Workers return small metric records, never the model. The data paths sit under it
(:mod:`helpers.loading`: the loop receives :class:`~helpers.loading.batches.Batches`), and so
does job control (:mod:`helpers.jobs`: the heartbeat, SIGTERM).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from helpers import checkpoint, data
from helpers.config import Rank, TrainConfig
from helpers.errors import Terminated
from helpers.jobs import rankctl
from helpers.loading.batches import Batches
from helpers.loading.loaders import make_loaders
from helpers.loop import parallel
from helpers.loop.meter import KeyLog, StepMeter, publish
from helpers.loop.model import build_model
from helpers.loop.state import TrainState
from helpers.s3 import retry
from helpers.show.lines import epoch_line

if TYPE_CHECKING:  # names for annotations only: importing costs nothing at run time
    import torch
    from torch.optim.lr_scheduler import LRScheduler

log = logging.getLogger(__name__)


def lr_lambda(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to zero: a multiplier of the base learning rate."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def autocast(device: torch.device, amp: str) -> torch.autocast:
    """The autocast context for ``amp`` ("auto": bf16 on CUDA, off on CPU)."""
    import torch

    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "off"
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=amp != "off")


def grad_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 (bf16 and fp32 need none), else None."""
    import torch

    return torch.amp.GradScaler(device.type) if amp == "fp16" else None


def to_device(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model on ``device``; channels_last on CUDA (faster convolutions with tensor cores)."""
    import torch

    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps: int) -> LRScheduler:
    """Per-step schedule: ``warmup_epochs`` of linear warm-up, then cosine decay to zero."""
    import torch

    schedule = lr_lambda(int(cfg.warmup_epochs * steps), cfg.epochs * steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def steps_per_epoch(batches: Batches, cfg: TrainConfig) -> int:
    return min(cfg.max_steps, len(batches)) if cfg.max_steps else len(batches)


def train_one_epoch(
    trained: TrainState,
    batches: Batches,
    device: torch.device,
    epoch: int,
    cfg: TrainConfig,
    rank: Rank,
    first_step: int = 0,
    on_step: Callable[[int], None] | None = None,
) -> dict:
    """One pass over this rank's share (from ``first_step`` when resumed mid-epoch); publishes
    a record every ``log_every`` steps and calls ``on_step(steps done)`` after each."""
    import torch

    model, optimizer = trained.model, trained.optimizer
    model.train()
    retried, steps = retry.retries(), steps_per_epoch(batches, cfg)
    meter, keys = StepMeter(device, epoch, steps, cfg, rank), KeyLog(cfg.keys_log, rank)
    for step, batch in zip(range(first_step, steps), batches, strict=False):  # stop at steps
        meter.fetched()
        # Copied, or with GPU decode decoded and augmented, on the device: part of the data wait.
        images, labels, real = batches.to_device(batch, device)
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        meter.waited()
        if not real:  # a placeholder: BatchNorm's running statistics must not see it
            model.eval()
        with autocast(device, cfg.amp):
            logits = model(images)
            loss = trained.criterion(logits, labels) * (1.0 if real else 0.0)  # weighs nothing
        model.train()
        optimizer.zero_grad(set_to_none=True)
        stepping = real or rank.world_size > 1  # alone with nothing real: no step at all
        if trained.scaler is not None:
            trained.scaler.scale(loss).backward()
            if stepping:
                trained.scaler.step(optimizer)
            trained.scaler.update()
        else:
            loss.backward()
            if stepping:
                optimizer.step()
        trained.scheduler.step()
        if real:
            meter.add(step, loss, logits, labels, optimizer.param_groups[0]["lr"])
            keys.write(epoch, step, batches.keys(batch))
        else:
            meter.skipped()  # counted nowhere: not in the metrics, not as data wait
        rankctl.beat()  # the job's hang check: this rank made progress
        if on_step is not None:
            on_step(step + 1)
    retried = retry.retries() - retried  # this pass's, by this rank and its loaders
    extra = {
        "data_format": batches.source,
        "s3_retries": retried,
        "first_step": first_step,
        "decode": batches.stats,
    }
    return meter.summary(device) | extra


def evaluate(trained: TrainState, batches: Batches, device: torch.device, cfg: TrainConfig) -> dict:
    """Loss, top-1 and top-5 over this rank's validation slice, summed across all ranks; and
    this rank's storage retries meanwhile (``val_s3_retries``)."""
    import torch
    import torch.distributed as dist

    retried = retry.retries()
    # The bare module, not the DDP wrapper: its forward would broadcast buffers, a collective
    # that ranks with different numbers of validation batches (or none) would never match.
    # FSDP's forward is collective (it gathers each block): those ranks go in lockstep.
    model, sharded = trained.module.eval(), parallel.is_sharded(trained.model)
    totals = torch.zeros(4, device=device, dtype=torch.float64)  # loss, top1, top5, count
    # no_grad under FSDP: inference tensors would stay in the buffers its gathers reuse
    with torch.no_grad() if sharded else torch.inference_mode(), autocast(device, cfg.amp):
        for batch in _in_lockstep(batches) if sharded else batches:
            rankctl.beat()
            images, labels, real = batches.to_device(batch, device)
            if not real:  # nothing readable, or only the padding that evens out the ranks
                if sharded:  # its peers' forward needs this rank's shards
                    model(images)
                continue
            logits = model(images).float()
            hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
            n = torch.tensor(len(labels), device=device)
            loss = trained.criterion(logits, labels) * len(labels)
            totals += torch.stack([loss, hits[:, 0].sum(), hits.any(1).sum(), n]).to(totals.dtype)
    if dist.is_initialized():
        dist.all_reduce(totals)
    loss, top1, top5, n = totals.tolist()
    return {
        "val_loss": loss / max(n, 1),
        "val_top1": top1 / max(n, 1),
        "val_top5": top5 / max(n, 1),
        "val_images": int(n),
        "val_s3_retries": retry.retries() - retried,
    }


_END = object()


def _in_lockstep(batches: Batches):
    """``batches``, then None (a placeholder) until every rank's have run out."""
    it = iter(batches)
    while True:
        batch = next(it, _END)
        if not _any_rank(batch is not _END):
            return
        yield None if batch is _END else batch


def _any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is on any (one tiny all-reduce)."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return flag
    t = torch.tensor([float(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class Saver:
    """The run's checkpoints: every ``checkpoint_every`` steps (with the data position) and at
    each epoch's end (with the epoch's record). Rank 0 writes them under DDP, every rank its
    shards under FSDP; every rank calls."""

    def __init__(
        self,
        cfg: TrainConfig,
        options: dict | None,
        rank: Rank,
        trained: TrainState,
        classes: Sequence[str],
        batches: Batches,
    ) -> None:
        self.cfg, self.options, self.rank, self.batches = cfg, options, rank, batches
        self.trained, self.classes, self.epoch = trained, list(classes), 1

    def _save(self, done: int, step: int, position: dict | None, record: dict) -> None:
        state = checkpoint.state_of(
            self.cfg, self.trained, done, self.classes, record, step, position,
            self.rank.world_size,
        )  # fmt: skip
        checkpoint.save(self.cfg, self.options, self.trained, self.rank, state)

    def step(self, done: int) -> None:
        """After ``done`` steps of the current epoch: a checkpoint every ``checkpoint_every``
        steps; and every ``log_every`` steps (the loop's one host sync per window), whether any
        rank's worker was told to go (SIGTERM, closing): then a checkpoint now, and
        :class:`~helpers.errors.Terminated` on every rank."""
        every = self.cfg.checkpoint_every
        leaving = done % self.cfg.log_every == 0 and _any_rank(rankctl.stop_requested())
        if self.cfg.checkpoint_url and (leaving or every and done % every == 0):
            self._save(self.epoch - 1, done, self.batches.position(done), {})
            rankctl.beat()  # an upload is progress too
        if leaving:  # wait for the checkpoint (an all-reduce is a barrier): a rank that
            _any_rank(False)  # reported first could start the restart before it was written
            url = self.cfg.checkpoint_url
            saved = f"checkpointed in {url}" if url else "no checkpoint (checkpoint_url='')"
            raise Terminated(
                f"a worker was told to stop (SIGTERM) at epoch {self.epoch} step {done}; {saved}"
            )

    def epoch_end(self, record: dict) -> None:
        """The epoch's checkpoint (when asked for) and its record."""
        if self.cfg.checkpoint_url:
            self._save(record["epoch"], 0, None, record)
        if self.rank.rank == 0:
            publish(self.cfg.topic, record)
            log.info(epoch_line(record))


def train_rank(
    cfg: TrainConfig, options: dict | None, *, rank: Rank, device: torch.device
) -> list[dict]:
    """One rank, run by :func:`helpers.ddp.run` on every worker; returns epoch records."""
    import torch

    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // rank.local_world_size))
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank

    # 1. The same split on every rank, from one manifest; each rank reads a disjoint share.
    manifest = data.load_manifest(cfg.data_url, options)
    split = data.split(manifest, cfg.val_fraction, cfg.seed)
    train_batches, val_batches = make_loaders(cfg, options, manifest, split, rank, device)

    # 2. A model from scratch, wrapped in DDP (backward() averages the gradients of all ranks)
    #    or sharded by FSDP (each rank keeps and steps a shard of it).
    model = to_device(build_model(cfg.arch, len(manifest.classes)), device)
    model = parallel.wrap(model, cfg.strategy, device, cfg.amp)

    # 3. The learning rate scales with the global batch: ranks x batch_size images per step.
    lr = cfg.lr * cfg.batch_size * rank.world_size / 256
    optimizer = torch.optim.SGD(
        model.parameters(), lr, cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True
    )
    trained = TrainState(
        model,
        torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing),
        optimizer,
        make_scheduler(optimizer, cfg, steps_per_epoch(train_batches, cfg)),
        grad_scaler(device, cfg.amp),  # fp16 only
    )

    # 4. Resume: every rank loads the same checkpoint, so all continue in step; after an
    #    automatic restart (rank.attempt > 0), from this job's latest, possibly mid-epoch.
    first, step, position = 1, 0, None
    if cfg.resume or rank.attempt:
        first, step, position = checkpoint.resume(cfg, options, trained, rank, rank.attempt > 0)
    saver = Saver(cfg, options, rank, trained, manifest.classes, train_batches)

    history = list(rank.restarts)  # a record per automatic restart, then one per epoch
    for epoch in range(first, (cfg.stop_after_epoch or cfg.epochs) + 1):
        train_batches.start_epoch(epoch)  # a new shuffle, the same on every rank
        train_batches.seek(step, position)  # a mid-epoch resume skips what was seen
        saver.epoch = epoch
        record = train_one_epoch(trained, train_batches, device, epoch, cfg, rank, step, saver.step)
        record |= evaluate(trained, val_batches, device, cfg)  # summed over all ranks
        record["param_sum"] = parallel.param_sum(model)  # the same on every rank
        record |= parallel.footprint(trained, device)  # what this rank holds, in bytes
        saver.epoch_end(record)  # DDP: rank 0 writes the checkpoint; FSDP: every rank its shard
        history.append(record)
        step, position = 0, None
    return history
