"""The network: from scratch, normalising its own uint8 input."""

import torch

from helpers.loop.model import build_model


def test_model_is_from_scratch_and_normalises_uint8():
    a, b = build_model("resnet18", 7), build_model("resnet18", 7)
    assert not torch.equal(a.net.conv1.weight, b.net.conv1.weight)  # random init, no weights
    out = a.eval()(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    assert out.shape == (2, 7)
