"""Measuring the data path inside a Dask worker, where training reads it."""

import pytest

from helpers import data, measure
from helpers.cluster import make_client
from helpers.config import TrainConfig


@pytest.mark.slow
def test_loader_with_worker_processes_inside_a_dask_worker(dogs):
    url, options, manifest = dogs
    cfg = TrainConfig(url, image_size=32, batch_size=8, loader_workers=2, data_format="objects")
    with make_client("local", n_workers=1) as client:
        result = client.submit(measure.loader_throughput, cfg, options, pure=False).result(120)
    assert result["images"] == len(data.split(manifest).train) // 8 * 8  # whole batches
