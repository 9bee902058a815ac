"""The shards every test of this folder reads: the session dataset's, three images a shard."""

import pytest

from helpers import prepare


@pytest.fixture(scope="module")
def sharded(dogs):
    url, options, manifest = dogs
    index = prepare.write_shards(url, options, val_fraction=0.2, seed=0, shard_size=3)
    return url, options, manifest, index
