"""GPU decode, checked on CPU: the tensor path is the same code on CPU tensors.

Tolerance: the two paths decode with different decoders (PIL's libjpeg-turbo in the loader; here
torchvision's CPU decoder, on a GPU nvJPEG, whose IDCT and chroma upsampling differ by a level or
two) and resize with two implementations of the same antialiased bilinear filter (PIL's, on uint8
with its own rounding; torch's, in float rounded once). On the same crop, a mean absolute
difference under 3 levels of 255 (about 1%) is the same picture; a wrong crop, a flip out of turn
or a swapped axis gives tens of levels.
"""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import ddp, prepare
from helpers.config import CROP_SCALE, GPU_DECODERS, TrainConfig
from helpers.errors import BadImageError
from helpers.loading import dataloader, gpudecode, transforms
from helpers.loading.batches import without_padding

TOLERANCE = 3.0  # mean absolute difference, levels of 255


def _photo(w=500, h=375, seed=0, mode="RGB", fmt="JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1)
    img = Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    img.convert(mode).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _decoded(blob: bytes) -> torch.Tensor:
    from torchvision.io import decode_jpeg

    return decode_jpeg(torch.frombuffer(bytearray(blob), dtype=torch.uint8))


@pytest.mark.parametrize("crop_scale", [CROP_SCALE, 0.08])
@pytest.mark.parametrize("height, width", [(375, 500), (500, 333), (20, 900), (224, 224)])
def test_crop_sampler_is_torchvisions_draw_for_draw(height, width, crop_scale):
    from torchvision.transforms import RandomResizedCrop

    for seed in range(25):
        torch.manual_seed(seed)
        expected = RandomResizedCrop.get_params(
            torch.zeros(3, height, width), [crop_scale, 1.0], list(transforms.RATIO)
        )
        got = transforms.crop_box(height, width, torch.Generator().manual_seed(seed), crop_scale)
        assert got == expected


@pytest.mark.parametrize("size, crop_scale", [(64, CROP_SCALE), (224, 0.08)])
def test_tensor_path_matches_the_pil_path(size, crop_scale):
    blob = _photo()
    pil, x = transforms.decode_image(blob, "photo"), _decoded(blob)  # full size: no draft
    flips = set()
    for seed in range(6):
        torch.manual_seed(seed)
        cpu = transforms.train_transform(size, crop_scale)(pil)
        gpu = transforms.train_tensors([x], size, torch.Generator().manual_seed(seed), crop_scale)
        gpu = gpu[0]
        assert gpu.shape == cpu.shape == (3, size, size) and gpu.dtype == torch.uint8
        assert (cpu.float() - gpu.float()).abs().mean() < TOLERANCE, seed
        flips.add(bool((cpu.float() - cpu.flip(-1).float()).abs().mean() > 10))
    cpu, gpu = transforms.eval_transform(size)(pil), transforms.eval_tensors([x], size)[0]
    assert (cpu.float() - gpu.float()).abs().mean() < TOLERANCE
    # a crop from the wrong place would fail the tolerance: check that the test can fail
    torch.manual_seed(0)
    other = transforms.train_tensors([x], size, torch.Generator().manual_seed(1))[0]
    assert (transforms.train_transform(size)(pil).float() - other.float()).abs().mean() > 10


def test_jpeg_header_routes_what_nvjpeg_cannot_take_to_the_cpu():
    assert gpudecode.for_nvjpeg(_photo())
    assert gpudecode.for_nvjpeg(_photo(mode="L"))
    assert not gpudecode.for_nvjpeg(_photo(mode="CMYK"))
    assert not gpudecode.for_nvjpeg(_photo(fmt="PNG"))
    assert not gpudecode.for_nvjpeg(b"not an image at all")


@pytest.mark.parametrize("library", GPU_DECODERS)
def test_bytes_batches_decode_with_fallbacks_counted_and_labels_aligned(library):
    good, cmyk, png = _photo(seed=1), _photo(mode="CMYK"), _photo(fmt="PNG")
    broken = good[:200] + bytes(len(good) - 200)  # a JPEG header, then zeros: no decoder reads it
    with pytest.raises(BadImageError, match="key7"):
        gpudecode.keep_jpeg(b"garbage", "key7")
    samples = [(gpudecode.keep_jpeg(b, f"k{i}"), i) for i, b in enumerate([good, cmyk, png])]
    samples.insert(1, (broken, 9))
    images, labels = dataloader.collate(samples)
    assert len(images) == 4 and images.nvjpeg.tolist() == [True, True, False, False]
    mover = gpudecode.ToDevice(32, train=False, gpu_decoder=library)
    x, y = mover(images, labels, torch.device("cpu"))
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.uint8
    assert y.tolist() == [0, 1, 2]  # the broken one left out, its label with it
    # CMYK and PNG go by their headers; nvJPEG was given the broken one, and so was PIL
    assert mover.stats == {
        "fallback_header": 2,
        "fallback_rejected": 1,
        "unreadable": 1,
        "images": 4,
    }
    expected = transforms.eval_transform(32)(transforms.decode_image(png, "png"))
    assert (x[2].float() - expected.float()).abs().mean() < TOLERANCE


def test_padding_mask_selects_from_a_bytes_batch():
    blobs = [_photo(seed=s) for s in range(3)]
    batch = (
        gpudecode.JpegBatch.of(blobs),
        torch.tensor([0, 1, 2]),
        ["a", "b", ""],
        torch.tensor([False, False, True]),
    )
    images, labels = without_padding(batch)
    assert len(images) == 2 and labels.tolist() == [0, 1]
    assert [b.numpy().tobytes() for b in images.blobs()] == blobs[:2]


@pytest.mark.parametrize("library", GPU_DECODERS)
def test_both_libraries_decode_a_jpeg_as_pil_does(library):
    blob = _photo(seed=3)
    x = gpudecode.batch_decoder(library)(
        [torch.frombuffer(bytearray(blob), dtype=torch.uint8)], "cpu"
    )
    pil = torch.from_numpy(np.asarray(transforms.decode_image(blob, "k"))).permute(2, 0, 1)
    assert x[0].shape == pil.shape and (pil.float() - x[0].float()).abs().mean() < TOLERANCE


def test_gpu_decoder_is_checked_by_name_and_a_missing_library_is_named(monkeypatch):
    with pytest.raises(ValueError, match="gpu_decoder='nvjpeg'; allowed: 'torchvision'"):
        TrainConfig(data_url="x", gpu_decoder="nvjpeg")
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)  # as if not installed
    with pytest.raises(ValueError, match="gpu_decoder='torchcodec' needs TorchCodec"):
        gpudecode.batch_decoder("torchcodec")


def test_decode_parameter_is_checked_by_name():
    with pytest.raises(ValueError, match="decode="):
        TrainConfig(data_url="x", decode="nvjpeg")
    assert gpudecode.resolve_decode("auto", torch.device("cpu")) == "cpu"
    with pytest.raises(ValueError, match="decode='gpu' needs a CUDA device"):
        gpudecode.resolve_decode("gpu", torch.device("cpu"))


# On a GPU (pytest -m gpu; bash bench/gpu_route.sh run): the same checks on the device.


@pytest.mark.gpu
@pytest.mark.parametrize("library", GPU_DECODERS)
def test_nvjpeg_decodes_a_batch_as_pil_does_and_counts_fallbacks_by_cause(library):
    cuda, decode = torch.device("cuda"), gpudecode.batch_decoder(library)
    good = [_photo(seed=s) for s in range(4)]
    blobs = [*good, _photo(mode="CMYK"), good[0][:200] + bytes(len(good[0]) - 200)]
    stats: dict = {}
    out = gpudecode.decode_jpegs(gpudecode.JpegBatch.of(blobs), cuda, 3, stats, decode)
    assert all(x.device.type == "cuda" for x in out[:5]) and out[5] is None
    for blob, x in zip(good, out[:4], strict=True):
        pil = torch.from_numpy(np.asarray(transforms.decode_image(blob, "k"))).permute(2, 0, 1)
        assert (pil.float() - x.cpu().float()).abs().mean() < TOLERANCE
    assert stats == {"fallback_header": 1, "fallback_rejected": 1, "unreadable": 1, "images": 6}


@pytest.mark.gpu
@pytest.mark.parametrize("train", [True, False])
def test_the_device_augments_as_the_loader_processes_do(train):
    blobs = [_photo(seed=s) for s in range(4)]
    labels = torch.arange(4)
    mover = gpudecode.ToDevice(64, train=train, crop_scale=0.3)
    mover.generator.manual_seed(7)
    x, y = mover(gpudecode.JpegBatch.of(blobs), labels, torch.device("cuda"))
    assert x.device.type == "cuda" and y.tolist() == [0, 1, 2, 3]
    g = torch.Generator().manual_seed(7)
    decoded = [_decoded(b) for b in blobs]
    expected = (
        transforms.train_tensors(decoded, 64, g, 0.3)
        if train
        else transforms.eval_tensors(decoded, 64)
    )
    assert (x.cpu().float() - expected.float()).abs().mean() < TOLERANCE


@pytest.mark.gpu
def test_one_rank_trains_from_shards_decoding_on_the_gpu(dogs, tmp_path):
    from helpers import train
    from helpers.cluster import make_client

    url, options, manifest = dogs
    prepare.ensure_shards(url, options, val_fraction=0.2, seed=0)
    cfg = TrainConfig(
        data_url=url,
        image_size=64,
        batch_size=8,
        epochs=1,
        max_steps=3,
        loader_workers=1,
        data_format="shards",
        decode="gpu",
    )
    with make_client("cuda", n_workers=1) as client:
        (history,) = ddp.run(client, train.train_rank, cfg, options)
    (epoch,) = [r for r in history if r["kind"] == "epoch"]
    assert epoch["device"].startswith("cuda") and np.isfinite(epoch["train_loss"])
    assert epoch["decode"]["images"] >= 3 * 8 and not epoch["decode"].get("unreadable")
