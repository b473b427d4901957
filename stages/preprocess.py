"""preprocess: parse the IDX files, validate them, and make a deterministic, stratified train/validation split.

Pixels stay uint8 (the model scales them), so the dataset is a quarter of the size of float32 and goes into Ray's
object store as it is.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages.common import storage
from stages.common.errors import BadInputError
from stages.dataset.idx import NUM_CLASSES, labeled_images_from
from stages.download import RawData


@dataclass(frozen=True)
class LabeledImages:
    """Images (n, 28, 28) uint8 and their labels (n,) uint8."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def class_counts(self) -> list[int]:
        return np.bincount(self.labels, minlength=NUM_CLASSES).tolist()


@dataclass(frozen=True)
class Splits:
    """Training and validation come from MNIST's training file; test is MNIST's test file, untouched until evaluate."""

    train: LabeledImages
    validation: LabeledImages
    test: LabeledImages


def preprocess(
    raw: RawData,
    *,
    validation_size: int = 5000,
    seed: int = 0,
    max_train_images: int | None = None,
    max_test_images: int | None = None,
) -> Splits:
    """Reads the four IDX files and splits MNIST's training set into train and validation.

    Args:
      raw: the contents of the verified IDX files.
      validation_size: images held out of training for Tune to rank trials by; stratified by class.
      seed: seeds the split; the same seed and inputs always give the same split.
      max_train_images: use only the first N images of the training file (quick runs and tests).
      max_test_images: use only the first N images of the test file.

    Returns:
      The three splits.

    Raises:
      DataError: a file is malformed.
      BadInputError: the sizes asked for do not fit the data.
    """
    images, labels = labeled_images_from(
        raw.train_images, raw.train_labels, "train-images-idx3-ubyte", "train-labels-idx1-ubyte"
    )
    test_images, test_labels = labeled_images_from(
        raw.test_images, raw.test_labels, "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"
    )
    images, labels = images[:max_train_images], labels[:max_train_images]
    test = LabeledImages(test_images[:max_test_images], test_labels[:max_test_images])
    if not 0 < validation_size < len(labels):
        raise BadInputError(
            f"data.validation_size={validation_size} must be between 1 and {len(labels) - 1} "
            f"(the training images available)"
        )
    train_index, validation_index = stratified_split(labels, validation_size, seed)
    return Splits(
        train=LabeledImages(images[train_index], labels[train_index]),
        validation=LabeledImages(images[validation_index], labels[validation_index]),
        test=test,
    )


def stratified_split(labels: np.ndarray, holdout_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Splits indices into (kept, held out) so that every class is held out in proportion to its frequency.

    Each class gets floor(share) held-out places; the remaining places go to the classes with the largest
    remainders, so the held-out set has exactly `holdout_size` indices. Both index arrays are sorted.
    """
    rng = np.random.default_rng(seed)
    counts = np.bincount(labels, minlength=NUM_CLASSES)
    shares = counts * holdout_size / len(labels)
    quotas = np.floor(shares).astype(int)
    leftover = holdout_size - quotas.sum()
    quotas[np.argsort(-(shares - quotas), kind="stable")[:leftover]] += 1
    held_out = np.concatenate(
        [rng.permutation(np.flatnonzero(labels == digit))[:quota] for digit, quota in enumerate(quotas)]
    )
    held_out.sort()
    kept = np.setdiff1d(np.arange(len(labels)), held_out, assume_unique=True)
    return kept, held_out


def manifest(splits: Splits, raw: RawData, *, validation_size: int, seed: int) -> dict:
    """What the dataset is, for people and for later runs deciding whether it can be reused."""
    return {
        "format": "npz of uint8 arrays: {split}_images (n, 28, 28), {split}_labels (n,)",
        "seed": seed,
        "validation_size": validation_size,
        "source_sha256": raw.sha256,
        "content_sha256": content_sha256(splits),
        "splits": {
            name: {"shape": list(split.images.shape), "class_counts": split.class_counts()}
            for name, split in _named(splits)
        },
    }


def content_sha256(splits: Splits) -> str:
    """sha256 over the arrays themselves (names, shapes, types, bytes): the same split has the same digest in any
    copy, however it was written (another numpy, another npz layout)."""
    digest = hashlib.sha256()
    for name, split in _named(splits):
        for array in (split.images, split.labels):
            digest.update(f"{name}:{array.dtype}:{array.shape}".encode())
            digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


def save_splits(splits: Splits, info: dict, location: str) -> dict:
    """Writes `dataset.npz` and `manifest.json` into the folder or URI `location`; returns the manifest written
    (`info` with the dataset's sha256)."""
    arrays = {}
    for name, split in _named(splits):
        arrays[f"{name}_images"] = split.images
        arrays[f"{name}_labels"] = split.labels
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    dataset = storage.join(location, "dataset.npz")
    storage.write_bytes(dataset, buffer.getvalue())
    # the manifest goes last and names the dataset's checksum: a folder with a manifest holds a complete dataset
    info = {**info, "dataset_sha256": hashlib.sha256(buffer.getbuffer()).hexdigest()}
    storage.write_json(storage.join(location, "manifest.json"), info)
    return info


def save_reference(info: dict, location: str, dataset_folder: str) -> dict:
    """Writes only `manifest.json` into the folder or URI `location`: `info` (a manifest that names the split's
    content_sha256) and the folder where `save_splits` wrote the split, instead of a copy of its own: an absolute
    path, or one relative to `location` ("../../.datasets/<fingerprint>": a URI's query, which may hold
    credentials, is not written down). Returns the manifest."""
    info = {key: value for key, value in info.items() if key != "dataset_sha256"} | {"dataset_folder": dataset_folder}
    storage.write_json(storage.join(location, "manifest.json"), info)
    return info


def load_splits(dataset: str | Path) -> Splits:
    """Reads what `save_splits` wrote."""
    return _splits_from(storage.read_bytes(str(dataset)))


def load_verified_splits(location: str, *, follow: bool = True) -> tuple[Splits, dict] | None:
    """What `save_splits` (or `save_reference`) wrote into the folder or URI `location`, with its manifest: the
    dataset if it matches the manifest's checksum; for a reference, the referenced folder's dataset if its content
    is the one the manifest names. None otherwise (never written, interrupted, changed or gone since)."""
    info = read_manifest(location)
    if info is None:
        return None
    if "dataset_folder" in info:
        folder = resolve_reference(location, info["dataset_folder"])
        loaded = load_verified_splits(folder, follow=False) if follow and folder is not None else None
        if loaded is None or content_sha256(loaded[0]) != info.get("content_sha256"):
            return None
        return loaded[0], info
    try:
        data = storage.read_bytes(storage.join(location, "dataset.npz"))
    except OSError:
        return None
    if hashlib.sha256(data).hexdigest() != info.get("dataset_sha256"):
        return None
    return _splits_from(data), info


def referenced_folder(location: str) -> str | None:
    """The folder whose dataset the manifest in `location` references; None for a copy of its own or no manifest."""
    return resolve_reference(location, (read_manifest(location) or {}).get("dataset_folder"))


def resolve_reference(location: str, folder: object) -> str | None:
    """`folder` as a manifest in `location` names it: an absolute path as it is, a relative one from `location`
    (its ".." steps up, keeping a URI's query); None for anything else."""
    if not isinstance(folder, str) or not folder or storage.is_uri(folder):
        return None
    if Path(folder).is_absolute():
        return folder
    resolved = location
    for part in folder.split("/"):
        if part == "..":
            resolved = storage.parent_of(resolved)
        elif part not in ("", "."):
            resolved = storage.join(resolved, part)
    return resolved


def read_manifest(location: str) -> dict | None:
    """The manifest.json in the folder or URI `location`; None where there is none that parses as an object."""
    try:
        info = json.loads(storage.read_bytes(storage.join(location, "manifest.json")))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _splits_from(npz: bytes) -> Splits:
    with np.load(io.BytesIO(npz), allow_pickle=False) as arrays:
        return Splits(
            **{name: LabeledImages(arrays[f"{name}_images"], arrays[f"{name}_labels"]) for name in _SPLIT_NAMES}
        )


_SPLIT_NAMES = ("train", "validation", "test")


def _named(splits: Splits):
    return [(name, getattr(splits, name)) for name in _SPLIT_NAMES]
