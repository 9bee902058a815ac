"""The network: a torchvision ResNet from scratch (``weights=None``) that normalises its own input.

Normalising inside the model lets the loaders ship uint8 (a quarter of the bytes of float32) and
keeps the statistics with the checkpoint.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from helpers.config import ARCHS, allowed

if TYPE_CHECKING:  # names for annotations only: importing costs nothing at run time
    import torch

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, applied on the device


def build_model(arch: str, num_classes: int) -> torch.nn.Module:
    """torchvision's ``arch`` with random weights, taking uint8 images (N, 3, H, W)."""
    import torch
    import torchvision

    allowed("arch", arch, ARCHS)

    class Normalized(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1) * 255)
            self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1) * 255)
            self.net = net

        def forward(self, x):
            return self.net((x.float() - self.mean) / self.std)

    # zero_init_residual: each block starts as the identity, which keeps from-scratch training
    # stable with small per-rank batches (Goyal et al., "ImageNet in 1 hour").
    net = getattr(torchvision.models, arch)(
        weights=None, num_classes=num_classes, zero_init_residual=True
    )
    return Normalized(net)
