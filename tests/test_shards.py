"""Tar shards on the real embedded S3 server: the format, the index, and the stream's promises
(every image once per epoch, equal batches on every rank, resumable, robust to damage)."""

from __future__ import annotations

import io
import logging
import re
import tarfile
from collections import Counter
from types import SimpleNamespace

import pytest

from helpers import data, prepare, shards, shardwrite, storage, stream

SIZE = 32  # image side: small, the tests are about which samples come out, not pixels


@pytest.fixture(scope="module")
def sharded(dogs):
    url, options, manifest = dogs
    index = shardwrite.write_shards(url, options, val_fraction=0.2, seed=0, shard_size=3)
    return url, options, manifest, index


def _stream(url, options, manifest, **kw):
    kw = {"batch_size": 4, "image_size": SIZE, "manifest": manifest, "with_keys": True} | kw
    return stream.ShardStream(url, options=options, **kw)


def _members(fs, path) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(fs.cat_file(path))) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]


def _copy_shards(url, options, index, to, edit=None):
    """The shards of ``index`` copied to ``<url>/<to>``; ``edit`` maps a name to new bytes (or
    None: left out)."""
    fs = storage.filesystem(url, options)
    src, dst = (storage.split_url(shards.location(url))[1], f"{storage.split_url(url)[1]}/{to}")
    import json

    for s in index["splits"].values():
        for e in s["shards"]:
            blob = (edit or {}).get(e["name"], fs.cat_file(f"{src}/{e['name']}"))
            if blob is not None:
                fs.pipe_file(f"{dst}/{e['name']}", blob)
    fs.pipe_file(f"{dst}/index.json", json.dumps(index).encode())
    return storage.join(url, to)


def _epoch(ds, num_workers=0, epoch=0):
    """Every batch of one epoch as a list of (key, is_padding)."""
    ds.set_epoch(epoch)
    loader = stream.make_shard_loader(ds, num_workers)
    return [list(zip(b[2], b[3].tolist(), strict=True)) for b in loader]


def test_index_lists_every_shard_with_sizes_counts_and_manifest_hash(sharded):
    url, options, manifest, _ = sharded
    index = shards.read_index(url, options)
    split = data.split(manifest, 0.2, 0)
    fs = storage.filesystem(url, options)
    root = storage.split_url(shards.location(url))[1]
    assert index["manifest_sha256"] == shards.manifest_hash(manifest)
    assert (index["val_fraction"], index["seed"], index["classes"]) == (
        0.2,
        0,
        list(manifest.classes),
    )
    listed = {p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)} - {"index.json"}
    named = set()
    for name, keys in (("train", split.train), ("val", split.val)):
        entries = index["splits"][name]["shards"]
        assert index["splits"][name]["split"] == name
        assert [e["name"] for e in entries] == [f"{name}-{i:06d}.tar" for i in range(len(entries))]
        found = []
        for e in entries:
            assert fs.size(f"{root}/{e['name']}") == e["bytes"]
            jpgs = [n for n, _ in _members(fs, f"{root}/{e['name']}") if n.endswith(".jpg")]
            assert len(jpgs) == e["images"]
            found += jpgs
        assert sorted(found) == sorted(keys)  # every image of the split, once
        assert index["splits"][name]["images"] == len(keys)
        named |= {e["name"] for e in entries}
    assert listed == named


def test_members_are_key_jpg_then_key_cls_with_original_keys(sharded):
    url, options, manifest, index = sharded
    fs = storage.filesystem(url, options)
    root = storage.split_url(url)[1]
    packed = []
    for e in index["splits"]["train"]["shards"]:
        members = _members(fs, f"{root}/shards/{e['name']}")
        for (img, blob), (cls, label) in zip(members[::2], members[1::2], strict=True):
            assert img.endswith(".jpg") and cls == img[: -len(".jpg")] + ".cls"
            assert img in manifest.keys
            assert label == str(manifest.label(img)).encode()
            assert blob == fs.cat_file(f"{root}/{img}")  # the stored bytes, untouched
        packed += [n for n, _ in members[::2]]
    assert packed != sorted(packed)  # shuffled across classes, not packed breed by breed


def test_names_with_two_dots_are_refused():
    assert shards.sample_key("Images/n1-a/n1_2.jpg") == ("Images/n1-a/n1_2", "jpg")
    with pytest.raises(ValueError, match="'Images/n1-a/n1_2.v2.jpg'.*exactly one dot"):
        shards.sample_key("Images/n1-a/n1_2.v2.jpg")


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_the_tar_reader_reads_what_tarfile_reads_and_names_damage(fmt):
    long = "Images/" + "n02085620-" + "x" * 90 + "/n02085620_7.jpg"  # over ustar's 100 bytes
    names = ["Images/n02085620-Chihuahua/n02085620_1.jpg", long, "Images/b/\u00e9t\u00e9_2.jpg"]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        folder = tarfile.TarInfo("Images/b")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name)
            info.size = 700 + i
            tar.addfile(info, io.BytesIO(bytes([i]) * info.size))
    blob = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    assert list(shards.tar_members(blob)) == expected and len(expected) == 3
    # Damage: a header's checksum, and data cut short, raise what the stream counts and names.
    first = blob.index(b"n02085620_1.jpg") // 512 * 512
    bad = blob[:first] + b"X" + blob[first + 1 :]
    with pytest.raises(shards.DAMAGED, match="bad checksum"):
        list(shards.tar_members(bad))
    with pytest.raises(shards.DAMAGED, match="unexpected end of data"):
        list(shards.tar_members(blob[: first + 600]))


def test_reader_refuses_shards_of_another_manifest(sharded):
    url, options, manifest, index = sharded
    changed = data.make_manifest(url, manifest.keys[1:], {})
    with pytest.raises(shards.ShardIndexError) as err:
        _stream(url, options, changed)
    message = str(err.value)
    assert index["manifest_sha256"] in message and shards.manifest_hash(changed) in message
    assert f"python -m helpers.prepare shards {url}" in message
    with pytest.raises(shards.ShardIndexError, match="val_fraction=0.2, not val_fraction=0.5"):
        _stream(url, options, manifest, val_fraction=0.5)


def test_missing_index_names_the_command(sharded):
    url, options, manifest, _ = sharded
    assert shards.has_shards(url, options)
    assert stream.resolve_format("auto", url, options) == "shards"
    nowhere = "s3://dogs/tiny/no-shards"
    assert not shards.has_shards(url, options, shards_url=nowhere)
    with pytest.raises(shards.ShardIndexError, match=f"python -m helpers.prepare shards {url}$"):
        _stream(url, options, manifest, shards_url=nowhere)


def _uneven(url, options, monkeypatch):
    """Shards of 1, 9, 2, 7 and 13 train images (and the val split in 3 and 5)."""
    sizes = {32: [1, 9, 2, 7, 13], 8: [3, 5]}

    def plan(keys, seed, shard_size):
        keys, out = sorted(keys), []
        for n in sizes[len(keys)]:
            out, keys = out + [keys[:n]], keys[n:]
        return out

    monkeypatch.setattr(shardwrite, "plan_shards", plan)
    where = storage.join(url, "uneven")
    index = shardwrite.write_shards(url, options, shard_size=3, shards_url=where)
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

    from helpers.streamplan import shuffled

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
    rest = [list(zip(b[2], b[3].tolist(), strict=True)) for b in stream.make_shard_loader(fresh)]
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
    with caplog.at_level(logging.WARNING, logger="helpers.stream"):
        epoch = _epoch(ds)
    assert ds.stats["corrupt"] == 2
    for key in (bad_jpg, bad_cls[: -len(".cls")]):
        assert re.search(f"{key}.* {name}|{name}.*{key}", caplog.text), caplog.text
    real = [k for b in epoch for k, pad in b if not pad]
    assert len(real) == 30 and len(set(real)) == 30 and bad_jpg not in real
    assert sum(map(len, epoch)) == len(ds) == 32  # two repeats make up for them


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_missing_or_truncated_shard_is_named_and_the_epoch_completes(sharded, caplog, damage):
    url, options, manifest, index = sharded
    fs = storage.filesystem(url, options)
    name = index["splits"]["train"]["shards"][4]["name"]
    blob = fs.cat_file(f"{storage.split_url(shards.location(url))[1]}/{name}")
    edit = {name: None if damage == "missing" else blob[: len(blob) // 2]}
    where = _copy_shards(url, options, index, damage, edit)
    counts, real = [], Counter()
    with caplog.at_level(logging.WARNING, logger="helpers.stream"):
        for rank in range(2):
            ds = _stream(url, options, manifest, shards_url=where, rank=rank, world_size=2)
            epoch = _epoch(ds)
            counts.append(len(epoch))
            real.update(k for b in epoch for k, pad in b if not pad)
    assert counts == [4, 4]
    assert f"shard {storage.join(where, name)} is" in caplog.text
    assert "python -m helpers.prepare shards" in caplog.text
    assert set(real.values()) == {1} and 29 <= len(real) < 32  # the rest of the split, once


def test_from_the_official_archive_shards_only(s3, dogs, tmp_path):
    url, options, manifest = dogs
    fs = storage.filesystem(url, options)
    keys = [k for k in manifest.keys if k.endswith(("_10000.jpg", "_10001.jpg", "_10002.jpg"))]
    with tarfile.open(tmp_path / "images.tar.gz", "w:gz") as tar:
        for key in keys:
            blob = fs.cat_file(f"{storage.split_url(url)[1]}/{key}")
            info = tarfile.TarInfo(key)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    target = "s3://dogs/from-archive"
    prepare.main(
        ["--endpoint", "embedded", "--s3-dir", str(s3.data_dir), "shards", target]
        + ["--archive", str(tmp_path / "images.tar.gz"), "--shard-size", "4"]
    )
    index = shards.read_index(target, options)
    assert data.load_manifest(target, options).keys == tuple(sorted(keys))
    assert [s["images"] for s in index["splits"].values()] == [8, 4]
    assert not fs.exists(f"dogs/from-archive/{keys[0]}")  # shards only: no per-object copy
    ds = _stream(target, options, None, split="val")
    assert sorted(k for b in _epoch(ds) for k, pad in b if not pad) == sorted(
        data.split(data.load_manifest(target, options)).val
    )


def test_an_epoch_gets_each_shard_once_and_no_image(sharded, s3):
    """Counted at the server side: one GET per shard in one process; with two processes and
    padding (32 images in batches of 5), at most one more per process (a straddled shard),
    never a second read of a process's shards for its padding."""
    from helpers import s3proxy

    url, options, manifest, index = sharded
    n_shards = len(index["splits"]["train"]["shards"])
    for workers, batch in ((1, 4), (2, 5)):
        with s3proxy.S3Proxy(s3.endpoint_url) as proxy:
            opts = {**options, "endpoint_url": proxy.url}
            ds = _stream(url, opts, manifest, with_keys=False, batch_size=batch)
            got = sum(len(b[1]) for b in stream.make_shard_loader(ds, workers))
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
