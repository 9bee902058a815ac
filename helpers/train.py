"""Training from scratch with DistributedDataParallel: the per-rank function and its loops.

The split follows torchvision's ``references/classification``: :func:`train_one_epoch`,
:func:`evaluate`, and the per-rank function :func:`train_rank` that :func:`helpers.ddp.run` calls
on every Dask worker (notebook 04 shows it line by line). Workers return small metric records,
never the model; rank 0 writes the checkpoints.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from helpers import checkpoint, monitor
from helpers.config import TrainConfig
from helpers.loaders import batch_to_device, make_loaders, start_epoch, without_padding
from helpers.meter import StepMeter, placeholder_batch
from helpers.model import build_model, param_sum

if TYPE_CHECKING:  # names for annotations only: importing costs nothing at run time
    import torch
    from torch.optim.lr_scheduler import LRScheduler

    from helpers.ddp import Rank

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


def steps_per_epoch(loader: Iterable, cfg: TrainConfig) -> int:
    return min(cfg.max_steps, len(loader)) if cfg.max_steps else len(loader)


def train_one_epoch(
    model: torch.nn.Module,
    loader: Iterable,
    criterion: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: LRScheduler,
    device: torch.device,
    epoch: int,
    cfg: TrainConfig,
    rank: Rank,
    scaler: torch.amp.GradScaler | None = None,
) -> dict:
    """One pass over this rank's share; publishes a record every ``log_every`` steps."""
    import torch

    model.train()
    steps = steps_per_epoch(loader, cfg)
    meter = StepMeter(device, epoch, steps, cfg, rank)
    for step, batch in zip(range(steps), loader, strict=False):  # stop at steps
        empty = batch is None  # every image of the batch was unreadable (and logged)
        # Copied, or with GPU decode decoded and augmented, on the device: part of the data wait.
        images, labels = batch_to_device(batch or placeholder_batch(cfg.image_size), loader, device)
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        meter.waited()
        with autocast(device, cfg.amp):
            logits = model(images)
            loss = criterion(logits, labels) * (0.0 if empty else 1.0)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        if not empty:
            meter.add(step, loss, logits, labels, optimizer.param_groups[0]["lr"])
    return meter.summary(device)


def evaluate(
    model: torch.nn.Module,
    loader: Iterable,
    criterion: torch.nn.Module,
    device: torch.device,
    cfg: TrainConfig,
) -> dict:
    """Loss, top-1 and top-5 over this rank's validation slice, summed across all ranks."""
    import torch
    import torch.distributed as dist

    # The bare module, not the DDP wrapper: its forward would broadcast buffers, a collective
    # that ranks with different numbers of validation batches (or none) would never match.
    model = getattr(model, "module", model).eval()
    totals = torch.zeros(4, device=device, dtype=torch.float64)  # loss, top1, top5, count
    with torch.inference_mode(), autocast(device, cfg.amp):
        for batch in loader:
            if batch is None:
                continue
            images, labels = batch_to_device(without_padding(batch), loader, device)
            if not len(labels):
                continue
            logits = model(images).float()
            hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
            n = torch.tensor(len(labels), device=device)
            loss = criterion(logits, labels) * len(labels)
            totals += torch.stack([loss, hits[:, 0].sum(), hits.any(1).sum(), n]).to(totals.dtype)
    if dist.is_initialized():
        dist.all_reduce(totals)
    loss, top1, top5, n = totals.tolist()
    return {
        "val_loss": loss / max(n, 1),
        "val_top1": top1 / max(n, 1),
        "val_top5": top5 / max(n, 1),
        "val_images": int(n),
    }


def save_epoch(
    cfg: TrainConfig,
    options: dict | None,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: LRScheduler,
    scaler: torch.amp.GradScaler | None,
    classes: Sequence[str],
    record: dict,
) -> None:
    """Rank 0's end of an epoch: the checkpoint (when asked for) and the epoch's record."""
    if cfg.checkpoint_url:
        state = checkpoint.state_of(
            cfg, model, optimizer, scheduler, record["epoch"], classes, record, scaler
        )
        checkpoint.save(cfg.checkpoint_url, options, state)
    monitor.publish(cfg.topic, record)
    log.info(monitor.epoch_line(record))


def train_rank(
    cfg: TrainConfig, options: dict | None, *, rank: Rank, device: torch.device
) -> list[dict]:
    """One DDP rank, run by :func:`helpers.ddp.run` on every worker; returns epoch records."""
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // rank.local_world_size))
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank

    # 1. The same split on every rank; a DistributedSampler deals each rank a disjoint share.
    classes, train_loader, val_loader = make_loaders(cfg, options, rank, device)

    # 2. A model from scratch, wrapped in DDP: backward() averages the gradients of all ranks.
    model = to_device(build_model(cfg.arch, len(classes)), device)
    model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    # 3. The learning rate scales with the global batch: ranks x batch_size images per step.
    lr = cfg.lr * cfg.batch_size * rank.world_size / 256
    optimizer = torch.optim.SGD(
        model.parameters(), lr, cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True
    )
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch(train_loader, cfg))
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    scaler = grad_scaler(device, cfg.amp)  # fp16 only

    # 4. Resume: every rank loads the same checkpoint, so all continue in step.
    first = 1
    if cfg.resume:
        first = checkpoint.resume(cfg, options, model.module, optimizer, scheduler, scaler)

    history = []
    for epoch in range(first, (cfg.stop_after_epoch or cfg.epochs) + 1):
        start_epoch(train_loader, epoch, cfg, rank)  # sampler.set_epoch: a new shuffle, same on all
        record = train_one_epoch(
            model, train_loader, criterion, optimizer, scheduler, device, epoch, cfg, rank, scaler
        )
        record |= evaluate(model, val_loader, criterion, device, cfg)  # summed over all ranks
        record["param_sum"] = param_sum(model)  # the same on every rank: DDP keeps them in step
        if rank.rank == 0:  # one writer
            save_epoch(cfg, options, model.module, optimizer, scheduler, scaler, classes, record)
        history.append(record)
    return history
