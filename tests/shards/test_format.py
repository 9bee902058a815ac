"""The shard format on the real embedded S3 server: members, the index, a tar reader that names
damage, and shards refused when they are of another manifest."""

from __future__ import annotations

import io
import tarfile

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
