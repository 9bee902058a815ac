"""The one way in for settings: frozen dataclasses whose field names match the notebooks'
parameters, with every check of a value in one place, and what a task is told about its place
in a job (:class:`Rank`).

Defaults are the laptop demo's (2 CPU cores, the embedded S3 server, the synthetic dogs); GPU runs
override them by parameters (papermill ``-p``). Notebook 04's parameters cell, the sweep, the
tests and the benchmarks all start from :class:`TrainConfig`; a test keeps the notebooks'
parameter cells equal to these defaults. A job's restart, hang and topic settings live in the
config it launches (:class:`JobConfig`), so ``ddp.start(client, train.train_rank, cfg, options)``
behaves the same from a notebook and from a script.

Bottom layer: this module imports nothing of the project but :mod:`helpers.errors`, and every
layer may import it.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from helpers.errors import ParameterError

ARCHS = ("resnet50", "resnet18", "wide_resnet50_2", "wide_resnet101_2")
STRATEGIES = ("ddp", "fsdp")  # a full model per rank (DDP), or one model sharded across them
AMPS = ("auto", "bf16", "fp16", "off")
IMAGE_SETS = ("val", "train", "all")
FORMATS = ("auto", "objects", "shards")  # where the images are read from; "auto": shards if any
TRAIN_FORMATS = (*FORMATS, "synthetic")  # synthetic: the benchmarks' no-data ceiling
DECODES = ("auto", "cpu", "gpu")
# Whose nvJPEG binding decodes under decode="gpu": torchvision's (deprecated since torchvision
# 0.29) or TorchCodec's, its successor. Which is faster on a GPU is bench_gpu's to measure.
GPU_DECODERS = ("torchvision", "torchcodec")
# Training crops cover CROP_SCALE to all of the image's area. ImageNet's recipe draws from 0.08;
# the demo's 10 short epochs learn more from lighter crops (bench/results/calibration.json).
CROP_SCALE = 0.5


def allowed(name: str, value: object, choices: Sequence) -> None:
    """Raise :class:`ParameterError` naming ``name`` and ``choices`` unless ``value`` is one."""
    if value not in choices:
        raise ParameterError(f"{name}={value!r}; allowed: {', '.join(map(repr, choices))}")


def _at_least(obj, names: tuple[str, ...], low: int) -> None:
    for name in names:
        if getattr(obj, name) < low:
            raise ParameterError(f"{name}={getattr(obj, name)}; allowed: {low} or more")


@dataclass(frozen=True)
class Rank:
    """One rank's place in a DDP job, as the launcher (:mod:`helpers.ddp`) plans it."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    worker: str
    gpu: int = 0  # index among the GPUs this worker sees (when it has any)
    job: str = ""  # the attempt's unique name: task keys, the stop switch, the heartbeat
    attempt: int = 0  # 0, then 1, 2... after automatic restarts: resume from the checkpoint
    restarts: tuple = ()  # the records of the restarts so far (cause, error, time)

    @classmethod
    def alone(cls) -> Rank:
        """The one rank of a job of one, in this process (measuring a loader outside a job)."""
        return cls(0, 1, 0, 1, "127.0.0.1", 0, "this process")


@dataclass(frozen=True, kw_only=True)
class JobConfig:
    """How a DDP job lives on the cluster; :func:`helpers.ddp.run` reads it from the config it
    launches (a :class:`TrainConfig` is one)."""

    max_restarts: int = 0  # automatic restarts after a lost worker or a hung rank
    hang_s: float = 120.0  # a rank silent this long (no step done) is hung (0 = never)
    restart_wait_s: float = 120.0  # how long a restart waits for the workers to be back
    topic: str = ""  # the Dask event topic of this job's metrics; "" = a fresh one

    def __post_init__(self):
        _at_least(self, ("max_restarts", "hang_s", "restart_wait_s"), 0)
        if not self.topic:  # each job its own topic: two notebooks on one cluster never mix
            object.__setattr__(self, "topic", f"training-{uuid.uuid4().hex[:8]}")


@dataclass(frozen=True)
class TrainConfig(JobConfig):
    """Everything a rank needs to train; carried from the notebook to every worker."""

    data_url: str  # the folder holding Images/ (and manifest.json)
    arch: str = "resnet50"  # a torchvision ResNet (ARCHS); always from scratch
    strategy: str = "ddp"  # "ddp": each rank holds the whole model; "fsdp": a shard of it
    image_size: int = 64  # training resolution; 224 is the usual GPU choice
    epochs: int = 10
    batch_size: int = 16  # per rank: the global batch is batch_size x ranks
    lr: float = 0.2  # for a global batch of 256, scaled linearly to the real one
    momentum: float = 0.9
    weight_decay: float = 5e-5
    warmup_epochs: float = 1.0  # linear warm-up, then cosine decay to zero
    label_smoothing: float = 0.1
    crop_scale: float = CROP_SCALE  # training crops cover this share of the image or more
    val_fraction: float = 0.2  # used when the dataset has no official split
    seed: int = 0  # the split, the initial weights, the shuffles and the augmentations
    data_format: str = "auto"  # "objects", "shards", or "auto": shards where an index exists
    loader_workers: int = 1  # DataLoader processes per rank
    decode: str = "auto"  # JPEG decoding: "cpu" (loader processes), "gpu" (nvJPEG), "auto"
    prefetch: int = 0  # batches each loader process keeps ready; 0 = the loader's default
    decode_batch: int = 0  # images per nvJPEG call under GPU decode; 0 = the whole batch
    gpu_decoder: str = "torchvision"  # whose nvJPEG under GPU decode: GPU_DECODERS
    cache_dir: str = ""  # local disk cache for fetched images ("" = none)
    checkpoint_url: str = ""  # folder (local or s3://) for checkpoint.pt ("" = none)
    resume: bool = False  # continue from checkpoint_url's checkpoint if there is one
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints (0 = at epoch ends only)
    keep_checkpoints: int = 2  # checkpoints kept in checkpoint_url, the newest
    amp: str = "auto"  # "auto" (bf16 on CUDA, off on CPU), "bf16", "fp16", "off"
    log_every: int = 10  # steps between metric records
    max_steps: int = 0  # per epoch; 0 = the whole epoch (smoke tests use a few)
    threads: int = 0  # torch threads per rank; 0 = cores / ranks on the host
    shuffle_pixels: bool = False  # the control: pixels shuffled within each image
    stop_after_epoch: int = 0  # end this run early (0 = at epochs); resume=True continues it
    keys_log: str = ""  # a local folder: each rank logs the keys of every step (resume checks)

    def __post_init__(self):
        super().__post_init__()
        allowed("arch", self.arch, ARCHS)
        allowed("amp", self.amp, AMPS)
        allowed("strategy", self.strategy, STRATEGIES)
        if self.strategy == "fsdp" and self.amp == "fp16":  # FSDP's own policy: bf16 or none
            raise ParameterError(
                "amp='fp16' with strategy='fsdp'; allowed amp with fsdp: 'auto', 'bf16', 'off'"
            )
        allowed("data_format", self.data_format, TRAIN_FORMATS)
        allowed("decode", self.decode, DECODES)
        allowed("gpu_decoder", self.gpu_decoder, GPU_DECODERS)
        _at_least(self, ("image_size",), 32)
        _at_least(self, ("epochs", "batch_size", "log_every", "keep_checkpoints"), 1)
        _at_least(self, ("checkpoint_every", "loader_workers", "max_steps", "threads"), 0)
        _at_least(self, ("stop_after_epoch", "prefetch", "decode_batch"), 0)
        if not 0 < self.val_fraction < 1:
            raise ParameterError(
                f"val_fraction={self.val_fraction}; allowed: strictly between 0 and 1"
            )
        if not 0 < self.crop_scale <= 1:
            raise ParameterError(f"crop_scale={self.crop_scale}; allowed: above 0, at most 1")
        if self.lr <= 0:
            raise ParameterError(f"lr={self.lr}; allowed: greater than 0")
        if self.resume and not self.checkpoint_url:
            raise ParameterError("resume=True needs checkpoint_url (a folder, local or s3://)")

    def check_placement(self, cluster: str) -> None:
        """Checkpoints must be where every rank and the notebook can reach them."""
        if not self.checkpoint_url:
            raise ParameterError(
                "checkpoint_url=''; give a folder (local, or s3:// on a remote cluster): the "
                "notebook reads the trained model back from it"
            )
        if "://" in cluster and "://" not in self.checkpoint_url:
            raise ParameterError(
                f"cluster={cluster!r} runs on other machines: checkpoint_url="
                f"{self.checkpoint_url!r} must be shared storage such as s3://bucket/runs/name"
            )


@dataclass(frozen=True)
class InferenceConfig:
    """Notebook 05's settings: which images to predict, with which checkpoint, in what tasks."""

    data_url: str  # the folder holding Images/
    checkpoint_url: str  # the folder notebook 04 trained into (DDP checkpoint.pt or FSDP shards)
    images: str = "val"  # "val", "train" or "all"
    max_images: int = 400  # at most this many of them
    keys_per_task: int = 50  # images per Dask task (per-object path; a shard is one task)
    data_format: str = "auto"  # "objects", "shards", or "auto": shards where an index exists

    def __post_init__(self):
        allowed("images", self.images, IMAGE_SETS)
        allowed("data_format", self.data_format, FORMATS)
        _at_least(self, ("max_images", "keys_per_task"), 1)
        if not self.checkpoint_url:
            raise ParameterError(
                "checkpoint_url=''; give the folder notebook 04 wrote checkpoint.pt to"
            )
