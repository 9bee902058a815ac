"""The lazy per-object dataset on the real embedded server: one concurrent round per batch, bad
objects skipped by name, picklable, a dead endpoint named, a cache that notices changes."""

import io
import logging

import pytest
from PIL import Image

from helpers import data, prepare
from helpers.errors import BadImageError, StorageUnavailable
from helpers.loading import dataloader
from helpers.loading.objects import S3ImageDataset
from helpers.s3 import presigned, retry, storage
from helpers.s3 import server as s3server


def _jpeg(mode="RGB", fmt="JPEG", size=(64, 48), **kw) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, **kw).save(buf, fmt)
    return buf.getvalue()


def test_lazy_dataset_fetches_a_batch_in_one_concurrent_call(dogs, monkeypatch):
    url, options, manifest = dogs
    ds = data.dataset(manifest, manifest.keys, options, 32, train=True)
    fs = storage.filesystem(url, options)
    signed, fetched, through_s3fs = [], [], []
    real_sign, real_get, real_cat = presigned.sign, presigned.get_many, fs.cat
    monkeypatch.setattr(presigned, "sign", lambda *a: signed.append(len(a[2])) or real_sign(*a))
    monkeypatch.setattr(presigned, "get_many", lambda u: fetched.append(len(u)) or real_get(u))
    monkeypatch.setattr(fs, "cat", lambda p, **kw: through_s3fs.append(len(p)) or real_cat(p, **kw))
    batch = ds.__getitems__(list(range(8)))
    # One signing call and one concurrent round of plain GETs for the batch; s3fs not needed.
    assert (signed, fetched, through_s3fs) == ([8], [8], []) and len(batch) == 8
    x, y = batch[0]
    assert tuple(x.shape) == (3, 32, 32) and y == manifest.label(manifest.keys[0])


def test_a_store_that_refuses_presigned_gets_is_read_through_s3fs(dogs, monkeypatch, caplog):
    url, options, manifest = dogs
    ds = data.dataset(manifest, manifest.keys, options, 32, train=False)
    fs = storage.filesystem(url, options)
    through_s3fs, real_cat = [], fs.cat
    monkeypatch.setattr(fs, "cat", lambda p, **kw: through_s3fs.append(len(p)) or real_cat(p, **kw))
    refusal = (403, "Forbidden", b"<Error><Code>AccessDenied</Code></Error>")
    tried = []
    monkeypatch.setattr(presigned, "_request", lambda url: tried.append(url) or refusal)
    monkeypatch.setitem(presigned._STATE, "refused", False)
    with caplog.at_level(logging.INFO, logger="helpers.s3.presigned"):
        first = ds.__getitems__([0, 1, 2])
        tried_first = len(tried)
        second = ds.__getitems__([3, 4])
    assert len(first) == 3 and len(second) == 2  # every image, read through s3fs instead
    assert through_s3fs == [3, 2] and 1 <= tried_first == len(tried) <= 3  # then no more tries
    assert "403 AccessDenied" in caplog.text
    monkeypatch.setitem(presigned._STATE, "refused", False)


@pytest.fixture(scope="module")
def with_bad(s3):
    """A dataset of its own (others list theirs) plus a zero-byte, a truncated and a non-image."""
    url, options = "s3://dogs/with-bad", s3.storage_options
    manifest = prepare.write_synthetic(url, options, 2, 6)
    bad = {
        "Images/n02085620-Chihuahua/zero.jpg": b"",
        "Images/n02085620-Chihuahua/truncated.jpg": _jpeg(size=(300, 300))[:300],
        "Images/n02085620-Chihuahua/notes.jpg": b"just text",
    }
    storage.filesystem(url, options).pipe({f"dogs/with-bad/{k}": v for k, v in bad.items()})
    return url, options, manifest, list(manifest.keys) + list(bad)


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_objects_are_skipped_and_never_kill_an_epoch(with_bad, workers, caplog):
    url, options, manifest, keys = with_bad
    ds = data.dataset(manifest, keys, options, 32, train=True)
    loader = dataloader.make_loader(ds, batch_size=8, num_workers=workers, shuffle=True)
    with caplog.at_level(logging.WARNING, logger="helpers.loading.objects"):
        seen = sum(len(b[1]) for b in loader if b is not None)
    assert seen == len(manifest.keys)  # every good image, none of the 3 bad ones
    if workers == 0:  # worker processes log to their own stderr
        assert "zero.jpg: empty object" in caplog.text
        assert "truncated.jpg: not a readable image" in caplog.text


def test_bad_object_raises_when_asked(with_bad):
    url, options, manifest, keys = with_bad
    ds = data.dataset(manifest, keys[-1:], options, 32, train=True, on_error="raise")
    with pytest.raises(BadImageError, match="notes.jpg"):
        ds[0]


def test_missing_key_is_skipped_by_name(dogs, caplog):
    url, options, manifest = dogs
    ds = data.dataset(manifest, ["Images/n02085620-Chihuahua/gone.jpg"], options, 32, True)
    with caplog.at_level(logging.WARNING, logger="helpers.loading.objects"):
        assert ds.__getitems__([0]) == []
    assert "gone.jpg: listed but missing" in caplog.text


def test_dataset_pickles_without_a_filesystem(dogs):
    import pickle

    url, options, manifest = dogs
    ds = data.dataset(manifest, manifest.keys, options, 32, train=False)
    ds[0]  # creates this process's filesystem
    clone = pickle.loads(pickle.dumps(ds))
    assert len(pickle.dumps(ds)) < 20_000
    assert tuple(clone[1][0].shape) == (3, 32, 32)


def test_dead_endpoint_in_a_loader_raises_a_clear_error(dogs, monkeypatch):
    # Mid-run, a server that went away is retried for retry.RETRY_WINDOW_S (here 2 s), then
    # named; at first contact (check_readable) it fails at once: s3/test_storage.py,
    # test_endpoint_down_fails_within_seconds.
    monkeypatch.setattr(retry, "RETRY_WINDOW_S", 2.0)
    url, options, manifest = dogs
    (port,) = s3server.free_ports(1)
    dead = {**options, "endpoint_url": f"http://127.0.0.1:{port}"}
    ds = data.dataset(manifest, manifest.keys, dead, 32, train=True)
    with pytest.raises(StorageUnavailable, match=f"127.0.0.1:{port} kept failing for 2 s"):
        ds.__getitems__([0, 1])


def test_the_cache_notices_a_changed_object_by_its_listed_etag(s3, tmp_path):
    options, url = s3.storage_options, "s3://dogs/changing"
    fs = storage.filesystem(url, options)
    key = "Images/n0-a/x.jpg"
    fs.pipe_file(f"dogs/changing/{key}", b"first")
    cached = S3ImageDataset(url, [key], [0], options, cache_dir=str(tmp_path))
    assert cached._fetch([f"dogs/changing/{key}"])[f"dogs/changing/{key}"] == b"first"
    fs.pipe_file(f"dogs/changing/{key}", b"second, longer")
    again = S3ImageDataset(url, [key], [0], options, cache_dir=str(tmp_path))
    assert again._fetch([f"dogs/changing/{key}"])[f"dogs/changing/{key}"] == b"second, longer"
