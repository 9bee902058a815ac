import io
import logging
import random

import pytest
from PIL import Image

from helpers import data, measure, objects, s3server, storage, transforms


def _jpeg(mode="RGB", fmt="JPEG", size=(64, 48), **kw) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, **kw).save(buf, fmt)
    return buf.getvalue()


def test_breed_and_class_folder():
    key = "Images/n02085620-Chihuahua/n02085620_10074.jpg"
    assert data.class_folder(key) == "n02085620-Chihuahua"
    assert data.breed("n02085620-Chihuahua") == "Chihuahua"
    assert data.breed("n02089078-black-and-tan_coonhound") == "black-and-tan coonhound"


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P", "LA", "I;16"])
def test_any_mode_decodes_to_rgb(mode):
    fmt = "JPEG" if mode in ("L", "CMYK") else "PNG"
    img = transforms.decode_image(_jpeg(mode, fmt), f"x/{mode}.jpg")
    assert img.mode == "RGB" and img.size == (64, 48)


def test_palette_with_transparency_and_png_named_jpg():
    p = Image.new("P", (8, 8), 0)
    buf = io.BytesIO()
    p.save(buf, "PNG", transparency=0)
    img = transforms.decode_image(buf.getvalue(), "Images/n1-a/n1_1.jpg")  # a PNG with a .jpg name
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize(
    "blob,why",
    [
        (b"", "empty object"),
        (_jpeg()[:200], "not a readable image"),
        (b"<html>not an image</html>", "not a readable image"),
    ],
)
def test_bad_bytes_name_the_key(blob, why):
    with pytest.raises(transforms.BadImageError, match=f"Images/n1-a/bad.jpg: {why}"):
        transforms.decode_image(blob, "Images/n1-a/bad.jpg")


def test_draft_decodes_smaller_but_not_below_target():
    img = transforms.decode_image(_jpeg(size=(480, 400)), "k", draft=100)
    assert 100 <= min(img.size) < 400


def _manifest(keys, official=None):
    return data.make_manifest("s3://b/p", keys, official or {})


def test_seeded_split_is_disjoint_stratified_and_order_independent():
    keys = [f"Images/n{c}-breed{c}/n{c}_{i}.jpg" for c in range(5) for i in range(20)]
    a = data.split(_manifest(keys), 0.25, seed=1)
    random.Random(0).shuffle(keys)
    b = data.split(_manifest(keys), 0.25, seed=1)
    assert a == b
    assert not set(a.train) & set(a.val)
    assert len(a.train) + len(a.val) == 100
    per_class = {
        c: sum(1 for k in a.val if data.class_folder(k) == c)
        for c in {data.class_folder(k) for k in keys}
    }
    assert set(per_class.values()) == {5}
    assert data.split(_manifest(keys), 0.25, seed=2).val != a.val


def test_official_lists_win_when_present():
    keys = [f"Images/n1-a/n1_{i}.jpg" for i in range(6)]
    m = _manifest(keys, {"train": keys[:4], "test": keys[4:]})
    s = data.split(m)
    assert s.source == "official" and s.val == tuple(keys[4:])


def test_split_rejects_bad_fraction():
    with pytest.raises(ValueError, match="val_fraction=1.5; allowed"):
        data.split(_manifest(["Images/n1-a/x.jpg"]), 1.5)


def test_listing_matches_manifest_and_manifest_is_used(dogs):
    url, options, manifest = dogs
    listed = data.list_images(url, options)
    assert listed.keys == manifest.keys and len(listed.classes) == 4
    cached = data.load_manifest(url, options)
    assert cached.keys == manifest.keys
    # The cached manifest is read, not relisted: a manifest written elsewhere is honoured.
    fake = data.make_manifest("s3://dogs/other", manifest.keys[:3], {})
    data.write_manifest(fake, options)
    assert len(data.load_manifest("s3://dogs/other", options).keys) == 3


def test_lazy_dataset_fetches_a_batch_in_one_concurrent_call(dogs, monkeypatch):
    from helpers import presigned

    url, options, manifest = dogs
    ds = objects.make_dataset(manifest, manifest.keys, options, 32, train=True)
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
    from helpers import presigned

    url, options, manifest = dogs
    ds = objects.make_dataset(manifest, manifest.keys, options, 32, train=False)
    fs = storage.filesystem(url, options)
    through_s3fs, real_cat = [], fs.cat
    monkeypatch.setattr(fs, "cat", lambda p, **kw: through_s3fs.append(len(p)) or real_cat(p, **kw))
    refusal = (403, "Forbidden", b"<Error><Code>AccessDenied</Code></Error>")
    tried = []
    monkeypatch.setattr(presigned, "_request", lambda url: tried.append(url) or refusal)
    monkeypatch.setitem(presigned._STATE, "refused", False)
    with caplog.at_level(logging.INFO, logger="helpers.presigned"):
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
    from helpers import prepare

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
    ds = objects.make_dataset(manifest, keys, options, 32, train=True)
    loader = data.make_loader(ds, batch_size=8, num_workers=workers, shuffle=True)
    with caplog.at_level(logging.WARNING, logger="helpers.data"):
        seen = sum(len(b[1]) for b in loader if b is not None)
    assert seen == len(manifest.keys)  # every good image, none of the 3 bad ones
    if workers == 0:  # worker processes log to their own stderr
        assert "zero.jpg: empty object" in caplog.text
        assert "truncated.jpg: not a readable image" in caplog.text


def test_bad_object_raises_when_asked(with_bad):
    url, options, manifest, keys = with_bad
    ds = objects.make_dataset(manifest, keys[-1:], options, 32, train=True, on_error="raise")
    with pytest.raises(transforms.BadImageError, match="notes.jpg"):
        ds[0]


def test_missing_key_is_skipped_by_name(dogs, caplog):
    url, options, manifest = dogs
    ds = objects.make_dataset(manifest, ["Images/n02085620-Chihuahua/gone.jpg"], options, 32, True)
    with caplog.at_level(logging.WARNING, logger="helpers.data"):
        assert ds.__getitems__([0]) == []
    assert "gone.jpg: listed but missing" in caplog.text


def test_dataset_pickles_without_a_filesystem(dogs):
    import pickle

    url, options, manifest = dogs
    ds = objects.make_dataset(manifest, manifest.keys, options, 32, train=False)
    ds[0]  # creates this process's filesystem
    clone = pickle.loads(pickle.dumps(ds))
    assert len(pickle.dumps(ds)) < 20_000
    assert tuple(clone[1][0].shape) == (3, 32, 32)


def test_dead_endpoint_in_a_loader_raises_a_clear_error(dogs, monkeypatch):
    # Mid-run, a server that went away is retried for storage.RETRY_WINDOW_S (here 2 s), then
    # named; at first contact (check_readable) it fails at once: test_storage.py,
    # test_endpoint_down_fails_within_seconds.
    monkeypatch.setattr(storage, "RETRY_WINDOW_S", 2.0)
    url, options, manifest = dogs
    (port,) = s3server.free_ports(1)
    dead = {**options, "endpoint_url": f"http://127.0.0.1:{port}"}
    ds = objects.make_dataset(manifest, manifest.keys, dead, 32, train=True)
    with pytest.raises(storage.StorageUnavailable, match=f"127.0.0.1:{port} kept failing for 2 s"):
        ds.__getitems__([0, 1])


@pytest.mark.slow
def test_loader_with_worker_processes_inside_a_dask_worker(dogs):
    from helpers.cluster import make_client
    from helpers.config import TrainConfig

    url, options, manifest = dogs
    cfg = TrainConfig(url, image_size=32, batch_size=8, loader_workers=2, data_format="objects")
    with make_client("local", n_workers=1) as client:
        result = client.submit(measure.loader_throughput, cfg, options, pure=False).result(120)
    assert result["images"] == len(data.split(manifest).train) // 8 * 8  # whole batches


def test_loader_processes_are_forked_from_a_forkserver_where_dask_spawns(monkeypatch):
    import multiprocessing

    assert multiprocessing.get_start_method() == "fork"  # this process: the default stays
    assert data.make_loader(list(range(4)), 2, num_workers=1).multiprocessing_context is None
    # Dask's worker processes run under "spawn": a fresh interpreter (torch imported) per epoch
    monkeypatch.setattr(multiprocessing, "get_start_method", lambda *a, **k: "spawn")
    loader = data.make_loader(list(range(4)), 2, num_workers=1)
    assert loader.multiprocessing_context.get_start_method() == "forkserver"
    assert data.make_loader(list(range(4)), 2, num_workers=0).multiprocessing_context is None
