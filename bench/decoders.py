"""JPEG decoders on equal terms: today's against TorchCodec, the same photos, one process.

torchvision 0.29 deprecates its image decoders in favour of TorchCodec's. Whether the project
follows depends on where the decoding runs, so both places are measured:

- **CPU**, a loader process's work (one thread, as each loader process has). Decoding alone:
  ``pil`` is today's (``transforms.decode_image`` with draft at the training size), ``pil-full``
  the same without draft, ``torchvision`` and ``torchcodec`` their CPU decoders (full size:
  neither can draft). And the whole per-image work of a loader process, decoding then
  augmenting: ``pil+augment`` (today's: ``decode_image`` with draft, ``train_transform``)
  against ``torchcodec+augment`` (TorchCodec, then ``transforms.train_tensors``: adopting it on
  the CPU means the tensor path there, since the PIL transforms take PIL images), and
  ``torchcodec-as-pil+augment`` (TorchCodec's tensor made a PIL image for today's transforms).
- **CUDA**, when there is one: what :class:`helpers.loading.gpudecode.ToDevice` does with a
  batch of JPEG bytes, ``batch`` images a call, then the augmentation on the device,
  synchronised: ``nvjpeg/torchvision`` (today's) against ``nvjpeg/torchcodec``.

The decoders take turns within each round, so load from elsewhere hits all alike. Ratios are
speeds against today's (today's ms per image / the other's), median over the rounds, with the
range of the per-round ratios. The target, per device: TorchCodec at least as fast as today's
(ratio >= 1.0) for the work the loader or the rank really does (decode + augment): met, it is
the one to adopt there; missed, today's stays, and the record says by how much::

    python -m bench.decoders              # CPU at 64 and 224 px, and CUDA where there is a GPU
    python -m bench.decoders --rounds 3   # quicker, noisier
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from typing import Any

log = logging.getLogger("bench.decoders")

# The training sizes measured on the CPU: the demo's default, and the usual GPU one, where PIL's
# draft cannot shrink a 500x375 photo (both sides must stay >= the size). CUDA: the largest.
SIZES = (64, 224)
# (device, what is compared, today's, TorchCodec's): the adoption targets
TARGETS = (
    ("cpu", "decode + augment, one loader process", "pil+augment", "torchcodec+augment"),
    (
        "cuda",
        "nvJPEG decode + augment, one batch a call",
        "nvjpeg/torchvision",
        "nvjpeg/torchcodec",
    ),
)


def photos(n: int, seed: int = 0) -> list[bytes]:
    """``n`` photo-like 500x375 JPEGs (:mod:`bench.photos`: a real photo's bytes and decode
    cost per pixel)."""
    import numpy as np

    from bench import photos as ph

    return [ph.photo(i % 10, 10, np.random.default_rng([seed, i])) for i in range(n)]


def cpu_contenders(blobs: list[bytes], size: int) -> dict[str, Any]:
    """Name -> a callable that does its work on every image of ``blobs``."""
    import torch
    from PIL import Image

    from helpers.loading import gpudecode, transforms

    tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    augment = transforms.train_transform(size)
    g = torch.Generator().manual_seed(0)

    def one_at_a_time(library: str):
        """The binding the GPU path calls (``gpudecode.batch_decoder``), its CPU decoder."""
        decode = gpudecode.batch_decoder(library)
        return lambda t: decode([t], "cpu")[0]

    tv, codec = one_at_a_time("torchvision"), one_at_a_time("torchcodec")
    return {
        "pil": lambda: [transforms.decode_image(b, "k", size) for b in blobs],
        "pil-full": lambda: [transforms.decode_image(b, "k") for b in blobs],
        "torchvision": lambda: [tv(t) for t in tensors],
        "torchcodec": lambda: [codec(t) for t in tensors],
        "pil+augment": lambda: [augment(transforms.decode_image(b, "k", size)) for b in blobs],
        "torchcodec-as-pil+augment": lambda: [
            augment(Image.fromarray(codec(t).permute(1, 2, 0).numpy())) for t in tensors
        ],
        "torchcodec+augment": lambda: [
            transforms.train_tensors([codec(t)], size, g) for t in tensors
        ],
    }


def cuda_contenders(blobs: list[bytes], size: int, batch: int) -> dict[str, Any]:
    """Name -> a callable that decodes and augments ``blobs`` on the GPU, ``batch`` a call."""
    import torch

    from helpers.loading import gpudecode, transforms

    cuda = torch.device("cuda")
    tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    parts = [tensors[i : i + batch] for i in range(0, len(tensors), batch)]
    g = torch.Generator().manual_seed(0)

    def work(decode):
        def run():
            for part in parts:
                transforms.train_tensors(decode(part, cuda), size, g)
            torch.cuda.synchronize()

        return run

    return {
        f"nvjpeg/{lib}": work(gpudecode.batch_decoder(lib)) for lib in ("torchvision", "torchcodec")
    }


def timed_rounds(contenders: dict[str, Any], n: int, rounds: int) -> dict[str, list[float]]:
    """ms per image of each contender in each round; one untimed warm-up call each first."""
    for fn in contenders.values():
        fn()
    out: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            out[name].append(round((time.perf_counter() - start) / n * 1000, 4))
    return out


def summarise(times: dict[str, list[float]]) -> dict[str, dict]:
    """Median, min and max ms per image of each contender."""
    return {
        k: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v)}
        for k, v in times.items()
    }


def speed_ratio(times: dict[str, list[float]], today: str, other: str) -> dict | None:
    """``other``'s speed over ``today``'s: median ms ratio, and the per-round range."""
    if today not in times or other not in times:
        return None
    per_round = [a / b for a, b in zip(times[today], times[other], strict=True)]
    median = statistics.median(times[today]) / statistics.median(times[other])
    return {
        "median": round(median, 3),
        "per_round_min": round(min(per_round), 3),
        "per_round_max": round(max(per_round), 3),
    }


def run(
    images: int = 64, sizes: tuple[int, ...] = SIZES, rounds: int = 7, batch: int = 64
) -> dict[str, Any]:
    """The CPU comparison at each training size of ``sizes``, and the CUDA one at the largest
    where there is a GPU: ``{"times": {"cpu 64 px": {contender: [ms per image]}}, ...}``."""
    import torch

    torch.set_num_threads(1)  # as in each loader process
    blobs = photos(images)
    times = {}
    for size in sizes:
        times[f"cpu {size} px"] = timed_rounds(cpu_contenders(blobs, size), images, rounds)
    if torch.cuda.is_available():
        contenders = cuda_contenders(blobs, max(sizes), batch)
        times[f"cuda {max(sizes)} px"] = timed_rounds(contenders, images, rounds)
    ratios = {
        where: {f"{b} / {a}": speed_ratio(t, a, b) for a, b in _pairs(where)}
        for where, t in times.items()
    }
    settings = {"images": images, "image_sizes": list(sizes), "rounds": rounds,
                "cuda_batch": batch, "cuda": torch.cuda.is_available()}  # fmt: skip
    return {"settings": settings, "times": times, "ratios": ratios}


def _pairs(where: str) -> list[tuple[str, str]]:
    """(today's, other) pairs worth a ratio ``where`` (``"cpu 64 px"``, ``"cuda 224 px"``)."""
    if where.startswith("cpu"):
        return [("pil", "torchcodec"), ("pil-full", "torchcodec"), ("torchvision", "torchcodec"),
                ("pil+augment", "torchcodec+augment"),
                ("pil+augment", "torchcodec-as-pil+augment")]  # fmt: skip
    return [("nvjpeg/torchvision", "nvjpeg/torchcodec")]


def to_record(result: dict[str, Any]) -> dict[str, Any]:
    """The benchmark record (``bench/record.py``): every round, every ratio, the targets."""
    from bench import record

    s, targets = result["settings"], []
    for device, what, today, other in TARGETS:
        sizes = s["image_sizes"] if device == "cpu" else [max(s["image_sizes"])]
        for size in sizes:
            r = result["ratios"].get(f"{device} {size} px", {}).get(f"{other} / {today}")
            targets.append(
                record.target(
                    f"TorchCodec / today's decoder, speed ({device}, {size} px: {what})",
                    r and r["median"],
                    ">=",
                    1.0,
                    None if r else f"no {device.upper()} device: not measured",
                )
            )
    passes = [
        {"where": where, "contender": name, "round": i, "ms_per_image": ms}
        for where, t in result["times"].items()
        for name, ms_list in t.items()
        for i, ms in enumerate(ms_list)
    ]
    results = {
        "summary": {where: summarise(t) for where, t in result["times"].items()},
        "ratios": result["ratios"],
    }
    notes = ["today's CPU decoder is PIL with draft at the training size; TorchCodec has no "
             "draft, so its CPU decode always works at full size; on these 500x375 photos the "
             "draft decodes at 1/4 scale for 64 px and cannot shrink them for 224 px (both "
             "sides must stay >= the size)", "TorchCodec turns a photo by its EXIF orientation "
             "(PIL and torchvision, as used here, do not); these photos carry none"]  # fmt: skip
    return record.build(
        "decoders", result["settings"], passes, targets, results, notes, ("torchcodec",)
    )


def report(result: dict[str, Any]) -> str:
    """Each contender's median ms per image (range over rounds) and the ratios."""
    s = result["settings"]
    lines = [f"{s['images']} photo-like 500x375 JPEGs, {s['rounds']} rounds, CUDA batch "
             f"{s['cuda_batch']}"]  # fmt: skip
    for where, t in result["times"].items():
        for name, v in summarise(t).items():
            lines.append(f"{where:<12} {name:<20} {v['median_ms']:7.3f} ms/img "
                         f"({v['min_ms']:.3f}-{v['max_ms']:.3f})")  # fmt: skip
        for name, r in result["ratios"][where].items():
            lines.append(f"{where:<12} speed {name}: {r['median']:.3f} (rounds "
                         f"{r['per_round_min']}-{r['per_round_max']})")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--image-sizes", type=int, nargs="+", default=list(SIZES))
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--batch", type=int, default=64, help="JPEGs per nvJPEG call (CUDA)")
    p.add_argument("--records", default=None, help="records folder (default bench/results)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    result = run(args.images, tuple(args.image_sizes), args.rounds, args.batch)
    print(report(result))
    from bench import record

    print(f"record: {record.write(to_record(result), args.records or record.RESULTS)}")


if __name__ == "__main__":
    main()
