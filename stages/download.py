"""download: fetch the four MNIST files from an ordered list of mirrors into a verified cache.

A mirror is a folder holding the canonical file names, given as a local path, a `file://` URL or an `http(s)://`
URL. Files are verified by the sha256 of their *decompressed* content (mirrors recompress differently), written
under a temporary name and renamed into place, so the cache only ever holds complete, verified files.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Protocol, Sequence

import numpy as np

from stages.atomic import atomic_file, sweep_stale_parts
from stages.errors import BadInputError, DownloadError
from stages.redact import redact

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

_CHUNK = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b"


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


class _Transient(Exception):
    """A failure worth retrying on the same mirror (timeouts, resets, 5xx, short bodies)."""


class _Permanent(Exception):
    """A failure that retrying the same mirror will not fix (404, wrong bytes, no such file)."""


def download(
    mirrors: Sequence[str],
    cache_dir: Path,
    *,
    retries: int = 3,
    timeout_s: float = 30.0,
    backoff_s: float = 1.0,
    progress: ProgressFactory | None = None,
) -> RawFiles:
    """Makes sure the cache holds verified copies of the four MNIST files.

    Args:
      mirrors: tried in order for each file; see the module docstring for the accepted forms.
      cache_dir: where verified, decompressed files live; created if missing. Valid files there are not fetched.
      retries: further attempts on the same mirror after a transient failure, with exponential backoff.
      timeout_s: how long a network read may stall before it counts as a failure.
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
            _fetch_verified(name, sha256, target, mirrors, retries, timeout_s, backoff_s, progress)
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
    folder = _local_folder(mirror)
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
    backoff_s: float,
    progress: ProgressFactory | None,
) -> None:
    failures = []
    for mirror in mirrors:
        for attempt in range(retries + 1):
            try:
                with _open_from_mirror(mirror, name, timeout_s) as (source, total, where):
                    log.info("%s: fetching from %s", name, redact(where))
                    _write_verified(source, total, name, sha256, target, progress)
                log.info("%s: verified and cached (%s)", name, target)
                return
            except _Transient as error:
                if attempt < retries:
                    pause = backoff_s * 2**attempt
                    log.warning("%s from %s: %s; retrying in %.1fs", name, redact(mirror), error, pause)
                    time.sleep(pause)
                    continue
                failures.append(f"{redact(mirror)}: {error} (after {retries + 1} attempts)")
            except _Permanent as error:
                log.warning("%s from %s: %s; trying the next mirror", name, redact(mirror), error)
                failures.append(f"{redact(mirror)}: {error}")
            break
    raise DownloadError(
        f"could not download a verified {name} from any mirror ({'; '.join(failures) or 'no mirrors configured'}); "
        "point data.mirrors at a folder holding the MNIST files, e.g. --set 'data.mirrors=[/path/to/mnist]'"
    )


class _open_from_mirror:
    """Context manager yielding (binary stream, size or None, description) for `name` on `mirror`."""

    def __init__(self, mirror: str, name: str, timeout_s: float):
        self.mirror, self.name, self.timeout_s = mirror, name, timeout_s
        self._stream: BinaryIO | None = None

    def __enter__(self) -> tuple[BinaryIO, int | None, str]:
        if urllib.parse.urlsplit(self.mirror).scheme in ("http", "https"):
            url, request = _request_for(self.mirror, self.name + ".gz")
            try:
                response = urllib.request.urlopen(request, timeout=self.timeout_s)  # noqa: S310 (scheme checked)
            except urllib.error.HTTPError as error:
                failure = _Transient if error.code >= 500 or error.code == 429 else _Permanent
                raise failure(f"HTTP {error.code} {error.reason}") from None
            except (urllib.error.URLError, OSError) as error:
                raise _Transient(_describe(error)) from None
            except (ValueError, http.client.InvalidURL) as error:
                raise _Permanent(f"invalid URL: {error}") from None
            self._stream = response
            length = response.headers.get("Content-Length")
            return response, int(length) if length and length.isdigit() else None, url
        folder = _local_folder(self.mirror)
        for candidate in (folder / (self.name + ".gz"), folder / self.name):
            if candidate.is_file():
                self._stream = candidate.open("rb")
                return self._stream, candidate.stat().st_size, str(candidate)
        raise _Permanent(f"no {self.name}.gz or {self.name} in {folder}")

    def __exit__(self, *exc_info) -> None:
        if self._stream is not None:
            self._stream.close()


def _request_for(mirror: str, file_name: str) -> tuple[str, urllib.request.Request]:
    """The file's URL under `mirror` (its query kept) and a request carrying any user:password as basic auth."""
    parts = urllib.parse.urlsplit(mirror)
    path = parts.path.rstrip("/") + "/" + file_name
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port:
        netloc += f":{parts.port}"
    url = urllib.parse.urlunsplit((parts.scheme, netloc, path, parts.query, ""))
    request = urllib.request.Request(url)
    if parts.username:
        token = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        request.add_header("Authorization", "Basic " + base64.b64encode(token.encode()).decode())
    return url, request


def _write_verified(
    source: BinaryIO, total: int | None, name: str, sha256: str, target: Path, progress: ProgressFactory | None
) -> None:
    """Streams `source` (gzip or plain) into the cache; the file appears under `target` only if verified."""
    with atomic_file(target) as out:
        bar = progress(name, total) if progress else None
        try:
            digest = _copy_decompressing(source, out, total, name, bar)
        finally:
            if bar:
                bar.close()
        if digest != sha256:
            raise _Permanent(f"sha256 mismatch: got {digest[:12]}…, expected {sha256[:12]}…")


def _copy_decompressing(source: BinaryIO, out: BinaryIO, total: int | None, name: str, bar: Progress | None) -> str:
    """Copies `source` to `out`, gunzipping it if it is gzip; returns the sha256 of what was written."""
    digest = hashlib.sha256()
    inflater: zlib._Decompress | None = None
    received = 0
    next_report = 0.25
    while chunk := _read(source, received):
        if received == 0 and chunk[:2] == _GZIP_MAGIC:
            inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        received += len(chunk)
        try:
            data = inflater.decompress(chunk) if inflater else chunk
        except zlib.error as error:
            raise _Permanent(f"corrupt gzip data: {error}") from None
        digest.update(data)
        out.write(data)
        if bar:
            bar.update(len(chunk))
        elif total and total > _CHUNK and received / total >= next_report:
            log.info("%s: %3.0f%% of %.1f MB", name, 100 * received / total, total / 1e6)
            next_report += 0.25
    if inflater is not None:
        if not inflater.eof:
            raise _Transient(f"truncated gzip stream after {received} bytes")
        tail = inflater.flush()
        digest.update(tail)
        out.write(tail)
    if total is not None and received != total:
        raise _Transient(f"got {received} of {total} bytes")
    return digest.hexdigest()


def _read(source: BinaryIO, received: int) -> bytes:
    """One chunk from a mirror; network trouble becomes a transient failure."""
    try:
        return source.read(_CHUNK)
    except http.client.IncompleteRead:
        raise _Transient(f"connection closed early after {received} bytes") from None
    except OSError as error:  # timeouts and resets
        raise _Transient(_describe(error)) from None


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _local_folder(mirror: str) -> Path:
    parts = urllib.parse.urlsplit(mirror)
    if parts.scheme == "file":
        return Path(urllib.request.url2pathname(parts.path))
    return Path(mirror).expanduser()


def _describe(error: BaseException) -> str:
    reason = getattr(error, "reason", None)
    if isinstance(error, TimeoutError) or isinstance(reason, TimeoutError):
        return "timed out"
    return str(reason or error) or type(error).__name__
