"""The readers of untrusted bytes under a bounded fuzz (:mod:`bench.fuzz_readers`): mutated
shards, indexes, manifests and images, and stream epochs over a mutated shard on the embedded
S3 server, each read or refused with a named error within its time.

30 s by default; longer (``FUZZ_SECONDS=600``) or another seed (``FUZZ_SEED=7``) by setting them.
"""

from __future__ import annotations

import os

from bench import fuzz_readers

SECONDS = float(os.environ.get("FUZZ_SECONDS", "30"))
SEED = int(os.environ.get("FUZZ_SEED", "0"))


def test_every_mutated_input_is_read_or_refused_by_name_in_time(sharded):
    url, options, _, index = sharded
    served = fuzz_readers.Served(url, options, index)
    summary = fuzz_readers.fuzz(SECONDS, SEED, served).summary()
    counts = {k: summary[k] for k in ("cases", *fuzz_readers.OUTCOMES)}
    print(f"fuzz, {SECONDS:.0f} s, seed {SEED}: {counts}; by reader: {summary['by_reader']}")
    assert (summary["hangs"], summary["other"], summary["silent"]) == (0, 0, 0), summary["unsound"]
    readers = summary["by_reader"]
    assert set(readers) == {
        "read_shard",
        "read_index+check_index",
        "load_manifest",
        "decode_image",
        "keep_jpeg",
        "ShardStream epoch",
    }
    for name, got in readers.items():  # each reader both read some cases and refused some
        assert got.get("yielded", 0) > 0 and got.get("named", 0) > 0, (name, got)
