"""The one way in for settings: frozen dataclasses whose field names match the notebooks'
parameters, with every check of a value in one place.

Defaults are the laptop demo's (2 CPU cores, the embedded S3 server, the synthetic dogs); GPU runs
override them by parameters (papermill ``-p``). Notebook 04's parameters cell, ``helpers.sweep``,
the tests and the benchmarks all start from :class:`TrainConfig`; a test keeps the notebooks'
parameter cells equal to these defaults.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from helpers.model import ARCHS
from helpers.transforms import CROP_SCALE

AMPS = ("auto", "bf16", "fp16", "off")
IMAGE_SETS = ("val", "train", "all")
DATA_FORMATS = ("auto", "objects", "shards")
TRAIN_FORMATS = (*DATA_FORMATS, "synthetic")  # synthetic: the benchmarks' no-data ceiling
DECODES = ("auto", "cpu", "gpu")


def _allowed(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r}; allowed: {', '.join(map(repr, allowed))}")


def _at_least(obj, names: tuple[str, ...], low: int) -> None:
    for name in names:
        if getattr(obj, name) < low:
            raise ValueError(f"{name}={getattr(obj, name)}; allowed: {low} or more")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a rank needs to train; carried from the notebook to every worker."""

    data_url: str  # the folder holding Images/ (and manifest.json)
    arch: str = "resnet50"  # "resnet50" or "resnet18" (quicker); always from scratch
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
    cache_dir: str = ""  # local disk cache for fetched images ("" = none)
    checkpoint_url: str = ""  # folder (local or s3://) for checkpoint.pt ("" = none)
    resume: bool = False  # continue from checkpoint_url's checkpoint if there is one
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints (0 = at epoch ends only)
    keep_checkpoints: int = 2  # checkpoints kept in checkpoint_url, the newest
    max_restarts: int = 0  # automatic restarts after a lost worker or a hung rank
    hang_s: float = 120.0  # a rank silent this long (no step done) is hung (0 = never)
    amp: str = "auto"  # "auto" (bf16 on CUDA, off on CPU), "bf16", "fp16", "off"
    log_every: int = 10  # steps between metric records
    max_steps: int = 0  # per epoch; 0 = the whole epoch (smoke tests use a few)
    threads: int = 0  # torch threads per rank; 0 = cores / ranks on the host
    shuffle_pixels: bool = False  # the control: pixels shuffled within each image
    stop_after_epoch: int = 0  # end this run early (0 = at epochs); resume=True continues it
    topic: str = ""  # the Dask event topic of this job's metrics; "" = a fresh one

    def __post_init__(self):
        _allowed("arch", self.arch, ARCHS)
        _allowed("amp", self.amp, AMPS)
        _allowed("data_format", self.data_format, TRAIN_FORMATS)
        _allowed("decode", self.decode, DECODES)
        _at_least(self, ("image_size",), 32)
        _at_least(self, ("epochs", "batch_size", "log_every", "keep_checkpoints"), 1)
        _at_least(self, ("checkpoint_every", "max_restarts", "hang_s"), 0)
        _at_least(self, ("loader_workers", "max_steps", "threads", "stop_after_epoch"), 0)
        _at_least(self, ("prefetch", "decode_batch"), 0)
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction={self.val_fraction}; allowed: strictly between 0 and 1")
        if not 0 < self.crop_scale <= 1:
            raise ValueError(f"crop_scale={self.crop_scale}; allowed: above 0, at most 1")
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr}; allowed: greater than 0")
        if self.resume and not self.checkpoint_url:
            raise ValueError("resume=True needs checkpoint_url (a folder, local or s3://)")
        if not self.topic:  # each job its own topic: two notebooks on one cluster never mix
            object.__setattr__(self, "topic", f"training-{uuid.uuid4().hex[:8]}")

    def check_placement(self, cluster: str) -> None:
        """Checkpoints must be where every rank and the notebook can reach them."""
        if not self.checkpoint_url:
            raise ValueError(
                "checkpoint_url=''; give a folder (local, or s3:// on a remote cluster): the "
                "notebook reads the trained model back from it"
            )
        if "://" in cluster and "://" not in self.checkpoint_url:
            raise ValueError(
                f"cluster={cluster!r} runs on other machines: checkpoint_url="
                f"{self.checkpoint_url!r} must be shared storage such as s3://bucket/runs/name"
            )


@dataclass(frozen=True)
class InferenceConfig:
    """Notebook 05's settings: which images to predict, with which checkpoint, in what tasks."""

    data_url: str  # the folder holding Images/
    checkpoint_url: str  # the folder notebook 04 wrote checkpoint.pt to
    images: str = "val"  # "val", "train" or "all"
    max_images: int = 400  # at most this many of them
    keys_per_task: int = 50  # images per Dask task (per-object path; a shard is one task)
    data_format: str = "auto"  # "objects", "shards", or "auto": shards where an index exists

    def __post_init__(self):
        _allowed("images", self.images, IMAGE_SETS)
        _allowed("data_format", self.data_format, DATA_FORMATS)
        _at_least(self, ("max_images", "keys_per_task"), 1)
        if not self.checkpoint_url:
            raise ValueError(
                "checkpoint_url=''; give the folder notebook 04 wrote checkpoint.pt to"
            )
