"""IDX parsing on the real files and on corrupted copies of them."""

import struct

import numpy as np
import pytest

from stages.common.errors import DataError
from stages.dataset.idx import parse_idx, read_images, read_labeled_images, read_labels


def test_real_files_parse_to_the_documented_shapes(raw_files):
    images, labels = read_labeled_images(raw_files.train_images, raw_files.train_labels)
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (60000,) and set(np.unique(labels)) == set(range(10))
    test_images, test_labels = read_labeled_images(raw_files.test_images, raw_files.test_labels)
    assert test_images.shape == (10000, 28, 28) and len(test_labels) == 10000


def _header(ndim, *shape, type_code=0x08):
    return struct.pack(">HBB", 0, type_code, ndim) + struct.pack(f">{ndim}I", *shape)


@pytest.mark.parametrize(
    "data, problem",
    [
        (b"\x00\x00", "only 2 bytes"),
        (b"\x00\x00\x0d\x01" + b"\x00" * 8, "bad magic number 0x00000d01"),  # float data, not unsigned bytes
        (b"\x12\x34\x08\x01" + b"\x00" * 8, "bad magic number"),
        (b"\x00\x00\x08\x03\x00\x00", "truncated IDX header"),
        (_header(1, 10) + b"\x01" * 9, "truncated"),
        (_header(1, 10) + b"\x01" * 11, "trailing bytes"),
    ],
)
def test_malformed_bytes_are_refused_with_the_reason(data, problem):
    with pytest.raises(DataError, match=problem) as caught:
        parse_idx(data, "broken.idx")
    assert str(caught.value).startswith("broken.idx: ")


def test_corrupted_copies_of_the_real_files_are_refused(raw_files, tmp_path):
    labels = raw_files.train_labels.read_bytes()
    images = raw_files.test_images.read_bytes()

    truncated = tmp_path / "train-labels-idx1-ubyte"
    truncated.write_bytes(labels[:-100])
    with pytest.raises(DataError, match="train-labels-idx1-ubyte: truncated"):
        read_labels(truncated)

    out_of_range = tmp_path / "bad-labels"
    out_of_range.write_bytes(labels[:8 + 41] + b"\x0c" + labels[8 + 42:])
    with pytest.raises(DataError, match="label 12 at index 41 is outside 0-9"):
        read_labels(out_of_range)

    wrong_dims = tmp_path / "images-49x16"
    wrong_dims.write_bytes(_header(3, 10000, 49, 16) + images[16:])
    with pytest.raises(DataError, match=r"expected images of shape \(n, 28, 28\)"):
        read_images(wrong_dims)

    labels_as_images = tmp_path / "labels-as-images"
    labels_as_images.write_bytes(labels)
    with pytest.raises(DataError, match="expected images"):
        read_images(labels_as_images)


def test_image_and_label_counts_must_agree(raw_files):
    with pytest.raises(DataError, match="has 10000 images but train-labels-idx1-ubyte has 60000 labels"):
        read_labeled_images(raw_files.test_images, raw_files.train_labels)
