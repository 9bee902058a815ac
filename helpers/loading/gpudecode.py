"""JPEG decoding on the GPU: loaders ship the bytes, the device decodes and augments a batch.

With ``decode="gpu"`` (``"auto"`` on CUDA) the loader processes only fetch: a dataset's decode
hook (:func:`keep_jpeg`) keeps each image's bytes, the loader's collate
(:func:`helpers.loading.dataloader.collate`) packs a batch of them into one flat
:class:`JpegBatch` (a few hundred KB instead of the decoded batch's tens of MB, pinned by the
DataLoader), and :class:`ToDevice`, on the rank, decodes it with nvJPEG and crops, resizes and
flips it there with :mod:`helpers.loading.transforms`' tensor path: the CPU path's augmentation,
on the GPU. Two libraries call nvJPEG (``gpu_decoder``, :func:`batch_decoder`): torchvision
(``torchvision.io.decode_jpeg``, the default, deprecated since torchvision 0.29) and TorchCodec
(``torchcodec.decoders.decode_jpeg``, its successor, which also turns a photo by its EXIF
orientation, as a viewer shows it; PIL and torchvision do not).

A JPEG nvJPEG cannot take (CMYK or an unusual frame type, seen in its header; or one it rejects)
is decoded by the CPU decoder instead, one image at a time, and counted in ``ToDevice.stats``;
one no decoder can read is left out of its batch, with a warning naming its position.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from helpers.config import CROP_SCALE, DECODES, GPU_DECODERS, allowed
from helpers.errors import BadImageError, ParameterError
from helpers.loading import transforms
from helpers.loading.objects import S3ImageDataset

if TYPE_CHECKING:  # names for annotations only: importing costs nothing at run time
    import torch

log = logging.getLogger(__name__)

NVJPEG_FRAMES = (0xC0, 0xC1, 0xC2)  # baseline, extended and progressive Huffman frames
# What ToDevice.stats counts besides "images": decodes the CPU did instead of nvJPEG, by cause.
FALLBACKS = ("fallback_header", "fallback_rejected", "unreadable")


def resolve_decode(decode: str, device: torch.device) -> str:
    """``"auto"`` -> ``"gpu"`` on a CUDA device, else ``"cpu"``; ``"gpu"`` needs CUDA."""
    allowed("decode", decode, DECODES)
    if decode == "auto":
        return "gpu" if device.type == "cuda" else "cpu"
    if decode == "gpu" and device.type != "cuda":
        raise ParameterError(
            f"decode='gpu' needs a CUDA device, and this rank runs on {device}: use "
            "decode='auto' (the GPU where there is one) or decode='cpu'"
        )
    return decode


# One call of a library's JPEG decoder: encoded uint8 tensors and a device -> decoded (3, H, W).
BatchDecoder = Callable[[list, "torch.device"], list]


def batch_decoder(library: str) -> BatchDecoder:
    """``decode(tensors, device) -> list of uint8 (3, H, W)``: one call of ``library``'s nvJPEG
    binding (on a CPU device, its CPU decoder) for a list of JPEGs; raises on a bad one."""
    allowed("gpu_decoder", library, GPU_DECODERS)
    if library == "torchcodec":
        try:
            from torchcodec.decoders import decode_jpeg as codec
        except ImportError as err:
            raise ParameterError(
                f"gpu_decoder='torchcodec' needs TorchCodec ({err}): pip install torchcodec, "
                "or gpu_decoder='torchvision'"
            ) from err
        return lambda tensors, device: codec(tensors, mode="RGB", device=device)
    from torchvision.io import ImageReadMode, decode_jpeg

    return lambda tensors, device: decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)


def jpeg_frame(blob: bytes) -> tuple[int, int] | None:
    """``(frame marker, components)`` from a JPEG's header; None for anything else.

    Reads the markers up to the frame header (a few hundred bytes): cheap enough for every image.
    """
    if blob[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(blob)
    while i + 4 <= n and blob[i] == 0xFF:
        marker = blob[i + 1]
        if marker == 0xFF or 0xD0 <= marker <= 0xD8 or marker == 0x01:  # fill, RSTn, TEM
            i += 1 if marker == 0xFF else 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a frame header
            return (marker, blob[i + 9]) if i + 9 < n else None
        if marker == 0xDA:  # a scan before any frame header
            return None
        i += 2 + int.from_bytes(blob[i + 2 : i + 4], "big")
    return None


def for_nvjpeg(blob: bytes) -> bool:
    """Whether nvJPEG should get this image: a Huffman-coded JPEG of 1 or 3 components."""
    frame = jpeg_frame(blob)
    return frame is not None and frame[0] in NVJPEG_FRAMES and frame[1] in (1, 3)


def keep_jpeg(data: bytes, key: str, draft: int | None = None) -> bytes:
    """The datasets' decode hook under GPU decode: the bytes as stored, once PIL has read the
    header (tens of microseconds), so that what is not an image is skipped in the loader, as it
    is on the CPU path; raises :class:`~helpers.errors.BadImageError` naming ``key``."""
    transforms.opened(data, key)  # raises for no bytes, no image, too many pixels
    return bytes(data)


class KeepBytes:
    """The loaders' transform under GPU decode: bytes pass; a PIL image (the shard stream's
    validation padding) becomes a JPEG."""

    def __call__(self, x):
        if isinstance(x, bytes):
            return x
        buf = io.BytesIO()
        x.save(buf, "JPEG", quality=90)
        return buf.getvalue()


class ObjectBytes(S3ImageDataset):
    """The per-object dataset, shipping bytes: a missing or failed object is reported (and
    skipped) as the CPU path does; a readable one is kept as stored."""

    def decode(self, blob: bytes, key: str) -> bytes:
        return keep_jpeg(blob, key)


class JpegBatch:
    """A batch of encoded images as one flat uint8 tensor: one shared-memory block between
    processes, one pinned buffer; ``images[mask]`` keeps the selected ones."""

    def __init__(self, data: torch.Tensor, lengths: torch.Tensor, nvjpeg: torch.Tensor):
        self.data, self.lengths, self.nvjpeg = data, lengths, nvjpeg

    @classmethod
    def of(cls, blobs: Sequence[bytes]) -> JpegBatch:
        """Pack ``blobs`` (and whether each suits nvJPEG)."""
        import torch

        flat = bytearray(b"".join(blobs)) or bytearray(1)
        return cls(
            torch.frombuffer(flat, dtype=torch.uint8),
            torch.tensor([len(b) for b in blobs], dtype=torch.int64),
            torch.tensor([for_nvjpeg(b) for b in blobs], dtype=torch.bool),
        )

    def __len__(self) -> int:
        return len(self.lengths)

    def blobs(self) -> list[torch.Tensor]:
        """Each image's bytes: views of the flat tensor."""
        n = int(self.lengths.sum())
        return list(self.data[:n].split(self.lengths.tolist())) if len(self) else []

    def __getitem__(self, mask) -> JpegBatch:
        blobs = self.blobs()
        keep = [k for k, m in enumerate(mask.tolist()) if m]
        return JpegBatch.of([blobs[k].numpy().tobytes() for k in keep])

    def pin_memory(self) -> JpegBatch:
        """Called by the DataLoader's pinning thread (``pin_memory=True``)."""
        return JpegBatch(self.data.pin_memory(), self.lengths, self.nvjpeg)


def decode_jpegs(
    batch: JpegBatch,
    device: torch.device,
    chunk: int = 0,
    stats: dict | None = None,
    decode: BatchDecoder | None = None,
) -> list:
    """Each image of ``batch`` as uint8 (3, H, W) on ``device``, or None where no decoder can
    read it. nvJPEG (``decode``, a :func:`batch_decoder`; torchvision's by default) takes
    ``chunk`` images a call (0: all); an image it is not given or rejects goes to the CPU
    decoder. ``stats`` counts them by cause (:data:`FALLBACKS`): not given
    (``"fallback_header"``: its header says nvJPEG cannot take it), rejected
    (``"fallback_rejected"``), and, of both, ``"unreadable"`` by any decoder."""
    decode = decode or batch_decoder("torchvision")
    stats = stats if stats is not None else {}
    blobs = batch.blobs()
    out: list = [None] * len(blobs)
    gpu = [k for k, ok in enumerate(batch.nvjpeg.tolist()) if ok]
    step = chunk or len(gpu) or 1
    for start in range(0, len(gpu), step):
        part = gpu[start : start + step]
        try:
            images = decode([blobs[k] for k in part], device)
        except RuntimeError:  # one bad image fails the call: find it, one by one
            images = [_one(decode, blobs[k], device) for k in part]
        for k, image in zip(part, images, strict=True):
            out[k] = image
    given = set(gpu)
    for k, image in enumerate(out):
        if image is None:
            cause = "fallback_rejected" if k in given else "fallback_header"
            stats[cause] = stats.get(cause, 0) + 1
            out[k] = _cpu(blobs[k], k, device, stats)
    stats["images"] = stats.get("images", 0) + len(blobs)
    return out


def _one(decode, blob, device):
    try:
        return decode([blob], device)[0]
    except RuntimeError:
        return None


def _cpu(blob, k: int, device, stats: dict):
    """PIL's decoder (any mode, any format), for what nvJPEG did not decode."""
    from torchvision.transforms.functional import pil_to_tensor

    try:
        image = transforms.decode_image(blob.numpy().tobytes(), f"image {k} of the batch")
    except BadImageError as err:
        stats["unreadable"] = stats.get("unreadable", 0) + 1
        log.warning("left out of its batch: %s", err)
        return None
    return pil_to_tensor(image).to(device, non_blocking=True)


class ToDevice:
    """Moves a loader's batches to the device; decodes and augments a :class:`JpegBatch` there.

    On CUDA the work runs on a side stream that the host then waits for: a step's data wait
    (:mod:`helpers.loop.meter`) includes decoding, augmenting and the host-to-device copies,
    while the previous step's kernels keep the GPU busy. ``generator`` draws the augmentations;
    it is reseeded every epoch (:meth:`helpers.loading.batches.Batches.start_epoch`).
    """

    def __init__(
        self,
        image_size: int,
        train: bool,
        decode_batch: int = 0,
        crop_scale: float = CROP_SCALE,
        gpu_decoder: str = "torchvision",
    ):
        import torch

        self.image_size, self.train, self.decode_batch = image_size, train, decode_batch
        self.crop_scale, self.gpu_decoder = crop_scale, gpu_decoder
        self._decode = None  # gpu_decoder's batch_decoder, made on the first bytes batch
        self.generator = torch.Generator()
        self.stats: dict[str, int] = {}
        self._streams: dict = {}

    def __call__(
        self, images: torch.Tensor | JpegBatch, labels: torch.Tensor, device: torch.device
    ) -> tuple:
        """:meth:`move`, on CUDA on a side stream the main stream then waits for."""
        import torch

        if device.type != "cuda":
            return self.move(images, labels, device)
        main = torch.cuda.current_stream(device)
        side = self._streams.setdefault(device, torch.cuda.Stream(device))
        with torch.cuda.stream(side):
            images, labels = self.move(images, labels, device)
        side.synchronize()
        main.wait_stream(side)
        images.record_stream(main)  # made on the side stream, used on the main one
        labels.record_stream(main)
        return images, labels

    def move(
        self, images: torch.Tensor | JpegBatch, labels: torch.Tensor, device: torch.device
    ) -> tuple:
        """``(images, labels)`` on ``device``: uint8 (N, 3, S, S) and int64 (N,); N is 0 when
        no image of a bytes batch could be decoded."""
        if isinstance(images, JpegBatch):
            before = [self.stats.get(k, 0) for k in FALLBACKS]
            self._decode = self._decode or batch_decoder(self.gpu_decoder)
            decoded = decode_jpegs(images, device, self.decode_batch, self.stats, self._decode)
            keep = [k for k, x in enumerate(decoded) if x is not None]
            if len(keep) < len(decoded):
                labels, decoded = labels[keep], [decoded[k] for k in keep]
            if [self.stats.get(k, 0) for k in FALLBACKS] != before:
                log.info("decode: %s", self.stats)
            if self.train:
                images = transforms.train_tensors(
                    decoded, self.image_size, self.generator, self.crop_scale
                )
            else:
                images = transforms.eval_tensors(decoded, self.image_size)
        return images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
