"""Image decoding and the training / evaluation transforms (CPU, PIL), ending in uint8 tensors.

Normalisation happens on the device, inside the model (``helpers.model.build_model``): the loaders
ship a quarter of the bytes of float32 and the CPU skips two passes over every image.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # names for annotations only: importing costs nothing at run time
    import torch
    from PIL import Image


class BadImageError(ValueError):
    """An object that is not a decodable image; the message names its key."""


def decode_image(data: bytes, key: str, draft: int | None = None) -> Image.Image:
    """Bytes -> RGB PIL image, whatever the mode (L, CMYK, RGBA, P) or the name's suffix.

    ``draft`` lets the JPEG decoder scale by 1/2, 1/4 or 1/8 while decoding (the DCT does it for
    free) as long as both sides stay >= ``draft``: a 500 px photo trained at 128 px decodes at
    half scale, a quarter of the pixels. Raises :class:`BadImageError` naming ``key`` for
    anything that is not an image.
    """
    from PIL import Image

    if not data:
        raise BadImageError(f"{key}: empty object (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
        if draft and img.format == "JPEG":
            img.draft("RGB", (draft, draft))
        img.load()  # decode now: a truncated file fails here, not inside a transform
    except Exception as err:  # noqa: BLE001 - PIL raises many types for bad data
        raise BadImageError(f"{key}: not a readable image ({type(err).__name__}: {err})") from err
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img.convert("RGB")


def train_transform(image_size: int) -> Callable:
    """Standard training augmentation (torchvision's classification recipe), ending in uint8.

    Normalisation happens on the device, inside the model (``helpers.train``): the loader ships
    a quarter of the bytes of float32 and the CPU skips two passes over every image.
    """
    from torchvision import transforms as T

    return T.Compose(
        [
            T.RandomResizedCrop(image_size, scale=(0.25, 1.0), antialias=True),
            T.RandomHorizontalFlip(),
            T.PILToTensor(),
        ]
    )


def eval_transform(image_size: int) -> Callable:
    """Resize the short side to 8/7 of ``image_size`` and take the centre crop, uint8."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Resize(round(image_size * 8 / 7), antialias=True),
            T.CenterCrop(image_size),
            T.PILToTensor(),
        ]
    )


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
