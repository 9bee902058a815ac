"""The colour baselines and the shuffled-pixel control, on images generated in memory."""

import colorsys
import io

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import baseline, data
from helpers.config import Rank, TrainConfig
from helpers.loading import loaders, transforms
from helpers.loading.synthetic import synthetic_image
from helpers.loading.transforms import shuffle_pixels

N_CLASSES, PER_CLASS, SIZE = 10, 20, 64


def _split(images, labels):
    """A fixed 80/20 split of stacked images and labels."""
    x, y = torch.stack(images), torch.tensor(labels)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(y))
    return x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]


@pytest.fixture(scope="module")
def shapes():
    """The synthetic dogs at training size, decoded as the evaluation transform does."""
    tf = transforms.eval_transform(SIZE)
    images, labels = [], []
    for label in range(N_CLASSES):
        for i in range(PER_CLASS):
            blob = synthetic_image(label, N_CLASSES, np.random.default_rng([0, label, i]))
            images.append(tf(Image.open(io.BytesIO(blob)).convert("RGB")))
            labels.append(label)
    return _split(images, labels)


def _hue_coded(label: int, rng) -> torch.Tensor:
    """An image in the old generator's style: a noisy background and a blob of the class's hue."""
    bg = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0, 0.3), rng.uniform(0.3, 0.9))
    img = np.clip(np.array(bg) + rng.normal(0, 0.05, (SIZE, SIZE, 3)), 0, 1)
    hue = (label / N_CLASSES + rng.normal(0, 0.015)) % 1.0
    r = int(rng.integers(10, 20))
    cx, cy = rng.integers(r, SIZE - r, 2)
    img[cy - r : cy + r, cx - r : cx + r] = colorsys.hsv_to_rgb(
        hue, rng.uniform(0.8, 1), rng.uniform(0.8, 1)
    )
    return torch.from_numpy((img * 255).astype(np.uint8)).permute(2, 0, 1)


def test_colour_baseline_guesses_near_chance_on_the_synthetic_dogs(shapes):
    result = baseline.colour_baseline(*shapes)
    chance = baseline.chance(shapes[3], N_CLASSES)
    assert chance["uniform"] == 0.1
    assert result["best"] == max(v for k, v in result.items() if k != "best")
    assert result["best"] <= 2 * chance["uniform"], result


def test_colour_baseline_finds_classes_told_apart_by_hue():
    rng = np.random.default_rng(0)
    labels = [c for c in range(N_CLASSES) for _ in range(40)]
    result = baseline.colour_baseline(*_split([_hue_coded(c, rng) for c in labels], labels))
    assert result["joint_histogram_logreg"] >= 0.7, result  # 86% when written
    assert result["histogram_logreg"] >= 0.4, result  # 65%
    assert result["joint_histogram_centroid"] >= 0.25, result  # 42%: the weakest of the three
    assert result["best"] == result["joint_histogram_logreg"]


def test_shuffled_pixels_keep_the_colours_so_the_baseline_does_not_move(shapes):
    train_x, train_y, val_x, val_y = shapes
    g = torch.Generator().manual_seed(0)
    shuffled = (
        shuffle_pixels(train_x, g),
        train_y,
        shuffle_pixels(val_x, g),
        val_y,
    )
    assert baseline.colour_baseline(*shuffled) == baseline.colour_baseline(*shapes)


def test_shuffle_pixels_keeps_each_histogram_and_destroys_the_layout():
    x = torch.arange(2 * 3 * 8 * 8).reshape(2, 3, 8, 8).to(torch.uint8)  # a gradient per image
    out = shuffle_pixels(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    for before, after in zip(x, out, strict=True):
        pixels = before.flatten(1).T.tolist()  # (r, g, b) tuples: the joint histogram, exactly
        assert sorted(after.flatten(1).T.tolist()) == sorted(pixels)
        assert not torch.equal(before, after)
    assert not torch.equal(out[0] - x[0], out[1] - x[1])  # a permutation per image
    single = shuffle_pixels(x[0], torch.Generator().manual_seed(1))
    assert single.shape == (3, 8, 8)
    again = shuffle_pixels(x[0], torch.Generator().manual_seed(1))
    assert torch.equal(single, again)


def test_histograms_take_pil_images_of_any_size():
    a = torch.randint(0, 256, (3, 10, 12), dtype=torch.uint8)
    b = torch.randint(0, 256, (3, 7, 5), dtype=torch.uint8)
    pil = [Image.fromarray(t.permute(1, 2, 0).numpy()) for t in (a, b)]
    hist = baseline.channel_histograms(pil)
    assert hist.shape == (2, 96)
    assert torch.allclose(hist.view(2, 3, 32).sum(2), torch.ones(2, 3, dtype=hist.dtype))
    assert torch.equal(hist[:1], baseline.channel_histograms(a[None]))
    assert baseline.joint_histograms(pil).sum(1).tolist() == pytest.approx([1, 1])


def test_chance_reports_uniform_and_majority_share():
    assert baseline.chance([0, 0, 1, 2]) == {"uniform": 1 / 3, "majority": 0.5}
    assert baseline.chance([0, 0, 1], n_classes=4) == {"uniform": 0.25, "majority": 2 / 3}


def test_the_control_run_shuffles_the_pixels_it_validates_on(dogs):
    url, options, manifest = dogs  # conftest's: on the embedded S3 server
    split, cpu = data.split(manifest), torch.device("cpu")
    firsts = []
    for control in (False, True):
        cfg = TrainConfig(
            url, image_size=32, loader_workers=0, data_format="objects", shuffle_pixels=control
        )
        _, val = loaders.make_loaders(cfg, options, manifest, split, Rank.alone(), cpu)
        firsts.append(next(iter(val))[0][0])
    plain, shuffled = firsts
    assert sorted(shuffled.flatten(1).T.tolist()) == sorted(plain.flatten(1).T.tolist())
    assert not torch.equal(shuffled, plain)
