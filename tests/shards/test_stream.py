"""The shard stream's promises: every image once per epoch, equal batches on every rank, resumable,
robust to damage, one GET per shard."""

from __future__ import annotations

import io
import json
import logging
import re
import tarfile
from collections import Counter
from types import SimpleNamespace

import pytest

from helpers import data
from helpers.loading import dataloader, transforms
from helpers.s3 import storage
from helpers.shards import format as shards
from helpers.shards import stream, write

SIZE = 32  # image side: small, the tests are about which samples come out, not pixels


def _stream(
    url,
    options,
    manifest,
    split="train",
    *,
    rank=0,
    world_size=1,
    batch_size=4,
    seed=0,
    train=None,
    shards_url=None,
    with_keys=True,
    **reading,
):
    """A stream as the loaders build one: the index read and checked, CPU decoding at SIZE."""
    index = shards.read_index(url, options, shards_url)
    shards.check_index(index, manifest)
    training = split == "train" if train is None else train
    tf = transforms.train_transform(SIZE) if training else transforms.eval_transform(SIZE)
    share = stream.Share(rank, world_size, batch_size, seed)
    how = stream.Reading(transforms.decode_image, tf, image_size=SIZE, **reading)
    return stream.ShardStream(
        index,
        url,
        split,
        options,
        share,
        how,
        train=train,
        with_keys=with_keys,
        shards_url=shards_url,
    )


def _copy_shards(url, options, index, to, edit=None):
    """The shards of ``index`` copied to ``<url>/<to>``; ``edit`` maps a name to new bytes (or
    None: left out)."""
    fs = storage.filesystem(url, options)
    src, dst = (storage.split_url(shards.location(url))[1], f"{storage.split_url(url)[1]}/{to}")
    for s in index["splits"].values():
        for e in s["shards"]:
            blob = (edit or {}).get(e["name"], fs.cat_file(f"{src}/{e['name']}"))
            if blob is not None:
                fs.pipe_file(f"{dst}/{e['name']}", blob)
    fs.pipe_file(f"{dst}/index.json", json.dumps(index).encode())
    return storage.join(url, to)


def _members(fs, path) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(fs.cat_file(path))) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]


def _epoch(ds, num_workers=0, epoch=0):
    """Every batch of one epoch as a list of (key, is_padding)."""
    ds.set_epoch(epoch)
    loader = dataloader.stream_loader(ds, num_workers)
    return [list(zip(b[2], b[3].tolist(), strict=True)) for b in loader]


def _uneven(url, options, monkeypatch):
    """Shards of 1, 9, 2, 7 and 13 train images (and the val split in 3 and 5)."""
    sizes = {32: [1, 9, 2, 7, 13], 8: [3, 5]}

    def plan(keys, seed, shard_size):
        keys, out = sorted(keys), []
        for n in sizes[len(keys)]:
            out, keys = out + [keys[:n]], keys[n:]
        return out

    monkeypatch.setattr(write, "plan_shards", plan)
    where = storage.join(url, "uneven")
    manifest = data.load_manifest(url, options)
    index = write.write_shards(
        manifest,
        data.split(manifest),
        write.from_objects(url, options),
        options,
        val_fraction=0.2,
        seed=0,
        shard_size=3,
        shards_url=where,
    )
    assert [e["images"] for e in index["splits"]["train"]["shards"]] == sizes[32]
    return where


@pytest.mark.parametrize("split", ["train", "val"])
def test_every_image_once_per_epoch_and_equal_batches_on_uneven_shards(sharded, monkeypatch, split):
    url, options, manifest, _ = sharded
    where = _uneven(url, options, monkeypatch)
    keys = set(getattr(data.split(manifest, 0.2, 0), split))
    seen, batches = Counter(), []
    for rank in range(2):
        ds = _stream(
            url,
            options,
            manifest,
            split=split,
            rank=rank,
            world_size=2,
            batch_size=5,
            shards_url=where,
        )
        assert ds.counts == ([1, 9, 2, 7, 13] if split == "train" else [3, 5])
        epoch = _epoch(ds, num_workers=2)
        batches.append(len(epoch))
        assert len(epoch) == len(ds) // 5 and all(len(b) == 5 for b in epoch)
        mine = {k for b in epoch for k, pad in b if not pad}
        seen.update(k for b in epoch for k, pad in b if not pad)
        # padding repeats the rank's own samples (training) or is blank (validation)
        assert {k for b in epoch for k, pad in b if pad} <= (mine if split == "train" else {""})
    assert batches[0] == batches[1]
    assert set(seen) == keys and set(seen.values()) == {1}  # every image once, across ranks


def test_a_process_without_samples_of_its_own_pads_from_its_rank(sharded, monkeypatch):
    url, options, manifest, _ = sharded
    # 8 val images over 3 ranks in batches of 1: 3 per rank, but rank 2 has 2 images for its 3
    # loader processes. Loader processes are simulated in this process.
    ds = _stream(
        url, options, manifest, split="val", train=True, rank=2, world_size=3, batch_size=1
    )
    got = []
    for w in range(3):
        monkeypatch.setattr(
            stream, "get_worker_info", lambda w=w: SimpleNamespace(id=w, num_workers=3)
        )
        got.append([(key, pad) for _, _, key, pad in ds])
    assert [len(g) for g in got] == [1, 1, 1]
    assert [pad for g in got for _, pad in g] == [False, False, True]
    assert got[2][0][0] in {got[0][0][0], got[1][0][0]}


def test_epochs_differ_and_an_epoch_repeats(sharded):
    url, options, manifest, _ = sharded
    ranks = [_stream(url, options, manifest, rank=r, world_size=2) for r in range(2)]
    orders = {}
    for epoch in (0, 1):
        for ds in ranks:
            ds.set_epoch(epoch)
        assert ranks[0].shard_order() == ranks[1].shard_order()  # the same on every rank
        orders[epoch] = ranks[0].shard_order()
    assert orders[0] != orders[1]
    ds = ranks[0]
    first, again, second = _epoch(ds, epoch=0), _epoch(ds, epoch=0), _epoch(ds, epoch=1)
    assert first == again
    assert first != second
    assert ds.stats["samples"] == 16 and ds.stats["padding"] == 0


def test_the_shuffle_buffer_starts_early_mixes_widely_and_loses_nothing():
    import random
    import statistics

    from helpers.shards.plan import shuffled

    pulled = []

    def source():
        for i in range(2000):
            pulled.append(i)
            yield i

    out = shuffled(source(), 256, random.Random(0))
    first = next(out)
    assert len(pulled) <= 256 // 8  # the first sample waits for 32, not a full buffer of 256
    rest = [first, *out]
    assert sorted(rest) == list(range(2000))  # every item once
    assert rest == list(shuffled(range(2000), 256, random.Random(0)))  # seeded: repeatable
    moved = statistics.median(abs(pos - item) for pos, item in enumerate(rest))
    assert moved > 100  # the buffer grew to 256 (140 here); one stuck at 32 moves items ~20


def test_resume_mid_epoch_yields_exactly_the_rest(sharded):
    url, options, manifest, _ = sharded
    # 32 images in batches of 3: 11 batches, 6 from loader process 0 and 5 from process 1.
    ds = _stream(url, options, manifest, batch_size=3)
    full = _epoch(ds, num_workers=2, epoch=4)
    assert len(full) == 11
    state = ds.state_dict(batches=7)
    fresh = _stream(url, options, manifest, batch_size=3)
    fresh.load_state_dict(state)
    fresh.set_epoch(4)  # the same epoch keeps the restored position
    rest = [list(zip(b[2], b[3].tolist(), strict=True)) for b in dataloader.stream_loader(fresh)]
    assert rest == full[7:]
    fresh.set_epoch(5)  # another epoch starts from its beginning
    assert len(_epoch(fresh, num_workers=2, epoch=5)) == 11


def _rewrite(blob: bytes, edit) -> bytes:
    members = []
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, payload in members:
            payload = edit(name, payload)
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return out.getvalue()


def test_corrupt_members_are_skipped_counted_and_named(sharded, caplog):
    url, options, manifest, index = sharded
    fs = storage.filesystem(url, options)
    name = index["splits"]["train"]["shards"][1]["name"]
    blob = fs.cat_file(f"{storage.split_url(shards.location(url))[1]}/{name}")
    jpgs = [n for n, _ in _members(fs, f"{storage.split_url(shards.location(url))[1]}/{name}")][::2]
    bad_jpg, bad_cls = jpgs[0], jpgs[1][: -len(".jpg")] + ".cls"

    def damage(member, payload):
        return b"not a jpeg" if member == bad_jpg else b"x1" if member == bad_cls else payload

    where = _copy_shards(url, options, index, "corrupt", {name: _rewrite(blob, damage)})
    ds = _stream(url, options, manifest, shards_url=where)
    with caplog.at_level(logging.WARNING, logger="helpers.shards"):
        epoch = _epoch(ds)
    assert ds.stats["corrupt"] == 2
    for key in (bad_jpg, bad_cls[: -len(".cls")]):
        assert re.search(f"{key}.* {name}|{name}.*{key}", caplog.text), caplog.text
    real = [k for b in epoch for k, pad in b if not pad]
    assert len(real) == 30 and len(set(real)) == 30 and bad_jpg not in real
    assert sum(map(len, epoch)) == len(ds) == 32  # two repeats make up for them


def _negative_size(blob: bytes) -> bytes:
    """``blob`` with its second header's size -512 (checksum fixed): a reader that trusts it
    reads that header again and again."""
    at = next(pos for pos, _ in _headers(blob))
    at = next(pos for pos, _ in _headers(blob) if pos > at)
    header = bytearray(blob[at : at + 512])
    header[124:136], header[148:156] = b"-0000001000\0", b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return blob[:at] + bytes(header) + blob[at + 512 :]


def _headers(blob: bytes):
    """``(offset, TarInfo)`` of the members tarfile finds."""
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        return [(m.offset, m) for m in tar]


@pytest.mark.parametrize("damage", ["missing", "truncated", "negative size"])
def test_a_missing_or_truncated_shard_is_named_and_the_epoch_completes(sharded, caplog, damage):
    url, options, manifest, index = sharded
    fs = storage.filesystem(url, options)
    name = index["splits"]["train"]["shards"][4]["name"]
    blob = fs.cat_file(f"{storage.split_url(shards.location(url))[1]}/{name}")
    edit = {
        "missing": {name: None},
        "truncated": {name: blob[: len(blob) // 2]},
        "negative size": {name: _negative_size(blob)},
    }[damage]
    where = _copy_shards(url, options, index, damage.replace(" ", "-"), edit)
    counts, real = [], Counter()
    with caplog.at_level(logging.WARNING, logger="helpers.shards"):
        for rank in range(2):
            ds = _stream(url, options, manifest, shards_url=where, rank=rank, world_size=2)
            epoch = _epoch(ds)
            counts.append(len(epoch))
            real.update(k for b in epoch for k, pad in b if not pad)
    assert counts == [4, 4]
    assert f"shard {storage.join(where, name)} is" in caplog.text
    assert "python -m helpers.prepare shards" in caplog.text
    assert set(real.values()) == {1} and 29 <= len(real) < 32  # the rest of the split, once


def test_a_shard_holding_other_counts_than_its_index_is_named(sharded, caplog):
    # The index says shard 1 holds one more sample than it does and shard 3 one fewer: both
    # are named, and every rank still yields the same number of batches.
    url, options, manifest, index = sharded
    edited = json.loads(json.dumps(index))
    entries = edited["splits"]["train"]["shards"]
    entries[1]["images"] += 1
    entries[3]["images"] -= 1
    where = _copy_shards(url, options, edited, "miscounted")
    counts = []
    with caplog.at_level(logging.WARNING, logger="helpers.shards"):
        for rank in range(2):
            ds = _stream(url, options, manifest, shards_url=where, rank=rank, world_size=2)
            counts.append(len(_epoch(ds)))
    assert counts == [4, 4]
    for e, held in ((entries[1], 3), (entries[3], "more than 2")):
        said = f"shard {storage.join(where, e['name'])} holds {held} samples"
        assert said in caplog.text and f"its index entry says {e['images']}" in caplog.text


@pytest.mark.parametrize("presign", [True, False])
def test_a_refused_shard_is_reported_as_refused_not_as_missing(sharded, caplog, presign):
    from helpers.errors import StorageError

    url, options, manifest, _ = sharded
    index = shards.read_index(url, options)
    refused = {**options, "secret": "not-the-secret"}  # the server answers 403
    how = stream.Reading(transforms.decode_image, transforms.eval_transform(SIZE), presign=presign)
    ds = stream.ShardStream(index, url, "val", refused, stream.Share(batch_size=4), how)
    with caplog.at_level(logging.WARNING), pytest.raises(StorageError) as err:
        next(iter(ds))
    message = str(err.value)
    assert message.startswith(f"access to {url}/shards/val-000000.tar at ") and "refused" in message
    assert "credentials" in message
    assert "missing" not in message + caplog.text and "Rebuild" not in message + caplog.text


def test_an_epoch_gets_each_shard_once_and_no_image(sharded, s3):
    """Counted at the server side: one GET per shard in one process; with two processes and
    padding (32 images in batches of 5), at most one more per process (a straddled shard),
    never a second read of a process's shards for its padding."""
    from helpers.s3 import proxy as s3proxy

    url, options, manifest, index = sharded
    n_shards = len(index["splits"]["train"]["shards"])
    for workers, batch in ((1, 4), (2, 5)):
        with s3proxy.S3Proxy(s3.endpoint_url) as proxy:
            opts = {**options, "endpoint_url": proxy.url}
            ds = _stream(url, opts, manifest, with_keys=False, batch_size=batch)
            got = sum(len(b[1]) for b in dataloader.stream_loader(ds, workers))
            gets = Counter(path for method, path in proxy.log if method == "GET")
        assert got == len(ds) and (workers == 1 or len(ds) > 32)  # the second one pads
        tars = {p: n for p, n in gets.items() if p.endswith(".tar")}
        assert len(tars) == n_shards and set(gets) - set(tars) == {f"/{index_path(url)}"}
        assert sum(tars.values()) <= n_shards + (workers - 1), tars


def index_path(url: str) -> str:
    return storage.split_url(storage.join(shards.location(url), shards.INDEX))[1]


def test_a_failed_presigned_get_falls_back_to_the_s3_client(sharded):
    import time

    url, options, manifest, _ = sharded
    ds = _stream(url, options, manifest)
    assert set(ds._signed["urls"]) == set(ds.names)  # signed in this process
    ds.presign = False  # keep these (refused) URLs: every shard must come through s3fs instead
    ds._signed = {"at": time.time(), "urls": {n: "http://127.0.0.1:9/refused" for n in ds.names}}
    real = [k for b in _epoch(ds, num_workers=1) for k, pad in b if not pad]
    assert sorted(real) == sorted(data.split(manifest, 0.2, 0).train)
