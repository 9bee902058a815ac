"""What the loop receives: batches moved to the device or replaced by a placeholder that weighs
nothing, and a position in an epoch that a resume restores exactly."""

import torch

from helpers.loading.batches import Batches, ResumableSampler
from helpers.loading.gpudecode import ToDevice


def test_a_resumed_sampler_yields_each_remaining_index_once():
    data = list(range(40))
    whole = ResumableSampler(data, num_replicas=2, rank=1, seed=3, drop_last=True)
    whole.set_epoch(2)
    resumed = ResumableSampler(data, num_replicas=2, rank=1, seed=3, drop_last=True)
    resumed.set_epoch(2)
    resumed.skip = 8  # two batches of 4 were committed before the interruption
    assert list(whole)[:8] + list(resumed) == list(whole)  # no repeat, no gap
    resumed.set_epoch(3)
    assert resumed.skip == 0


def test_batches_resume_by_their_sampler_and_stand_in_for_an_unreadable_batch():
    sampler = ResumableSampler(list(range(40)), num_replicas=2, rank=0, seed=3, drop_last=True)
    loader = torch.utils.data.DataLoader(list(range(40)), batch_size=4, sampler=sampler)
    batches = Batches(
        loader,
        ToDevice(8, train=True),
        source="objects",
        image_size=8,
        batch_size=4,
        seed=3,
        sampler=sampler,
    )
    batches.start_epoch(2)
    assert batches.position(3) == {"batches": 3}
    straight = [b.tolist() for b in batches]
    batches.start_epoch(2)
    batches.seek(3, batches.position(3))
    assert [b.tolist() for b in batches] == straight[3:]  # the rest of the epoch, exactly
    images, labels, real = batches.to_device(None, torch.device("cpu"))  # all of it unreadable
    assert not real and images.shape == (2, 3, 8, 8) and images.dtype == torch.uint8
    padded = (
        torch.zeros(2, 3, 8, 8, dtype=torch.uint8),
        torch.tensor([1, 0]),
        ["k", ""],
        torch.tensor([False, True]),
    )
    images, labels, real = batches.to_device(padded, torch.device("cpu"))
    assert real and labels.tolist() == [1]  # the stream's padding is left out
