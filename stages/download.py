"""download: fetch the four MNIST files from an ordered list of mirrors into a verified cache.

A mirror is a folder holding the canonical file names, given as a local path, a `file://` URL or an `http(s)://`
URL. Files are verified by the sha256 of their *decompressed* content (mirrors recompress differently), written
under a temporary name and renamed into place, so the cache only ever holds complete, verified files.

A mirror may be broken or hostile, so every attempt at one file on one mirror is bounded (by the file's known size,
an overall deadline, regular files only, credentials kept to the mirror's origin): stages.dataset.mirror_attempt
makes the attempt and holds it to those bounds; this module decides what is fetched, from which mirrors in what
order, how often a failure is retried, and what is kept.
"""

from __future__ import annotations

import hashlib
import logging
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np

from stages.common.atomic import atomic_file, sweep_stale_parts
from stages.common.errors import BadInputError, DownloadError
from stages.common.redact import redact
from stages.dataset.mirror_attempt import (
    CHUNK,
    Deadline,
    Limits,
    Permanent,
    Source,
    Transient,
    copy_decompressing,
    local_folder,
    open_from_mirror,
)

log = logging.getLogger(__name__)

# Canonical content of the decompressed files: (sha256, size in bytes). Every public mirror serves these bytes.
CANONICAL_FILES: dict[str, tuple[str, int]] = {
    "train-images-idx3-ubyte": ("ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db", 47040016),
    "train-labels-idx1-ubyte": ("65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5", 60008),
    "t10k-images-idx3-ubyte": ("0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7", 7840016),
    "t10k-labels-idx1-ubyte": ("ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2", 10008),
}

# The mirrors torchvision and TensorFlow Datasets download MNIST from.
DEFAULT_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

DEFAULT_DEADLINE_S = 600.0  # 9.9 MB of gzip (the largest file) in 10 minutes: a 17 KB/s link still makes it


@dataclass(frozen=True)
class RawFiles:
    """The four verified, decompressed IDX files in the cache."""

    train_images: Path
    train_labels: Path
    test_images: Path
    test_labels: Path

    @property
    def sha256(self) -> dict[str, str]:
        return canonical_sha256()

    def read(self) -> RawData:
        """The files' contents, to hand to a stage that may run on another node (through Ray's object store)."""
        return RawData(**{
            field: np.fromfile(getattr(self, field), dtype=np.uint8) for field in self.__dataclass_fields__
        })


@dataclass(frozen=True)
class RawData:
    """The four verified, decompressed IDX files in memory, each a uint8 array of the whole file.

    This, not a path, is what the download stage hands to preprocess: nodes of a cluster share no disk, so the
    node that parses the files may not be the one whose cache holds them. In Ray's object store it costs 55 MB.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray

    @property
    def sha256(self) -> dict[str, str]:
        return canonical_sha256()


def canonical_sha256() -> dict[str, str]:
    """The sha256 of each canonical file, by name: what every verified download holds."""
    return {name: sha256 for name, (sha256, _) in CANONICAL_FILES.items()}


class Progress(Protocol):
    def update(self, received_bytes: int) -> None: ...
    def close(self) -> None: ...


ProgressFactory = Callable[[str, "int | None"], Progress]  # (file name, bytes expected if known) -> a bar


class _LoggedProgress:
    """Progress without a bar: logged every 25 % of a transfer whose size is known and over one chunk."""

    def __init__(self, name: str, total: int | None):
        self.name, self.total = name, total
        self.received = 0
        self.next_report = 0.25

    def update(self, received_bytes: int) -> None:
        self.received += received_bytes
        total = self.total
        if total and total > CHUNK and self.received / total >= self.next_report:
            log.info("%s: %3.0f%% of %.1f MB", self.name, 100 * self.received / total, total / 1e6)
            self.next_report += 0.25

    def close(self) -> None:
        pass


def download(
    mirrors: Sequence[str],
    cache_dir: Path,
    *,
    retries: int = 3,
    timeout_s: float = 30.0,
    deadline_s: float = DEFAULT_DEADLINE_S,
    backoff_s: float = 1.0,
    progress: ProgressFactory | None = None,
) -> RawFiles:
    """Makes sure the cache holds verified copies of the four MNIST files.

    Args:
      mirrors: tried in order for each file; see the module docstring for the accepted forms.
      cache_dir: where verified, decompressed files live; created if missing. Valid files there are not fetched.
      retries: further attempts on the same mirror after a transient failure, with exponential backoff.
      timeout_s: how long a network read may stall before it counts as a failure.
      deadline_s: how long one attempt at one file may take in all; a mirror that misses it is not retried.
      backoff_s: the first pause between attempts; it doubles each time.
      progress: makes a progress bar for each transfer (file name, bytes expected if known); without one,
        progress is logged every 25 %.

    Returns:
      The paths of the four files.

    Raises:
      DownloadError: some file could not be fetched and verified from any mirror.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    for leftover in sweep_stale_parts(cache_dir):
        log.info("removed %s, left by a download that was killed", leftover.name)
    paths = {}
    for name, (sha256, size) in CANONICAL_FILES.items():
        target = cache_dir / name
        if target.is_file() and target.stat().st_size == size and _sha256_of(target) == sha256:
            log.info("%s: cached and verified (%s)", name, target)
        else:
            limits = Limits(name, size, deadline_s)
            _fetch_verified(name, sha256, target, mirrors, retries, timeout_s, limits, backoff_s, progress)
        paths[name] = target
    return RawFiles(
        train_images=paths["train-images-idx3-ubyte"],
        train_labels=paths["train-labels-idx1-ubyte"],
        test_images=paths["t10k-images-idx3-ubyte"],
        test_labels=paths["t10k-labels-idx1-ubyte"],
    )


def check_mirror(mirror: str) -> None:
    """Refuses a mirror whose form can never work (unknown scheme, missing local folder), before anything runs."""
    scheme = urllib.parse.urlsplit(mirror).scheme
    if scheme in ("http", "https"):
        return
    if scheme not in ("", "file") and len(scheme) > 1:  # one letter: a Windows drive, not a scheme
        raise BadInputError(
            f"unsupported mirror scheme '{scheme}://' in {redact(mirror)!r} (use a path, file://, http(s)://)"
        )
    folder = local_folder(mirror)
    if not folder.is_dir():
        problem = "is a file, not a folder" if folder.exists() else "no such folder"
        raise BadInputError(f"mirror {mirror!r}: {problem} ({folder})")


def _fetch_verified(
    name: str,
    sha256: str,
    target: Path,
    mirrors: Sequence[str],
    retries: int,
    timeout_s: float,
    limits: Limits,
    backoff_s: float,
    progress: ProgressFactory | None,
) -> None:
    failures = []
    for mirror in mirrors:
        for attempt in range(retries + 1):
            try:
                deadline = Deadline(limits)
                with open_from_mirror(mirror, name, timeout_s, deadline) as (source, total, where):
                    log.info("%s: fetching from %s", name, redact(where))
                    limits.check_offered(total)  # before a byte is read or a temporary file made
                    _write_verified(source, total, name, sha256, target, progress, limits, deadline)
                log.info("%s: verified and cached (%s)", name, target)
                return
            except Transient as error:
                if attempt < retries:
                    pause = backoff_s * 2**attempt
                    log.warning("%s from %s: %s; retrying in %.1fs", name, redact(mirror), error, pause)
                    time.sleep(pause)
                    continue
                failures.append(f"{redact(mirror)}: {error} (after {retries + 1} attempts)")
            except Permanent as error:
                log.warning("%s from %s: %s; trying the next mirror", name, redact(mirror), error)
                failures.append(f"{redact(mirror)}: {error}")
            break
    raise DownloadError(
        f"could not download a verified {name} from any mirror ({'; '.join(failures) or 'no mirrors configured'}); "
        "point data.mirrors at a folder holding the MNIST files, e.g. --set 'data.mirrors=[/path/to/mnist]'"
    )


def _write_verified(
    source: Source,
    total: int | None,
    name: str,
    sha256: str,
    target: Path,
    progress: ProgressFactory | None,
    limits: Limits,
    deadline: Deadline,
) -> None:
    """Streams `source` (gzip or plain) into the cache; the file appears under `target` only if verified."""
    with atomic_file(target) as out:
        bar = progress(name, total) if progress else _LoggedProgress(name, total)
        try:
            digest = copy_decompressing(source, out, total, limits, deadline, bar.update)
        finally:
            bar.close()
        if digest != sha256:
            raise Permanent(f"sha256 mismatch: got {digest[:12]}…, expected {sha256[:12]}…")


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
