"""ResNet training from scratch with DistributedDataParallel: config, model, loops, checkpoints.

The split follows torchvision's ``references/classification``: :func:`train_one_epoch`,
:func:`evaluate`, and the per-rank function :func:`train_rank` that :func:`helpers.ddp.run`
calls on every Dask worker. Workers return small metric records, never the model; rank 0 writes
the checkpoints.
"""

from __future__ import annotations

import io
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, fields

from helpers import data, monitor, storage

log = logging.getLogger(__name__)

ARCHS = ("resnet50", "resnet18")
AMPS = ("auto", "bf16", "fp16", "off")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, applied on the device


@dataclass(frozen=True)
class TrainConfig:
    """Everything a rank needs; field names match notebook 04's parameters."""

    data_url: str = "s3://dogs/synthetic"
    arch: str = "resnet50"  # "resnet50" or "resnet18" (quicker)
    image_size: int = 96  # training resolution
    epochs: int = 6
    batch_size: int = 32  # per rank; the global batch is batch_size x ranks
    lr: float = 0.1  # for a global batch of 256, scaled linearly to the real one
    momentum: float = 0.9
    weight_decay: float = 5e-5
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    val_fraction: float = 0.2
    seed: int = 0
    loader_workers: int = 2  # DataLoader processes per rank
    cache_dir: str = ""  # local disk cache for fetched images ("" = none)
    checkpoint_url: str = ""  # folder (local or s3://) for checkpoint.pt; "" = none
    resume: bool = False  # continue from checkpoint_url's checkpoint if there is one
    amp: str = "auto"  # "auto" (bf16 on CUDA, off on CPU), "bf16", "fp16", "off"
    log_every: int = 10  # steps between metric records
    max_steps: int = 0  # per epoch; 0 = the whole epoch (tests use a few)
    threads: int = 0  # torch threads per rank; 0 = cores / ranks on the host
    topic: str = "training"  # the Dask event topic metrics are published on

    def __post_init__(self):
        check = [("arch", self.arch, ARCHS), ("amp", self.amp, AMPS)]
        for name, value, allowed in check:
            if value not in allowed:
                raise ValueError(f"{name}={value!r}; allowed: {', '.join(map(repr, allowed))}")
        for name in ("image_size", "epochs", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}; allowed: 1 or more")
        if self.image_size < 32:
            raise ValueError(f"image_size={self.image_size}; allowed: 32 or more")
        if self.resume and not self.checkpoint_url:
            raise ValueError("resume=True needs checkpoint_url (a folder, local or s3://)")

    @classmethod
    def from_params(cls, params: dict) -> TrainConfig:
        """Build from a notebook's globals: takes the fields it knows, ignores the rest."""
        return cls(**{f.name: params[f.name] for f in fields(cls) if f.name in params})


def build_model(arch: str, num_classes: int):
    """torchvision's ``arch`` with ``weights=None`` (from scratch), normalising its uint8 input.

    Normalising inside the model lets the loaders ship uint8 (a quarter of the bytes) and keeps
    the statistics with the checkpoint.
    """
    import torch
    import torchvision

    class Normalized(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1) * 255)
            self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1) * 255)
            self.net = net

        def forward(self, x):
            return self.net((x.float() - self.mean) / self.std)

    # zero_init_residual: each block starts as the identity, which keeps from-scratch training
    # stable with small per-rank batches (Goyal et al., "ImageNet in 1 hour").
    net = getattr(torchvision.models, arch)(
        weights=None, num_classes=num_classes, zero_init_residual=True
    )
    return Normalized(net)


def lr_lambda(warmup_steps: int, total_steps: int):
    """Linear warm-up, then cosine decay to zero: a multiplier of the base learning rate."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def _autocast(device, amp: str):
    import torch

    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "off"
    if amp == "off":
        return torch.autocast(device.type, enabled=False), False
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype), amp == "fp16"


def train_one_epoch(
    model, loader, criterion, optimizer, scheduler, device, epoch, cfg, rank, scaler=None
) -> dict:
    """One pass over this rank's shard; publishes a record every ``log_every`` steps.

    The loss stays on the device between records: no per-step host sync for monitoring.
    """
    import torch

    model.train()
    steps = len(loader) if not cfg.max_steps else min(cfg.max_steps, len(loader))
    autocast, _ = _autocast(device, cfg.amp)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    seen = window_seen = 0
    wait = window_wait = 0.0
    start = window_start = tick = time.perf_counter()
    for step, batch in enumerate(loader):
        if step >= steps:
            break
        empty = batch is None  # every image of the batch was unreadable (and logged)
        if empty:
            # Every rank must run the same steps, or DDP's gradient all-reduce falls out of
            # step: take a zero-weight step on a placeholder instead of skipping.
            size = cfg.image_size
            batch = (
                torch.zeros(2, 3, size, size, dtype=torch.uint8),
                torch.zeros(2, dtype=torch.long),
            )
        images, labels = (t.to(device, non_blocking=True) for t in batch)
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        window_wait += time.perf_counter() - tick
        with autocast:
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
            loss_sum += loss.detach() * len(labels)
            correct += (logits.argmax(1) == labels).sum()
            window_seen += len(labels)
        if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
            seen, wait = seen + window_seen, wait + window_wait
            now = time.perf_counter()  # .item() below syncs the device: once per window
            record = {
                "kind": "step",
                "rank": rank.rank,
                "epoch": epoch,
                "step": step + 1,
                "steps": steps,
                "loss": loss_sum.item() / seen,
                "acc": correct.item() / seen,
                "lr": optimizer.param_groups[0]["lr"],
                "img_per_s": window_seen * rank.world_size / (now - window_start),
                "data_wait": window_wait / (now - window_start),
                "time": time.time(),
            }
            monitor.publish(cfg.topic, record)
            if rank.rank == 0:
                log.info(monitor.progress_line(record, elapsed=now - start))
            window_seen, window_wait, window_start = 0, 0.0, now
        tick = time.perf_counter()
    elapsed = time.perf_counter() - start
    return {
        "train_loss": loss_sum.item() / max(seen, 1),
        "train_acc": correct.item() / max(seen, 1),
        "train_images": seen,
        "train_img_per_s": seen * rank.world_size / elapsed,
        "data_wait": wait / elapsed,
        "epoch_s": elapsed,
    }


def evaluate(model, loader, criterion, device, cfg) -> dict:
    """Loss, top-1 and top-5 over this rank's validation shard, summed across all ranks."""
    import torch
    import torch.distributed as dist

    # The bare module, not the DDP wrapper: its forward would broadcast buffers, a collective
    # that ranks with different numbers of validation batches (or none) would never match.
    model = getattr(model, "module", model).eval()
    autocast, _ = _autocast(device, cfg.amp)
    totals = torch.zeros(4, device=device, dtype=torch.float64)  # loss, top1, top5, count
    with torch.inference_mode(), autocast:
        for batch in loader:
            if batch is None:
                continue
            images, labels = (t.to(device, non_blocking=True) for t in batch)
            logits = model(images).float()
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            hits = top == labels[:, None]
            totals += torch.stack(
                [
                    criterion(logits, labels) * len(labels),
                    hits[:, 0].sum(),
                    hits.any(1).sum(),
                    torch.tensor(len(labels), device=device),
                ]
            ).to(totals.dtype)
    if dist.is_initialized():
        dist.all_reduce(totals)
    loss, top1, top5, n = totals.tolist()
    return {
        "val_loss": loss / max(n, 1),
        "val_top1": top1 / max(n, 1),
        "val_top5": top5 / max(n, 1),
        "val_images": int(n),
    }


def checkpoint_path(folder: str) -> str:
    return storage.join(folder, "checkpoint.pt")


def save_checkpoint(folder: str, options: dict | None, state: dict) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    url = checkpoint_path(folder)
    fs = storage.filesystem(url, options)
    path = storage.split_url(url)[1]
    if storage.split_url(url)[0] == "file":  # write then rename: a kill never leaves half a file
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "wb") as f:
            f.write(buf.getvalue())
        os.replace(path + ".tmp", path)
        return
    fs.pipe_file(path, buf.getvalue())  # one PUT: S3 objects appear whole or not at all


# What must not change between a run and its resumption: the split, the data, the model.
RESUME_FIELDS = ("data_url", "arch", "image_size", "val_fraction", "seed")


def check_resumable(state: dict, cfg: TrainConfig) -> None:
    """Refuse to resume from a checkpoint of another run (or one already past ``epochs``)."""
    where = checkpoint_path(cfg.checkpoint_url)
    changed = [
        f"{k}: {state['config'].get(k)!r} -> {getattr(cfg, k)!r}"
        for k in RESUME_FIELDS
        if state["config"].get(k) != getattr(cfg, k)
    ]
    if changed:
        raise ValueError(
            f"cannot resume from {where}: {'; '.join(changed)} (a changed split "
            "would leak validation images into training); keep them or start afresh"
        )
    if state["epoch"] >= cfg.epochs:
        raise ValueError(
            f"{where} is already at epoch {state['epoch']}; resume needs "
            f"epochs > {state['epoch']} (got epochs={cfg.epochs})"
        )


def load_checkpoint(folder: str, options: dict | None = None) -> dict | None:
    """The checkpoint dict at ``folder``, or None if there is none yet."""
    import torch

    url = checkpoint_path(folder)
    fs = storage.filesystem(url, options)
    try:
        raw = fs.cat_file(storage.split_url(url)[1])
    except FileNotFoundError:
        return None
    return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=False)


def model_from_checkpoint(folder: str, options: dict | None = None):
    """Rebuild the trained model on the CPU for inference (notebooks 04 and 05)."""
    state = load_checkpoint(folder, options)
    if state is None:
        raise FileNotFoundError(
            f"no checkpoint at {checkpoint_path(folder)}; train first "
            "(notebook 04) or check checkpoint_url"
        )
    cfg = state["config"]
    model = build_model(cfg["arch"], len(state["classes"]))
    model.load_state_dict(state["model"])
    return model.eval(), state


def train_rank(cfg: TrainConfig, options: dict | None, *, rank, device) -> list[dict]:
    """One DDP rank: what :func:`helpers.ddp.run` calls on every worker.

    The process group is already up (``helpers.ddp``); this is the training story: the same
    split on every rank, a DistributedSampler per epoch, the model wrapped in DDP, evaluation
    reduced across ranks, rank 0 checkpointing. Returns one small record per epoch.
    """
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.utils.data.distributed import DistributedSampler

    # Per task: the thread count outlives the task on a Dask worker.
    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // rank.local_world_size))
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts)

    # 1. Data: one manifest, one split (identical everywhere), each rank a disjoint shard.
    manifest = data.load_manifest(cfg.data_url, options)
    split = data.split(manifest, cfg.val_fraction, cfg.seed)
    train_ds = data.make_dataset(
        manifest, split.train, options, cfg.image_size, train=True, cache_dir=cfg.cache_dir
    )
    val_ds = data.make_dataset(
        manifest,
        data.shard(split.val, rank.rank, rank.world_size),
        options,
        cfg.image_size,
        train=False,
        cache_dir=cfg.cache_dir,
    )
    sampler = DistributedSampler(
        train_ds, rank.world_size, rank.rank, shuffle=True, seed=cfg.seed, drop_last=True
    )
    cuda = device.type == "cuda"
    train_loader = data.make_loader(
        train_ds,
        cfg.batch_size,
        cfg.loader_workers,
        sampler=sampler,
        drop_last=True,
        pin_memory=cuda,
    )
    val_loader = data.make_loader(val_ds, cfg.batch_size * 2, cfg.loader_workers, pin_memory=cuda)

    # 2. Model from scratch, wrapped in DDP: gradients are averaged across ranks in backward.
    model = build_model(cfg.arch, len(manifest.classes)).to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    model = DDP(model, device_ids=[device.index] if cuda else None)

    # 3. SGD with the learning rate scaled to the global batch; warm-up, then cosine decay.
    global_batch = cfg.batch_size * rank.world_size
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=cfg.lr * global_batch / 256,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        nesterov=True,
    )
    steps = len(train_loader) if not cfg.max_steps else min(cfg.max_steps, len(train_loader))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(int(cfg.warmup_epochs * steps), cfg.epochs * steps)
    )
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    _, fp16 = _autocast(device, cfg.amp)
    scaler = torch.amp.GradScaler(device.type) if fp16 else None

    # 4. Resume: every rank loads the same checkpoint, so all continue in step.
    start_epoch = 1
    state = load_checkpoint(cfg.checkpoint_url, options) if cfg.resume else None
    if state is not None:
        check_resumable(state, cfg)
        model.module.load_state_dict(state["model"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = state["epoch"] + 1
        if rank.rank == 0:
            log.info(
                "resumed from %s at epoch %d", checkpoint_path(cfg.checkpoint_url), state["epoch"]
            )

    history = []
    for epoch in range(start_epoch, cfg.epochs + 1):
        sampler.set_epoch(epoch)  # a different shuffle each epoch, the same on every rank
        record = {
            "kind": "epoch",
            "epoch": epoch,
            "rank": rank.rank,
            "world_size": rank.world_size,
            "device": str(device),
        }
        record |= train_one_epoch(
            model, train_loader, criterion, optimizer, scheduler, device, epoch, cfg, rank, scaler
        )
        record |= evaluate(model, val_loader, criterion, device, cfg)
        record["time"] = time.time()
        # One number per epoch to show the ranks hold the same weights (DDP keeps them in step).
        record["param_sum"] = float(sum(p.detach().double().sum() for p in model.parameters()))
        if rank.rank == 0:
            if cfg.checkpoint_url:
                save_checkpoint(
                    cfg.checkpoint_url,
                    options,
                    {
                        "model": model.module.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "epoch": epoch,
                        "config": asdict(cfg),
                        "classes": list(manifest.classes),
                        "metrics": record,
                        "scaler": scaler.state_dict() if scaler is not None else None,
                    },
                )
            monitor.publish(cfg.topic, record)
            log.info(monitor.epoch_line(record))
        history.append(record)
    return history
