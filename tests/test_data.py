import random

import pytest

from helpers import data
from helpers.errors import ParameterError


def test_breed_and_class_folder():
    key = "Images/n02085620-Chihuahua/n02085620_10074.jpg"
    assert data.class_folder(key) == "n02085620-Chihuahua"
    assert data.breed("n02085620-Chihuahua") == "Chihuahua"
    assert data.breed("n02089078-black-and-tan_coonhound") == "black-and-tan coonhound"


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
    with pytest.raises(ParameterError, match="val_fraction=1.5; allowed"):
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


@pytest.mark.parametrize(
    "text, why",
    [
        ("[1, 2]", "a JSON list"),
        ('{"keys": []}', "keys=[]"),
        ('{"keys": [null]}', "key 'None'"),
        ('{"keys": ["x.jpg"]}', "key 'x.jpg'"),
        ('{"keys": ["Images/../../etc/passwd"]}', "key 'Images/../../etc/passwd'"),
        ('{"keys": ["Images/a/x.jpg"], "official": {"train": 3}}', "official="),
        ('{"keys": ', "not JSON"),
        ("[" * 100_000, "not JSON"),
    ],
)
def test_a_manifest_that_is_not_one_is_refused_naming_the_fix(tmp_path, text, why):
    from helpers.errors import StorageError

    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(StorageError, match="manifest.json is not a manifest") as err:
        data.load_manifest(str(tmp_path))
    assert why in str(err.value) and "refresh=True" in str(err.value)
