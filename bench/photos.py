"""Photo-like JPEGs for benchmarks: the size and decode cost of real photographs, seeded.

Flat synthetic shapes (``helpers.loading.synthetic``) compress to a few KB and decode in
a fraction of a real photo's time, which flatters every loader that decodes. These images have
a natural image's spectrum instead: colour noise whose amplitude falls as 1/f^1.65 (real scenes
sit near 1/f), a class-tinted soft "subject", and camera-like JPEG settings, at 500x375 px
(the Stanford Dogs median). :func:`calibrate` compares their bytes per pixel and decode time
with a real photograph that matplotlib ships (``grace_hopper.jpg``, 512x600)::

    python -m bench.photos            # print the calibration

They are written in the Stanford Dogs layout (``Images/<wnid>-<breed>/<wnid>_<n>.jpg`` plus
``manifest.json``), so ``helpers.prepare``'s shard writer and every loader read them as they
read the real dataset.
"""

from __future__ import annotations

import io
import logging
import statistics
import time

from helpers import data, prepare
from helpers.loading.synthetic import synthetic_keys
from helpers.s3 import storage

log = logging.getLogger(__name__)

WIDTH, HEIGHT = 500, 375
SLOPE = 1.65  # spectral slope of the amplitude: sets bytes per pixel (0.20 for the real photo)
QUALITY = 90  # the JPEG quality of a typical camera or photo site export
CONTRAST = 45.0  # standard deviation of the pixel values around the mean colour


def photo(label: int, n_classes: int, rng, size: tuple[int, int] = (WIDTH, HEIGHT)) -> bytes:
    """One photo-like JPEG of class ``label`` (``rng``: a numpy Generator, for the seed)."""
    import numpy as np
    from PIL import Image

    w, h = size
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :]
    f = np.hypot(fx, fy)
    f[0, 0] = 1.0
    amp = f**-SLOPE
    chans = []
    for _ in range(3):  # random phases and amplitudes under the 1/f^SLOPE envelope
        phase = np.exp(2j * np.pi * rng.random(amp.shape))
        chans.append(np.fft.irfft2(amp * rng.standard_normal(amp.shape) * phase, s=(h, w)))
    x = np.stack(chans, -1) @ (0.4 * np.eye(3) + 0.6 * rng.random((3, 3))).T  # correlated RGB
    x = (x - x.mean((0, 1))) / x.std() * CONTRAST + rng.uniform(70, 180, 3)
    # A soft, class-tinted subject: something a classifier could learn, as in a real photo.
    yy, xx = np.mgrid[0:h, 0:w]
    cx, cy, r = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h, rng.uniform(0.2, 0.35) * h
    mask = np.exp(-(((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r)))[..., None]
    hue = 2 * np.pi * label / max(1, n_classes)
    tint = 60 * np.array([np.cos(hue), np.cos(hue - 2.1), np.cos(hue + 2.1)])
    img = Image.fromarray(np.clip(x + mask * tint, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=QUALITY)
    return buf.getvalue()


def write_photos(
    url: str,
    options: dict | None = None,
    n_breeds: int = 10,
    per_breed: int = 60,
    seed: int = 0,
    processes: int = 1,
) -> data.Manifest:
    """Photo-like JPEGs under ``url`` in the Stanford Dogs layout, and their manifest.

    Deterministic for a seed, whatever ``processes`` makes them (a forked pool; about 37 KB and
    50 ms of generation per image, so thousands take minutes on one core).
    """
    import multiprocessing as mp

    keys = synthetic_keys(n_breeds, per_breed)
    prepare._ensure_bucket(url, options)
    fs = storage.filesystem(url, options)
    root = storage.split_url(url)[1]
    jobs = [(key, label, n_breeds, seed) for key, label in keys]
    pool = mp.get_context("fork").Pool(processes) if processes > 1 else None
    try:
        for start in range(0, len(jobs), prepare.UPLOAD_CHUNK):
            chunk = jobs[start : start + prepare.UPLOAD_CHUNK]
            made = pool.imap(_photo, chunk, chunksize=8) if pool else map(_photo, chunk)
            fs.pipe({f"{root}/{key}": blob for key, blob in made})  # concurrent PUTs
    finally:
        if pool is not None:
            pool.close()
    manifest = data.make_manifest(url, [k for k, _ in keys], {})
    data.write_manifest(manifest, options)
    log.info("wrote %d photo-like images of %d breeds to %s", len(keys), n_breeds, url)
    return manifest


def _photo(job: tuple) -> tuple[str, bytes]:
    """``(key, JPEG)`` of one ``(key, label, n_classes, seed)``: seeded by (seed, label, number)."""
    import numpy as np

    key, label, n_classes, seed = job
    rng = np.random.default_rng([seed, label, int(key.rsplit("_", 1)[1][:-4])])
    return key, photo(label, n_classes, rng)


def reference_photo() -> bytes:
    """The real photograph the calibration compares with (matplotlib's grace_hopper.jpg)."""
    from matplotlib import cbook

    with open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False), "rb") as f:
        return f.read()


def decode_ms(blob: bytes, repeats: int = 15) -> float:
    """Median milliseconds to decode ``blob`` to RGB (full size, no draft)."""
    from helpers.loading.transforms import decode_image

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        decode_image(blob, "calibration")
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def calibrate(samples: int = 8, seed: int = 0) -> dict:
    """Bytes per pixel and decode ms (per image and per megapixel) of ``samples`` photo-like
    JPEGs against the real photo, decoded alternately so machine load hits both alike."""
    import numpy as np
    from PIL import Image

    real = reference_photo()
    rw, rh = Image.open(io.BytesIO(real)).size
    ours = [photo(i, samples, np.random.default_rng([seed, i])) for i in range(samples)]
    real_ms, our_ms = [], []
    for blob in ours:
        real_ms.append(decode_ms(real, 5))
        our_ms.append(decode_ms(blob, 5))
    px = WIDTH * HEIGHT
    out = {
        "real": {"size": [rw, rh], "bytes": len(real), "bytes_per_pixel": len(real) / (rw * rh)},
        "photo_like": {
            "size": [WIDTH, HEIGHT],
            "bytes": statistics.mean(map(len, ours)),
            "bytes_per_pixel": statistics.mean(map(len, ours)) / px,
        },
    }
    out["real"]["decode_ms"], out["photo_like"]["decode_ms"] = (
        statistics.median(real_ms),
        statistics.median(our_ms),
    )
    out["real"]["decode_ms_per_mpx"] = out["real"]["decode_ms"] / (rw * rh) * 1e6
    out["photo_like"]["decode_ms_per_mpx"] = out["photo_like"]["decode_ms"] / px * 1e6
    return out


def describe(cal: dict) -> str:
    """One line per image kind: KB, bytes per pixel, decode ms and ms per megapixel."""
    lines = []
    for name, c in cal.items():
        lines.append(
            f"{name:<11} {c['size'][0]}x{c['size'][1]}  {c['bytes'] / 1000:5.1f} KB  "
            f"{c['bytes_per_pixel']:.3f} B/px  decode {c['decode_ms']:5.2f} ms "
            f"({c['decode_ms_per_mpx']:5.2f} ms/Mpx)"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe(calibrate()))
