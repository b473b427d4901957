"""The train/validation split: deterministic, stratified, complete; the dataset files it writes."""

import json

import numpy as np
import pytest

from stages.common.errors import BadInputError
from stages.preprocess import load_splits, manifest, preprocess, save_splits, stratified_split


@pytest.fixture(scope="module")
def splits(raw_data):
    return preprocess(raw_data, validation_size=5000, seed=0)


def test_classic_sizes_and_uint8_pixels(splits):
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (55000, 5000, 10000)
    assert splits.train.images.dtype == np.uint8 and splits.train.images.shape[1:] == (28, 28)


def test_split_is_deterministic_for_a_seed_and_changes_with_it(raw_data, splits):
    again = preprocess(raw_data, validation_size=5000, seed=0)
    assert np.array_equal(again.validation.images, splits.validation.images)
    other = preprocess(raw_data, validation_size=5000, seed=1)
    assert not np.array_equal(other.validation.labels, splits.validation.labels)


def test_split_is_stratified_and_partitions_the_training_file():
    labels = np.repeat(np.arange(10, dtype=np.uint8), [100, 200, 300, 50, 50, 100, 100, 50, 25, 25])
    kept, held_out = stratified_split(labels, 100, seed=3)
    assert len(held_out) == 100
    assert np.array_equal(np.sort(np.concatenate([kept, held_out])), np.arange(len(labels)))
    expected = np.bincount(labels) * 100 / len(labels)
    assert np.all(np.abs(np.bincount(labels[held_out], minlength=10) - expected) < 1)


def test_real_validation_set_follows_the_class_frequencies(splits):
    train_share = np.bincount(splits.train.labels) / len(splits.train)
    validation_share = np.bincount(splits.validation.labels) / len(splits.validation)
    assert np.abs(train_share - validation_share).max() < 0.001


def test_slices_of_mnist(raw_data):
    small = preprocess(raw_data, validation_size=100, seed=0, max_train_images=1000, max_test_images=300)
    assert (len(small.train), len(small.validation), len(small.test)) == (900, 100, 300)


def test_a_validation_set_as_large_as_the_data_is_refused(raw_data):
    with pytest.raises(BadInputError, match="data.validation_size=1000 must be between 1 and 999"):
        preprocess(raw_data, validation_size=1000, max_train_images=1000)


def test_saved_dataset_round_trips_with_its_manifest(raw_data, tmp_path):
    small = preprocess(raw_data, validation_size=100, seed=0, max_train_images=1000, max_test_images=300)
    info = manifest(small, raw_data, validation_size=100, seed=0)
    save_splits(small, info, str(tmp_path))
    loaded = load_splits(tmp_path / "dataset.npz")
    for name in ("train", "validation", "test"):
        assert np.array_equal(getattr(loaded, name).images, getattr(small, name).images)
        assert np.array_equal(getattr(loaded, name).labels, getattr(small, name).labels)
    written = json.loads((tmp_path / "manifest.json").read_text())
    assert written["splits"]["validation"]["shape"] == [100, 28, 28]
    assert sum(written["splits"]["train"]["class_counts"]) == 900
    assert written["source_sha256"]["train-images-idx3-ubyte"].startswith("ba891046")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset.npz", "manifest.json"]


def test_an_identical_split_is_reused_from_the_cache_and_verified(raw_data, tmp_path, caplog):
    import logging

    from stages.dataset.dataset_cache import cached_preprocess

    settings = dict(validation_size=100, seed=0, max_train_images=1000, max_test_images=300)
    first, info, reused = cached_preprocess(raw_data, tmp_path, **settings)
    assert not reused and info["fingerprint"] and info["dataset_sha256"]
    with caplog.at_level(logging.INFO):
        second, info_again, reused = cached_preprocess(raw_data, tmp_path, **settings)
    assert reused and info_again == info and "reusing the verified split" in caplog.text
    assert np.array_equal(second.validation.images, first.validation.images)

    _, _, reused = cached_preprocess(raw_data, tmp_path, **{**settings, "seed": 1})
    assert not reused, "another seed is another split"

    cached = tmp_path / "datasets" / info["fingerprint"] / "dataset.npz"
    cached.write_bytes(cached.read_bytes()[:-10])  # a damaged cache entry is never trusted
    third, _, reused = cached_preprocess(raw_data, tmp_path, **settings)
    assert not reused and np.array_equal(third.train.labels, first.train.labels)
    assert len(list((tmp_path / "datasets").iterdir())) == 2


def test_a_run_references_its_split_and_takes_it_only_with_the_same_content(raw_data, tmp_path):
    """data/manifest.json names the folder of the copy (absolute, or relative to data/) and the split's content
    digest: a copy with that content serves; a damaged, gone or other split, a reference to a reference, or a URI
    named in the manifest do not."""
    import shutil

    from stages.preprocess import content_sha256, load_verified_splits, referenced_folder, save_reference

    small = preprocess(raw_data, validation_size=100, seed=0, max_train_images=1000, max_test_images=300)
    info = manifest(small, raw_data, validation_size=100, seed=0)
    assert info["content_sha256"] == content_sha256(small)
    shared = tmp_path / "root" / ".datasets" / "abc"
    save_splits(small, info, str(shared))
    data = tmp_path / "root" / "run" / "data"
    save_reference(info, str(data), "../../.datasets/abc")
    assert sorted(p.name for p in data.iterdir()) == ["manifest.json"]
    assert referenced_folder(str(data)) == str(shared)
    loaded, read_info = load_verified_splits(str(data))
    assert np.array_equal(loaded.test.images, small.test.images)
    assert read_info["dataset_folder"] == "../../.datasets/abc" and "dataset_sha256" not in read_info

    other = preprocess(raw_data, validation_size=100, seed=1, max_train_images=1000, max_test_images=300)
    save_splits(other, manifest(other, raw_data, validation_size=100, seed=1), str(shared))  # another split there
    assert load_verified_splits(str(data)) is None
    shutil.rmtree(shared)  # gone
    assert load_verified_splits(str(data)) is None

    absolute = tmp_path / "cache" / "datasets" / "abc"
    save_splits(small, info, str(absolute))
    save_reference(info, str(data), str(absolute))
    assert load_verified_splits(str(data)) is not None
    chained = tmp_path / "chained"
    save_reference(info, str(chained), str(data))  # a reference to a reference: never followed
    assert load_verified_splits(str(chained)) is None
    save_reference(info, str(chained), "s3://bucket/datasets/abc")
    assert load_verified_splits(str(chained)) is None and referenced_folder(str(chained)) is None
