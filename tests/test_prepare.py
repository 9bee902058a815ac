import io
import re
import tarfile

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from helpers import data, prepare
from helpers.errors import ParameterError
from helpers.loading import dataloader
from helpers.loading.synthetic import synthetic_image, synthetic_keys
from helpers.loading.transforms import decode_image, eval_transform
from helpers.s3 import storage
from helpers.shards import format as shard_format
from helpers.shards.stream import Reading, ShardStream, Share

KEY = re.compile(r"^Images/n\d{8}-[\w-]+/n\d{8}_\d+\.jpg$")


def test_synthetic_images_are_deterministic_and_varied():
    def make(seed):
        return synthetic_image(3, 10, np.random.default_rng([seed, 3, 7]))

    assert make(0) == make(0)
    assert make(0) != make(1)
    sizes = {Image.open(io.BytesIO(make(s))).size for s in range(12)}
    assert len(sizes) > 6 and all(150 <= min(s) and max(s) <= 600 for s in sizes)


def test_synthetic_layout_uses_real_stanford_folders(dogs):
    url, options, manifest = dogs
    assert all(KEY.match(k) for k in manifest.keys)
    assert manifest.classes[0] == "n02085620-Chihuahua"
    assert len(manifest.keys) == 40 and manifest.breeds[1] == "Japanese spaniel"


def test_ensure_synthetic_reuses_what_is_there(dogs, monkeypatch):
    url, options, manifest = dogs
    monkeypatch.setattr(prepare, "write_synthetic", lambda *a, **k: pytest.fail("regenerated"))
    assert prepare.ensure_synthetic(url, options, 4, 10).keys == manifest.keys


def test_synthetic_rejects_bad_sizes():
    with pytest.raises(ParameterError, match="n_breeds=500; allowed: 1 to 20"):
        synthetic_keys(500, 10)


def _tar(path, members: dict[str, bytes]):
    with tarfile.open(path, "w") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def _mat(files) -> bytes:
    buf = io.BytesIO()
    cells = np.empty((len(files), 1), dtype=object)  # a MATLAB cell array, as in the originals
    for i, f in enumerate(files):
        cells[i, 0] = np.array([f])
    savemat(buf, {"file_list": cells})
    return buf.getvalue()


def test_official_archive_uploads_in_the_same_layout_with_its_split(s3, tmp_path):
    files = [f"n02085620-Chihuahua/n02085620_{i}.jpg" for i in range(3)] + [
        f"n02088364-beagle/n02088364_{i}.jpg" for i in range(3)
    ]
    jpeg = synthetic_image(0, 2, np.random.default_rng(0))
    _tar(tmp_path / "images.tar", {f"Images/{f}": jpeg for f in files})
    _tar(
        tmp_path / "lists.tar",
        {
            "train_list.mat": _mat(files[0:2] + files[3:5]),
            "test_list.mat": _mat([files[2], files[5]]),
        },
    )
    url = "s3://real-dogs/stanford"
    manifest = prepare.upload_archive(
        tmp_path / "images.tar", url, s3.storage_options, tmp_path / "lists.tar"
    )
    assert manifest.keys == tuple(sorted(f"Images/{f}" for f in files))
    reread = data.list_images(url, s3.storage_options)  # lists read back from the bucket
    split = data.split(reread)
    assert split.source == "official"
    assert split.val == (f"Images/{files[2]}", f"Images/{files[5]}")
    fs = storage.filesystem(url, s3.storage_options)
    assert fs.cat_file(f"real-dogs/stanford/Images/{files[0]}") == jpeg


def test_archive_in_another_layout_is_refused_by_member_name(s3, tmp_path):
    _tar(tmp_path / "other.tar", {"photos/dog.jpg": b"x"})
    with pytest.raises(ParameterError, match="member 'photos/dog.jpg' is not in the Stanford Dogs"):
        prepare.upload_archive(tmp_path / "other.tar", "s3://real-dogs/other", s3.storage_options)


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
    index = shard_format.read_index(target, options)
    written = data.load_manifest(target, options)
    assert written.keys == tuple(sorted(keys))
    assert [s["images"] for s in index["splits"].values()] == [8, 4]
    assert not fs.exists(f"dogs/from-archive/{keys[0]}")  # shards only: no per-object copy
    shard_format.check_index(index, written)  # built from the manifest written beside them
    reading = Reading(decode_image, eval_transform(32), image_size=32)
    val = ShardStream(index, target, "val", options, Share(batch_size=4), reading)
    pairs = [kp for b in dataloader.stream_loader(val, 0) for kp in zip(b[2], b[3], strict=True)]
    assert sorted(k for k, pad in pairs if not pad) == sorted(data.split(written).val)
