"""Image decoding and the training / evaluation transforms, ending in uint8 tensors.

Two paths with one meaning. The CPU path (:func:`decode_image`, :func:`train_transform`,
:func:`eval_transform`) works on PIL images in the loader processes. The tensor path
(:func:`train_tensors`, :func:`eval_tensors`) works on decoded uint8 tensors wherever they are,
on the GPU after :mod:`helpers.loading.gpudecode` has decoded a batch there: the same crop sampler
(:func:`crop_box` is torchvision's ``RandomResizedCrop.get_params`` draw for draw), the same flip,
the same eval resize and centre crop, antialiased bilinear resizing in both. Normalisation happens
on the device, inside the model (:func:`helpers.loop.model.build_model`): both paths end in uint8.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from helpers.config import CROP_SCALE
from helpers.errors import BadImageError

if TYPE_CHECKING:  # names for annotations only: importing costs nothing at run time
    import torch
    from PIL import Image

# RandomResizedCrop: a training crop covers crop_scale (TrainConfig: CROP_SCALE by default) to all
# of the image's area, its aspect ratio within RATIO; then a flip half of the time.
RATIO = (3 / 4, 4 / 3)
FLIP_P = 0.5
# The most pixels an image may declare: 8192 x 8192, 200 MB decoded as RGB in a loader process
# and ~0.5 s of CPU. A 12-Mpx photo is a fifth of it; a header declaring more is refused before
# any decoding (PIL itself only warns up to twice its own bound).
MAX_PIXELS = 2**26


def decode_image(data: bytes, key: str, draft: int | None = None) -> Image.Image:
    """Bytes -> RGB PIL image, whatever the mode (L, CMYK, RGBA, P) or the name's suffix.

    ``draft`` lets the JPEG decoder scale by 1/2, 1/4 or 1/8 while decoding (the DCT does it for
    free) as long as both sides stay >= ``draft``: a 500 px photo trained at 128 px decodes at
    half scale, a quarter of the pixels. Raises :class:`BadImageError` naming ``key`` for
    anything that is not an image, or declares more than :data:`MAX_PIXELS`.
    """
    img = opened(data, key)
    try:
        if draft and img.format == "JPEG":
            img.draft("RGB", (draft, draft))
        img.load()  # decode now: a truncated file fails here, not inside a transform
    except Exception as err:  # noqa: BLE001 - PIL raises many types for bad data
        raise BadImageError(f"{key}: not a readable image ({type(err).__name__}: {err})") from err
    if img.mode == "RGB":
        return img
    return _rgb(img)


def opened(data: bytes, key: str) -> Image.Image:
    """``data`` opened by PIL (its header read, nothing decoded yet); :class:`BadImageError`
    naming ``key`` for no bytes, what PIL cannot open, or more than :data:`MAX_PIXELS`."""
    from PIL import Image

    if not data:
        raise BadImageError(f"{key}: empty object (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except Exception as err:  # noqa: BLE001 - PIL raises many types for bad data
        raise BadImageError(f"{key}: not a readable image ({type(err).__name__}: {err})") from err
    if img.width * img.height > MAX_PIXELS:
        raise BadImageError(
            f"{key}: declares {img.width}x{img.height} pixels, over the {MAX_PIXELS} a loader "
            "decodes (a damaged header, or a photo to downscale before training)"
        )
    return img


def _rgb(img: Image.Image) -> Image.Image:
    from PIL import Image

    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img.convert("RGB")


def train_transform(image_size: int, crop_scale: float = CROP_SCALE) -> Callable:
    """Standard training augmentation (torchvision's classification recipe), ending in uint8:
    a random crop of ``crop_scale`` to all of the image's area, resized, and a random flip.

    Normalisation happens on the device, inside the model (:mod:`helpers.loop.model`): the loader
    ships a quarter of the bytes of float32 and the CPU skips two passes over every image.
    """
    from torchvision import transforms as T

    return T.Compose(
        [
            T.RandomResizedCrop(image_size, scale=(crop_scale, 1.0), ratio=RATIO, antialias=True),
            T.RandomHorizontalFlip(FLIP_P),
            T.PILToTensor(),
        ]
    )


def eval_transform(image_size: int) -> Callable:
    """Resize the short side to 8/7 of ``image_size`` and take the centre crop, uint8."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Resize(eval_short_side(image_size), antialias=True),
            T.CenterCrop(image_size),
            T.PILToTensor(),
        ]
    )


def eval_short_side(image_size: int) -> int:
    """The short side evaluation resizes to before the centre crop: 8/7 of ``image_size``."""
    return round(image_size * 8 / 7)


def crop_box(
    height: int,
    width: int,
    generator: torch.Generator | None = None,
    crop_scale: float = CROP_SCALE,
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random crop: torchvision's ``RandomResizedCrop.get_params``
    (area ``crop_scale`` to 1, aspect ``RATIO``) draw for draw, from ``generator`` instead of the
    global generator, so a seeded generator gives the crops the CPU path gives under the same
    seed."""
    import torch

    area = height * width
    log_ratio = torch.log(torch.tensor(RATIO))
    for _ in range(10):
        target = area * torch.empty(1).uniform_(crop_scale, 1.0, generator=generator).item()
        lo, hi = float(log_ratio[0]), float(log_ratio[1])
        aspect = torch.exp(torch.empty(1).uniform_(lo, hi, generator=generator)).item()
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator))
            return top, left, h, w
    ratio = width / height  # ten misses (extreme shapes): the centre crop, as torchvision does
    w, h = width, height
    if ratio < min(RATIO):
        h = int(round(w / min(RATIO)))
    elif ratio > max(RATIO):
        w = int(round(h * max(RATIO)))
    return (height - h) // 2, (width - w) // 2, h, w


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (3, h, w) -> float (1, 3, *size): antialiased bilinear, PIL's filter."""
    import torch.nn.functional as F

    return F.interpolate(x[None].float(), size, mode="bilinear", antialias=True)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    import torch

    return x.round_().clamp_(0, 255).to(torch.uint8)


def train_tensors(
    images: Sequence[torch.Tensor],
    image_size: int,
    generator: torch.Generator | None = None,
    crop_scale: float = CROP_SCALE,
) -> torch.Tensor:
    """:func:`train_transform` on decoded uint8 (3, H, W) tensors, on their device: a random
    resized crop and a random flip per image, drawn in the CPU path's order; uint8 (N, 3, S, S).

    One crop-and-resize per image (the crops differ in size), one flip and one cast per batch."""
    import torch

    s = image_size
    out = torch.empty(len(images), 3, s, s, device=_device(images))
    flips = []
    for k, x in enumerate(images):
        top, left, h, w = crop_box(x.shape[1], x.shape[2], generator, crop_scale)
        out[k] = _resize(x[:, top : top + h, left : left + w], (s, s))[0]
        if torch.rand(1, generator=generator).item() < FLIP_P:
            flips.append(k)
    if flips:
        index = torch.tensor(flips, device=out.device)
        out[index] = out[index].flip(-1)
    return _to_uint8(out)


def eval_tensors(images: Sequence[torch.Tensor], image_size: int) -> torch.Tensor:
    """:func:`eval_transform` on decoded uint8 (3, H, W) tensors: the short side resized to
    :func:`eval_short_side` (the long side as torchvision computes it), then the centre crop."""
    import torch

    s, short = image_size, eval_short_side(image_size)
    out = torch.empty(len(images), 3, s, s, device=_device(images))
    for k, x in enumerate(images):
        h, w = x.shape[1:]
        rh, rw = (int(short * h / w), short) if w <= h else (short, int(short * w / h))
        top, left = int(round((rh - s) / 2.0)), int(round((rw - s) / 2.0))
        out[k] = _resize(x, (rh, rw))[0, :, top : top + s, left : left + s]
    return _to_uint8(out)


def _device(images: Sequence[torch.Tensor]):
    return images[0].device if len(images) else "cpu"


def shuffle_pixels(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x`` (uint8 ``(3, H, W)`` or ``(N, 3, H, W)``) with each image's pixels permuted.

    The colour histogram of every image is kept exactly; every spatial structure is gone. Each
    image gets its own permutation (``generator``: a ``torch.Generator`` for repeatability).
    """
    import torch

    batch = x if x.dim() == 4 else x[None]
    n, c, h, w = batch.shape
    order = torch.rand(n, h * w, generator=generator).argsort(1)
    flat = batch.reshape(n, c, h * w)
    out = flat.gather(2, order[:, None, :].expand(n, c, h * w)).reshape(n, c, h, w)
    return out if x.dim() == 4 else out[0]


class ShufflePixels:
    """The control run's last transform (:func:`shuffle_pixels`): a network that learns from
    these images learned colour counts, not shapes. Uses torch's global generator, seeded per
    loader process."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return shuffle_pixels(x)


class Compose:
    """Apply transforms in order (a picklable chain for the dataset's worker processes)."""

    def __init__(self, steps):
        self.steps = list(steps)

    def __call__(self, x):
        for step in self.steps:
            x = step(x)
        return x
