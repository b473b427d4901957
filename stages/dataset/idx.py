"""Reading the IDX format that MNIST ships in, refusing anything malformed.

IDX: 2 zero bytes, a type code (0x08 = unsigned byte), the number of dimensions, one big-endian uint32 per
dimension, then the data. http://yann.lecun.com/exdb/mnist/ describes it.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from stages.common.errors import DataError

UNSIGNED_BYTE = 0x08
IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10


def parse_idx(data: bytes | np.ndarray, name: str) -> np.ndarray:
    """Parses IDX bytes of unsigned bytes into an array.

    Args:
      data: the whole (decompressed) file, as bytes or a uint8 array.
      name: what to call the file in error messages.

    Returns:
      A uint8 array with the dimensions the header declares.

    Raises:
      DataError: the header is malformed or the data is shorter or longer than the header says.
    """
    if len(data) < 4:
        raise DataError(f"{name}: not an IDX file: only {len(data)} bytes")
    zero, type_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or type_code != UNSIGNED_BYTE or not 1 <= ndim <= 4:
        raise DataError(f"{name}: not an IDX file of unsigned bytes: bad magic number 0x{bytes(data[:4]).hex()}")
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise DataError(f"{name}: truncated IDX header ({len(data)} of {header_size} bytes)")
    shape = struct.unpack(f">{ndim}I", data[4:header_size])
    expected = header_size + int(np.prod(shape, dtype=np.int64))
    if len(data) != expected:
        problem = "truncated" if len(data) < expected else "has trailing bytes"
        raise DataError(f"{name}: {problem}: header declares shape {shape} ({expected} bytes), file has {len(data)}")
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape)


def images_from(data: bytes, name: str) -> np.ndarray:
    """Parses an IDX file of 28x28 images held in memory; returns uint8 of shape (n, 28, 28)."""
    images = parse_idx(data, name)
    if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise DataError(f"{name}: expected images of shape (n, 28, 28), header declares {images.shape}")
    return images


def labels_from(data: bytes, name: str) -> np.ndarray:
    """Parses an IDX file of digit labels held in memory; returns uint8 of shape (n,), every value in 0-9."""
    labels = parse_idx(data, name)
    if labels.ndim != 1:
        raise DataError(f"{name}: expected a 1-dimensional label file, header declares {labels.shape}")
    if labels.size and labels.max() >= NUM_CLASSES:
        bad = int(np.argmax(labels >= NUM_CLASSES))
        raise DataError(f"{name}: label {labels[bad]} at index {bad} is outside 0-9")
    return labels


def labeled_images_from(
    images_data: bytes, labels_data: bytes, images_name: str, labels_name: str
) -> tuple[np.ndarray, np.ndarray]:
    """Parses a pair of image and label files held in memory and checks that their counts agree."""
    images, labels = images_from(images_data, images_name), labels_from(labels_data, labels_name)
    if len(images) != len(labels):
        raise DataError(f"{images_name} has {len(images)} images but {labels_name} has {len(labels)} labels")
    return images, labels


def read_images(path: Path) -> np.ndarray:
    """Reads an IDX file of 28x28 images; returns uint8 of shape (n, 28, 28)."""
    return images_from(path.read_bytes(), path.name)


def read_labels(path: Path) -> np.ndarray:
    """Reads an IDX file of digit labels; returns uint8 of shape (n,), every value in 0-9."""
    return labels_from(path.read_bytes(), path.name)


def read_labeled_images(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Reads a pair of image and label files and checks that their counts agree."""
    return labeled_images_from(images_path.read_bytes(), labels_path.read_bytes(), images_path.name, labels_path.name)
