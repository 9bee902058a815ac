"""What colour alone can tell: baselines a trained CNN must beat, and the shuffled-pixel control.

A dataset whose classes differ in colour can be "learned" without looking at shapes. Three
colour classifiers say how far colour goes on a split (``best`` is the strongest):

- per-channel 32-bin histograms + multinomial logistic regression (full-batch L-BFGS, standardised
  features, an L2 penalty picked on a held-out fifth of the training set);
- a joint 8x8x8 colour histogram + the same logistic regression: the strongest on hue-coded
  classes (88% on the old hue-per-breed generator at 100 images a class, where the first got 41%);
- a joint 8x8x8 colour histogram + nearest class centroid (Hellinger distance), the classic.

Shuffled pixels (:func:`helpers.loading.transforms.shuffle_pixels`) keep each image's colours and
destroy its layout: a CNN trained and evaluated on them can only use colour, so it should land
where these baselines do.
Images are uint8 tensors ``(N, 3, H, W)`` or a list of PIL images / ``(3, H, W)`` tensors of any
size. Only torch and numpy, no scikit-learn.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from helpers import data

if TYPE_CHECKING:  # names for annotations only: importing costs nothing at run time
    import torch
    from distributed import Client

    from helpers.data import Manifest, Split

log = logging.getLogger(__name__)

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)  # penalties tried; the held-out fifth picks one


def _chw(image):
    """One image as a uint8 ``(3, H, W)`` tensor (from a PIL image or a tensor)."""
    import numpy as np
    import torch

    if isinstance(image, torch.Tensor):
        return image
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


def _counts(images, codes, n_bins: int):
    """Normalised bin counts per image; ``codes`` maps a uint8 ``(N, 3, P)`` tensor to bin ids."""
    import torch

    if isinstance(images, torch.Tensor) and images.dim() == 4:
        groups = [images]
    else:
        groups = [_chw(im)[None] for im in images]
    out = []
    for x in groups:
        pixels = x.flatten(2).long()  # (N, 3, P)
        flat = codes(pixels).reshape(len(x), -1)  # bin ids in [0, n_bins)
        offset = torch.arange(len(x))[:, None] * n_bins
        hist = torch.bincount((flat + offset).flatten(), minlength=len(x) * n_bins)
        out.append(hist.view(len(x), n_bins).double() / pixels.shape[2])
    return torch.cat(out)


def channel_histograms(images: Sequence, bins: int = 32) -> torch.Tensor:
    """``(N, 3 * bins)``: each channel's histogram, concatenated; each channel sums to 1."""
    shift = (256 // bins).bit_length() - 1
    offsets = [[0], [bins], [2 * bins]]  # channel c's bins follow channel c - 1's
    return _counts(images, lambda x: (x >> shift) + x.new_tensor(offsets), 3 * bins)


def joint_histograms(images: Sequence, bins: int = 8) -> torch.Tensor:
    """``(N, bins**3)``: the joint RGB histogram, each row summing to 1."""
    shift = (256 // bins).bit_length() - 1
    return _counts(
        images,
        lambda x: ((x[:, 0] >> shift) * bins + (x[:, 1] >> shift)) * bins + (x[:, 2] >> shift),
        bins**3,
    )


def _fit_logistic(x, y, n_classes: int, l2: float, max_iter: int = 200):
    """Weights of a multinomial logistic regression on ``x`` (already standardised)."""
    import torch

    w = torch.zeros(x.shape[1] + 1, n_classes, dtype=x.dtype, requires_grad=True)
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    opt = torch.optim.LBFGS(
        [w],
        lr=1,
        max_iter=max_iter,
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
    )

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xb @ w, y) + l2 * (w[:-1] ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), xb


def logistic_accuracy(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    n_classes: int,
    seed: int = 0,
) -> float:
    """Val accuracy of logistic regression on features ``*_x``; L2 from :data:`L2_GRID`."""
    import torch

    train_y, val_y = torch.as_tensor(train_y), torch.as_tensor(val_y)
    used = train_x.amax(0) > 0  # bins no training image fills carry nothing
    train_x, val_x = train_x[:, used].float(), val_x[:, used].float()
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    tx, vx = (train_x - mean) / std, (val_x - mean) / std

    def accuracy(fx, fy, ex, ey, l2):
        w, _ = _fit_logistic(fx, fy, n_classes, l2)
        logits = torch.cat([ex, torch.ones(len(ex), 1, dtype=ex.dtype)], 1) @ w
        return (logits.argmax(1) == ey).double().mean().item()

    perm = torch.randperm(len(tx), generator=torch.Generator().manual_seed(seed))
    hold, fit = perm[: len(tx) // 5], perm[len(tx) // 5 :]
    scores = {l2: accuracy(tx[fit], train_y[fit], tx[hold], train_y[hold], l2) for l2 in L2_GRID}
    best = max(scores, key=scores.get)
    log.debug("logistic regression held-out accuracy per L2: %s; using %g", scores, best)
    return accuracy(tx, train_y, vx, val_y, best)


def centroid_accuracy(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    n_classes: int,
) -> float:
    """Val accuracy of nearest class centroid on histograms (Hellinger: sqrt, then Euclid)."""
    import torch

    train_y, val_y = torch.as_tensor(train_y), torch.as_tensor(val_y)
    tx, vx = train_x.sqrt(), val_x.sqrt()
    centroids = torch.stack(
        [tx[train_y == c].mean(0) if (train_y == c).any() else tx.mean(0) for c in range(n_classes)]
    )
    return (torch.cdist(vx, centroids).argmin(1) == val_y).double().mean().item()


def colour_baseline(
    train_images: Sequence,
    train_labels: Sequence[int],
    val_images: Sequence,
    val_labels: Sequence[int],
) -> dict:
    """The colour classifiers trained on train and scored on val: accuracies and ``best``."""
    train, val = histograms(train_images, train_labels), histograms(val_images, val_labels)
    return fit(train, val)


def histograms(images: Sequence, labels: Sequence[int]) -> dict:
    """Both kinds of colour histogram of ``images``, with their labels: what :func:`fit` takes."""
    import torch

    labels = torch.as_tensor(list(labels) if not hasattr(labels, "shape") else labels)
    return {"channel": channel_histograms(images), "joint": joint_histograms(images), "y": labels}


def fit(train: dict, val: dict) -> dict:
    """Accuracy on ``val`` of each colour classifier fitted on ``train`` (:func:`histograms`)."""
    n = int(max(train["y"].max(), val["y"].max())) + 1
    ty, vy = train["y"], val["y"]
    out = {
        "histogram_logreg": logistic_accuracy(train["channel"], ty, val["channel"], vy, n),
        "joint_histogram_logreg": logistic_accuracy(train["joint"], ty, val["joint"], vy, n),
        "joint_histogram_centroid": centroid_accuracy(train["joint"], ty, val["joint"], vy, n),
    }
    out["best"] = max(out.values())
    return out


def split_histograms(
    manifest: Manifest, keys: Sequence[str], options: dict | None, image_size: int
) -> dict:
    """:func:`histograms` of ``keys`` decoded as validation sees them: a Dask task that returns
    a few hundred numbers an image, never the images."""
    ds = data.dataset(manifest, keys, options, image_size, train=False)
    samples = ds.samples(list(range(len(keys))))
    return histograms([x for _, x, _ in samples], [y for _, _, y in samples])


def on_cluster(
    client: Client,
    manifest: Manifest,
    split: Split,
    options: dict | None,
    image_size: int,
    chunk: int = 200,
) -> dict:
    """:func:`fit` on the split's train and val images, the decoding spread over the workers."""
    import torch

    parts = {}
    for name, keys in (("train", split.train), ("val", split.val)):
        chunks = [keys[i : i + chunk] for i in range(0, len(keys), chunk)]
        done = client.gather(
            [
                client.submit(split_histograms, manifest, c, options, image_size, pure=False)
                for c in chunks
            ]
        )
        parts[name] = {k: torch.cat([d[k] for d in done]) for k in ("channel", "joint", "y")}
    return fit(parts["train"], parts["val"])


def chance(labels: Sequence[int], n_classes: int | None = None) -> dict:
    """Chance levels of ``labels``: ``uniform`` (1 / classes) and ``majority`` (largest share)."""
    from collections import Counter

    labels = [int(y) for y in labels]
    counts = Counter(labels)
    n_classes = n_classes or max(labels) + 1
    return {"uniform": 1 / n_classes, "majority": max(counts.values()) / len(labels)}
