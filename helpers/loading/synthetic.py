"""Synthetic "dogs": seeded images in the Stanford Dogs layout whose breed is a silhouette.

Each breed is one big shape. Its silhouette is the only class signal: colours, sizes, backgrounds
and clutter follow the same laws in every class, and every shape is scaled to the same area, so a
colour histogram guesses at chance while a CNN can learn the outline, under position, scale,
rotation, squash, colour and blur jitter. Deterministic for a seed, a few ms an image.
"""

from __future__ import annotations

import colorsys
import functools
import io
import math
from typing import TYPE_CHECKING

from helpers.errors import ParameterError

if TYPE_CHECKING:  # names for annotations only: importing costs nothing at run time
    import numpy as np

STANFORD_CLASSES = (
    "n02085620-Chihuahua",
    "n02085782-Japanese_spaniel",
    "n02085936-Maltese_dog",
    "n02086079-Pekinese",
    "n02086240-Shih-Tzu",
    "n02086646-Blenheim_spaniel",
    "n02086910-papillon",
    "n02087046-toy_terrier",
    "n02087394-Rhodesian_ridgeback",
    "n02088094-Afghan_hound",
    "n02088238-basset",
    "n02088364-beagle",
    "n02088466-bloodhound",
    "n02088632-bluetick",
    "n02089078-black-and-tan_coonhound",
    "n02089867-Walker_hound",
    "n02089973-English_foxhound",
    "n02090379-redbone",
    "n02090622-borzoi",
    "n02090721-Irish_wolfhound",
)
# One shape per breed (cycled past ten): distinct under rotation, reflection, scale and squash,
# which the generator and the training crops and flips apply to every class alike.
SHAPES = (
    "disc",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "crescent",
    "heart",
    "arrow",
    "bowtie",
)

Points = list[tuple[float, float]]
# The shape's area as a share of the short side squared, drawn uniformly: the same for every class.
SHAPE_AREA = (0.2, 0.35)


def _circle(r: float = 1.0, dx: float = 0.0, n: int = 48) -> Points:
    step = 2 * math.pi / n
    return [(dx + r * math.cos(i * step), r * math.sin(i * step)) for i in range(n)]


def _heart(n: int = 64) -> Points:
    ts = [2 * math.pi * i / n for i in range(n)]
    return [
        (
            math.sin(t) ** 3,
            -0.15
            - (13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)) / 16,
        )
        for t in ts
    ]


def _star(points: int = 5, inner: float = 0.42) -> Points:
    return [
        (
            (1 if i % 2 == 0 else inner) * math.cos(math.pi * (i / points - 0.5)),
            (1 if i % 2 == 0 else inner) * math.sin(math.pi * (i / points - 0.5)),
        )
        for i in range(2 * points)
    ]


def _parts(shape: str) -> list[tuple[int, Points]]:
    """``shape`` at unit size: polygons drawn in turn, filled (255) or cut out (0)."""
    polygons = {
        "disc": [(255, _circle())],
        "ring": [(255, _circle()), (0, _circle(0.6))],
        "crescent": [(255, _circle()), (0, _circle(0.85, dx=0.45))],
        "heart": [(255, _heart())],
        "star": [(255, _star())],
        "square": [(255, [(-0.7, -0.7), (0.7, -0.7), (0.7, 0.7), (-0.7, 0.7)])],
        "triangle": [(255, [(0.0, -1.0), (0.87, 0.5), (-0.87, 0.5)])],
        "cross": [
            (
                255,
                [(0.3, 1), (0.3, 0.3), (1, 0.3), (1, -0.3), (0.3, -0.3), (0.3, -1)]
                + [(-0.3, -1), (-0.3, -0.3), (-1, -0.3), (-1, 0.3), (-0.3, 0.3), (-0.3, 1)],
            )
        ],
        "arrow": [
            (
                255,
                [(1, 0), (0.1, 0.75), (0.1, 0.28), (-1, 0.28), (-1, -0.28), (0.1, -0.28)]
                + [(0.1, -0.75)],
            )
        ],
        "bowtie": [(255, [(-1, -0.75), (0, -0.1), (1, -0.75), (1, 0.75), (0, 0.1), (-1, 0.75)])],
    }
    return polygons[shape]


@functools.cache
def _unit_geometry(shape: str) -> tuple[float, float]:
    """``(area, reach)`` of ``shape`` at unit size; the area is measured by drawing it once."""
    from PIL import Image, ImageDraw

    scale = 100
    mask = Image.new("L", (2 * scale + 1, 2 * scale + 1))
    draw = ImageDraw.Draw(mask)
    for fill, points in _parts(shape):
        draw.polygon([(scale * (1 + x), scale * (1 + y)) for x, y in points], fill=fill)
    reach = max(math.hypot(x, y) for fill, pts in _parts(shape) if fill for x, y in pts)
    return mask.histogram()[255] / scale**2, reach


def _colour(rng, value: float) -> tuple[int, int, int]:
    """Any hue, any saturation, the given brightness: the one colour law of every class."""
    rgb = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.1, 1.0), value)
    return tuple(int(255 * c) for c in rgb)


def synthetic_image(label: int, n_classes: int, rng: np.random.Generator) -> bytes:
    """One JPEG of class ``label``: the class is the outline of one big shape, nothing else.

    Every class draws its image size, background, clutter, shape colour, shape area, position,
    rotation, squash, blur and noise from the same laws, and shapes are scaled to a common area
    (so each covers the same share of pixels): colour histograms carry no class signal, only the
    silhouette does. ``n_classes`` is kept for the signature; shapes repeat past ten classes.
    """
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    side = rng.integers(200, 501)
    aspect = rng.uniform(0.7, 1.4)
    w, h = int(side * math.sqrt(aspect)), int(side / math.sqrt(aspect))
    s = min(w, h)
    # Background: a smooth random gradient of any colour, mottled at 1/8 scale (a pixel or two at
    # training resolution), built small and resized once: full-size noise would cost more than
    # the rest of the image.
    bg_value = rng.uniform(0.15, 0.95)
    base = np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0, 0.6), bg_value))
    coarse = np.clip(base + rng.normal(0, 0.1, (4, 4, 3)), 0, 1)
    small = (max(2, w // 8), max(2, h // 8))
    gradient = Image.fromarray((coarse * 255).astype("uint8")).resize(small, Image.BILINEAR)
    mottled = np.asarray(gradient, dtype=np.int16) + rng.integers(-10, 11, (small[1], small[0], 1))
    img = Image.fromarray(np.clip(mottled, 0, 255).astype("uint8")).resize((w, h), Image.BILINEAR)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(0, 4)):  # clutter: straight strokes, never a class shape
        ends = (rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0, h))
        width = max(1, int(rng.uniform(0.01, 0.03) * s))
        draw.line(ends, fill=_colour(rng, rng.uniform(0.1, 1.0)), width=width)
    # The shape: a common area law, then rotation, squash and position; brightness set apart
    # from the background's so the outline is always visible.
    shape = SHAPES[label % len(SHAPES)]
    unit_area, reach = _unit_geometry(shape)
    r = s * math.sqrt(rng.uniform(*SHAPE_AREA) / unit_area)
    margin = max(0.0, 0.47 * s - r * reach)
    cx, cy = w / 2 + rng.uniform(-margin, margin), h / 2 + rng.uniform(-margin, margin)
    angle, squash = rng.uniform(0, 2 * math.pi), rng.uniform(0.8, 1.0)
    cos, sin = math.cos(angle) * r, math.sin(angle) * r
    mask = Image.new("L", (w, h))
    mask_draw = ImageDraw.Draw(mask)
    for fill, points in _parts(shape):
        xy = [(cx + cos * x - sin * y * squash, cy + sin * x + cos * y * squash) for x, y in points]
        mask_draw.polygon(xy, fill=fill)
    if rng.uniform() < 0.5:  # out of focus: blurring the mask alone costs a third of the image
        mask = mask.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 2.0)))
    gap = rng.uniform(0.3, 0.6)
    fg_value = bg_value + gap if bg_value < 0.5 else bg_value - gap
    img.paste(_colour(rng, min(1.0, max(0.05, fg_value))), mask=mask)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=int(rng.integers(75, 96)))
    return buf.getvalue()


def synthetic_keys(n_breeds: int, per_breed: int) -> list[tuple[str, int]]:
    if not 1 <= n_breeds <= len(STANFORD_CLASSES):
        raise ParameterError(f"n_breeds={n_breeds}; allowed: 1 to {len(STANFORD_CLASSES)}")
    if per_breed < 2:
        raise ParameterError(f"images_per_breed={per_breed}; allowed: 2 or more")
    out = []
    for label, folder in enumerate(STANFORD_CLASSES[:n_breeds]):
        wnid = folder.split("-")[0]
        out += [(f"Images/{folder}/{wnid}_{10000 + i}.jpg", label) for i in range(per_breed)]
    return out
