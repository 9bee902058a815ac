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


def test_request_cost_prices_each_format_and_scales_to_the_full_dataset():
    import pandas as pd

    formats = pd.DataFrame({"images": [100, 100], "GET requests": [100, 5]},
                           index=["objects", "shards"])  # fmt: skip
    cost = measure.request_cost(formats, usd_per_1000=0.0004, full_images=20_580, epochs=90)
    assert cost.loc["objects", "USD per epoch"] == pytest.approx(100 * 0.0004 / 1000)
    assert cost.loc["objects", "GETs per epoch, 20,580 images"] == 20_580
    assert cost.loc["objects", "USD for 90 epochs"] == pytest.approx(20_580 * 90 * 0.0004 / 1000)
    assert cost.loc["shards", "USD for 90 epochs"] == pytest.approx(1_029 * 90 * 0.0004 / 1000)
