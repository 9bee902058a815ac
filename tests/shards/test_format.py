"""The shard format on the real embedded S3 server: members, the index, a tar reader that names
damage, and shards refused when they are of another manifest."""

from __future__ import annotations

import io
import json
import re
import signal
import tarfile
from contextlib import contextmanager

import pytest

from helpers import data
from helpers.errors import ShardError, ShardIndexError
from helpers.s3 import storage
from helpers.shards import format as shards


def _members(fs, path) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(fs.cat_file(path))) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]


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
    with pytest.raises(ShardError, match="'Images/n1-a/n1_2.v2.jpg'.*exactly one dot"):
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
    with pytest.raises(ShardIndexError) as err:
        shards.check_index(shards.read_index(url, options), changed)
    message = str(err.value)
    assert index["manifest_sha256"] in message and shards.manifest_hash(changed) in message
    assert f"python -m helpers.prepare shards {url}" in message
    with pytest.raises(ShardIndexError, match="val_fraction=0.2, not val_fraction=0.5"):
        shards.check_index(index, manifest, val_fraction=0.5)


def test_missing_index_names_the_command(sharded):
    url, options, manifest, _ = sharded
    assert shards.has_shards(url, options)
    assert shards.resolve_format("auto", url, options) == "shards"
    nowhere = "s3://dogs/tiny/no-shards"
    assert not shards.has_shards(url, options, shards_url=nowhere)
    with pytest.raises(ShardIndexError, match=f"python -m helpers.prepare shards {url}$"):
        shards.read_index(url, options, shards_url=nowhere)


class Hung(Exception):
    pass


@contextmanager
def _within(seconds: float):
    """Fail (rather than spin forever) when the block takes longer than ``seconds``."""

    def alarm(signum, frame):
        raise Hung(f"still running after {seconds} s")

    before = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)


def _with_field(blob: bytes, at: int, value: bytes) -> bytes:
    """``blob`` with the header at byte 0 given ``value`` at ``at`` and a valid checksum."""
    header = bytearray(blob[:512])
    header[at : at + len(value)] = value
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header) + blob[512:]


_ONE = shards.pack_shard([("Images/n1-a/n1_1.jpg", 0, b"x" * 700)])  # ustar: no PAX header


@pytest.mark.parametrize(
    "size",
    [
        b"-0000000007\0",
        b"-0000001000\0",
        b"+0000000007\0",
        b"00000001_00\0",
        b"0000000009\0\0",
        b"0x1f\0",
    ],
)
def test_a_negative_or_malformed_size_is_refused_not_looped_on(size):
    bad = _with_field(_ONE, 124, size)
    with _within(1.0), pytest.raises(ShardError, match=r"shard train-000007\.tar.* byte 0"):
        list(shards.tar_members(bad, "train-000007.tar"))


def test_members_and_shards_past_their_bounds_are_refused(monkeypatch):
    monkeypatch.setattr(shards, "MAX_MEMBER_BYTES", 699)
    with pytest.raises(ShardError, match=r"shard s\.tar: a member of 700 bytes at byte 0"):
        list(shards.read_shard(_ONE, "s.tar"))
    monkeypatch.setattr(shards, "MAX_MEMBER_BYTES", 700)
    assert [k for k, _ in shards.read_shard(_ONE, "s.tar")] == ["Images/n1-a/n1_1"]
    monkeypatch.setattr(shards, "MAX_SHARD_BYTES", len(_ONE) - 1)
    with pytest.raises(ShardError, match=f"shard s.tar is {len(_ONE)} bytes"):
        list(shards.read_shard(_ONE, "s.tar"))


def test_an_empty_shard_and_one_cut_at_a_member_are_refused():
    with pytest.raises(ShardError, match="shard e.tar holds no samples"):
        list(shards.read_shard(bytes(1024), "e.tar"))
    whole = len(_ONE) - len(_ONE.rstrip(b"\0"))  # the end-of-archive marker and padding
    cut = _ONE[: -(whole // 512) * 512]  # at the end of the last member: no marker
    assert list(shards.tar_members(_ONE)) == [
        ("Images/n1-a/n1_1.jpg", b"x" * 700),
        ("Images/n1-a/n1_1.cls", b"0"),
    ]
    with pytest.raises(
        ShardError, match=f"c.tar: unexpected end of data, no header at byte {len(cut)}"
    ):
        list(shards.tar_members(cut, "c.tar"))


@pytest.mark.parametrize(
    "records", [b"99 path=a.jpg\n", b"13 path=a.jpg\n", b"2 \n", b"12 path=a.jpg", b"x\n"]
)
def test_malformed_pax_records_are_refused(records):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("x" * 120 + ".jpg")  # over 100 bytes: a PAX path record
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    blob = _with_field(buf.getvalue(), 124, b"%011o\0" % len(records))  # the PAX header's size
    blob = blob[:512] + records.ljust(512, b"\0") + blob[1024:]
    with _within(1.0), pytest.raises(ShardError, match="p.tar: malformed PAX record at byte 512"):
        list(shards.tar_members(blob, "p.tar"))


def _index_at(tmp_path, edit) -> str:
    """A valid index (two train shards, one val) under ``tmp_path/shards``, changed by ``edit``."""
    entries = [{"name": f"train-{i:06d}.tar", "bytes": 2048, "images": 3} for i in range(2)]
    index = {
        "format": shards.FORMAT,
        "manifest_sha256": "0" * 64,
        "val_fraction": 0.2,
        "seed": 0,
        "split_source": "seeded",
        "shard_size": 3,
        "classes": ["n1-a", "n2-b"],
        "splits": {
            "train": {"split": "train", "images": 6, "shards": entries},
            "val": {
                "split": "val",
                "images": 2,
                "shards": [{"name": "val-000000.tar", "bytes": 2048, "images": 2}],
            },
        },
    }
    edit(index)
    (tmp_path / "shards").mkdir(exist_ok=True)
    (tmp_path / "shards" / "index.json").write_text(json.dumps(index))
    return str(tmp_path)


def _entry(**changes):
    def edit(index):
        index["splits"]["train"]["shards"][1].update(changes)

    return edit


def test_a_valid_index_reads(tmp_path):
    index = shards.read_index(_index_at(tmp_path, lambda i: None))
    assert [e["images"] for e in index["splits"]["train"]["shards"]] == [3, 3]


@pytest.mark.parametrize(
    "edit, words",
    [
        (_entry(name="../../etc/passwd"), "'../../etc/passwd'"),
        (_entry(name="train-000001.tar/../x"), "'train-000001.tar/../x'"),
        (_entry(name="train-1.tar"), "'train-1.tar'"),
        (_entry(name="val-000001.tar"), "'val-000001.tar'"),
        (_entry(images=0), "images=0"),
        (_entry(images=-3), "images=-3"),
        (_entry(images="3"), "images='3'"),
        (_entry(images=True), "images=True"),
        (_entry(images=2.5), "images=2.5"),
        (lambda i: i["splits"]["train"].update(images=7), "images=7 but its shards add up to 6"),
        (lambda i: i["splits"].pop("val"), "'val'"),
        (lambda i: i["splits"]["train"].update(shards={}), "shards"),
        (lambda i: i.update(classes="n1-a"), "classes"),
        (lambda i: i.update(manifest_sha256=None), "manifest_sha256"),
        (lambda i: i.pop("val_fraction"), "val_fraction=None"),
        (lambda i: i.update(seed="0"), "seed='0'"),
    ],
)
def test_an_index_that_breaks_its_format_is_refused_naming_what(tmp_path, edit, words):
    url = _index_at(tmp_path, edit)
    with pytest.raises(ShardIndexError, match=re.escape(words)) as err:
        shards.read_index(url)
    assert "index.json" in str(err.value) and "python -m helpers.prepare shards" in str(err.value)


@pytest.mark.parametrize("text", ["[]", "null", '"index"', "{", '{"format": 3}', "[" * 100_000])
def test_an_index_that_is_not_an_index_is_refused(tmp_path, text):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "index.json").write_text(text)
    with pytest.raises(ShardIndexError, match="index.json"):
        shards.read_index(str(tmp_path))
