"""download: fetch the four MNIST files from an ordered list of mirrors into a verified cache.

A mirror is a folder holding the canonical file names, given as a local path, a `file://` URL or an `http(s)://`
URL. Files are verified by the sha256 of their *decompressed* content (mirrors recompress differently), written
under a temporary name and renamed into place, so the cache only ever holds complete, verified files.

A mirror may be broken or hostile, so every attempt is bounded: it stops at the file's known size (decompressed
output, and compressed input too: a gzip bomb or an endless body can neither fill memory nor the disk), at an
overall deadline (a body drip-fed a byte at a time never lets the per-read timeout fire), and a local mirror's
files are read only if they are regular files (a FIFO would block for ever, /dev/zero never ends).
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import logging
import os
import socket
import ssl
import stat
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Protocol, Sequence

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

_CHUNK = 1 << 20  # the most read, or inflated, at a time: with the temporary file's buffer, all an attempt holds
_GZIP_MAGIC = b"\x1f\x8b"
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


class _Transient(Exception):
    """A failure worth retrying on the same mirror (timeouts, resets, 5xx, short bodies)."""


class _Permanent(Exception):
    """A failure that retrying the same mirror will not fix (404, wrong bytes, no such file, too many bytes).

    Missing the deadline is one too: the mirror had the whole deadline, far more than a sound mirror needs,
    and a retry would spend it again (`retries` + 1 times per file) before the next mirror is tried.
    """


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
            limits = _Limits(name, size, deadline_s)
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
    folder = _local_folder(mirror)
    if not folder.is_dir():
        problem = "is a file, not a folder" if folder.exists() else "no such folder"
        raise BadInputError(f"mirror {mirror!r}: {problem} ({folder})")


@dataclass(frozen=True)
class _Limits:
    """What one attempt at one file may take: the file's known size bounds what it sends, the deadline its time."""

    name: str
    size: int  # decompressed: exactly what the file has
    deadline_s: float

    @property
    def most_sent(self) -> int:
        """The most bytes a mirror may send: a gzip of the file, with room for gzip's overhead on incompressible
        data (zlib's stored blocks: 5 bytes per 64 KiB) and a generous header. MNIST compresses 5:1, so a real
        mirror sends far less; a plain, uncompressed body must be exactly `size` (checked as it inflates)."""
        return self.size + self.size // 1000 + 64 * 1024

    def too_big(self, offered: int) -> str:
        return (
            f"offers {offered:,} bytes; a gzip of the {self.size:,}-byte {self.name} takes at most {self.most_sent:,}"
        )

    def too_much_sent(self) -> str:
        return f"sends more than {self.most_sent:,} bytes, more than any gzip of the {self.size:,}-byte {self.name}"

    def too_much_data(self, gzipped: bool) -> str:
        if gzipped:
            return f"inflates to more than the {self.size:,} bytes {self.name} has (a gzip bomb?)"
        return f"sends more than the {self.size:,} bytes {self.name} has"

    def too_slow(self, received: int | None) -> str:
        got = "no response" if received is None else f"{received:,} bytes received"
        return f"no complete file within the {self.deadline_s:g} s deadline ({got})"


def _fetch_verified(
    name: str,
    sha256: str,
    target: Path,
    mirrors: Sequence[str],
    retries: int,
    timeout_s: float,
    limits: _Limits,
    backoff_s: float,
    progress: ProgressFactory | None,
) -> None:
    failures = []
    for mirror in mirrors:
        for attempt in range(retries + 1):
            try:
                deadline = _Deadline(limits)
                with _open_from_mirror(mirror, name, timeout_s, deadline) as (source, total, where):
                    log.info("%s: fetching from %s", name, redact(where))
                    if total is not None and total > limits.most_sent:
                        raise _Permanent(limits.too_big(total))  # before a byte is read or a temporary file made
                    _write_verified(source, total, name, sha256, target, progress, limits, deadline)
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


class _Source(Protocol):
    def read1(self, size: int = ..., /) -> bytes: ...
    def close(self) -> None: ...


class _Deadline:
    """One attempt's overall time limit, which no way of stalling escapes.

    The per-read timeout never fires on a mirror that sends a byte every few seconds, in its body or in its status
    line and headers (where http.client reads whole lines). So past the deadline a watchdog thread shuts down the
    attempt's connections, which wakes a read blocked on them; the reader then sees `passed` and fails the attempt.
    Local files need no watchdog: only regular files are read, and `passed` is checked between reads.
    """

    def __init__(self, limits: _Limits):
        self.limits = limits
        self._ends = time.monotonic() + limits.deadline_s
        self._connections: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._watchdog: threading.Thread | None = None

    @property
    def passed(self) -> bool:
        return time.monotonic() >= self._ends

    def check(self, received: int | None) -> None:
        if self.passed:
            raise _Permanent(self.limits.too_slow(received))

    def watch(self, connection: http.client.HTTPConnection) -> http.client.HTTPConnection:
        with self._lock:
            self._connections.append(connection)
            if self._watchdog is None:
                self._watchdog = threading.Thread(target=self._cut_when_passed, name="download-deadline", daemon=True)
                self._watchdog.start()
        return connection

    def stop(self) -> None:
        """Ends the watchdog; called before the connections are closed, so it never touches a closed socket."""
        self._done.set()
        if self._watchdog is not None:
            self._watchdog.join()

    def _cut_when_passed(self) -> None:
        if self._done.wait(max(0.0, self._ends - time.monotonic())):
            return
        cut: list[socket.socket] = []  # each socket once; keep looking: one may still be connecting, or become TLS
        while True:
            with self._lock:
                sockets = [c.sock for c in self._connections if c.sock is not None]
            for sock in sockets:
                if not any(sock is done for done in cut):
                    cut.append(sock)
                    try:
                        socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the plain socket's: TLS state untouched
                    except OSError:
                        pass  # already closed
            if self._done.wait(0.1):
                return


class _WatchedConnections:
    """Mixed into urllib's HTTP(S) handlers: every connection they make is handed to the attempt's deadline."""

    deadline: _Deadline

    def do_open(
        self, http_class: type[http.client.HTTPConnection], req: urllib.request.Request, **http_conn_args: object
    ) -> http.client.HTTPResponse:
        def connection(host: str, **kwargs: object) -> http.client.HTTPConnection:
            return self.deadline.watch(http_class(host, **kwargs))  # type: ignore[arg-type]

        return super().do_open(connection, req, **http_conn_args)  # type: ignore[misc]


class _WatchedHTTPHandler(_WatchedConnections, urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self.deadline = deadline


class _WatchedHTTPSHandler(_WatchedConnections, urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self.deadline = deadline


class _CredentialsStayHome(urllib.request.HTTPRedirectHandler):
    """Follows a mirror's redirects (at most urllib's 10), sending the mirror's user and password only to the
    mirror's own origin: urllib would forward them to wherever a redirect points, another host or plain http."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 (urllib's signature)
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and _origin(new.full_url) != _origin(req.full_url):
            new.remove_header("Authorization")
        return new


def _origin(url: str) -> tuple[str, str | None, int | None]:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, parts.hostname, parts.port or {"http": 80, "https": 443}.get(parts.scheme)


class _open_from_mirror:
    """Context manager yielding (binary stream, size or None, description) for `name` on `mirror`."""

    def __init__(self, mirror: str, name: str, timeout_s: float, deadline: _Deadline):
        self.mirror, self.name, self.timeout_s, self.deadline = mirror, name, timeout_s, deadline
        self._stream: _Source | None = None

    def __enter__(self) -> tuple[_Source, int | None, str]:
        try:
            if urllib.parse.urlsplit(self.mirror).scheme in ("http", "https"):
                return self._open_url()
            return self._open_local()
        except BaseException:
            self.deadline.stop()
            raise

    def _open_url(self) -> tuple[_Source, int | None, str]:
        url, request = _request_for(self.mirror, self.name + ".gz")
        opener = urllib.request.build_opener(
            _WatchedHTTPHandler(self.deadline), _WatchedHTTPSHandler(self.deadline), _CredentialsStayHome()
        )
        try:
            response = opener.open(request, timeout=self.timeout_s)
        except urllib.error.HTTPError as error:
            failure = _Transient if error.code >= 500 or error.code == 429 else _Permanent
            raise failure(f"HTTP {error.code} {error.reason}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
            self.deadline.check(None)  # the watchdog cut a response that never came
            untrusted = getattr(error, "reason", error)
            if isinstance(untrusted, ssl.SSLCertVerificationError):  # retrying will not make it trusted
                raise _Permanent(f"its TLS certificate is not trusted ({untrusted.verify_message})") from None
            raise _Transient(_describe(error)) from None
        except (ValueError, http.client.InvalidURL) as error:
            raise _Permanent(f"invalid URL: {error}") from None
        self._stream = response
        length = response.headers.get("Content-Length")
        return response, int(length) if length and length.isdigit() else None, url

    def _open_local(self) -> tuple[_Source, int | None, str]:
        folder = _local_folder(self.mirror)
        for candidate in (folder / (self.name + ".gz"), folder / self.name):
            if (opened := _open_regular_file(candidate)) is not None:
                self._stream = opened
                return opened, os.fstat(opened.fileno()).st_size, str(candidate)
        raise _Permanent(f"no {self.name}.gz or {self.name} in {folder}")

    def __exit__(self, *exc_info) -> None:
        self.deadline.stop()
        if self._stream is not None:
            self._stream.close()


def _open_regular_file(path: Path) -> BinaryIO | None:
    """`path` opened for reading if it is a regular file; None if nothing is there.

    Opened without blocking and checked once open, not before (where it could still change): opening a FIFO
    waits for a writer for ever, and a device like /dev/zero never ends.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        return None
    except OSError as error:
        raise _Permanent(f"cannot read {path}: {error.strerror or error}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _Permanent(f"{path} is not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


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
    source: _Source,
    total: int | None,
    name: str,
    sha256: str,
    target: Path,
    progress: ProgressFactory | None,
    limits: _Limits,
    deadline: _Deadline,
) -> None:
    """Streams `source` (gzip or plain) into the cache; the file appears under `target` only if verified."""
    with atomic_file(target) as out:
        bar = progress(name, total) if progress else None
        try:
            digest = _copy_decompressing(source, out, total, name, bar, limits, deadline)
        finally:
            if bar:
                bar.close()
        if digest != sha256:
            raise _Permanent(f"sha256 mismatch: got {digest[:12]}…, expected {sha256[:12]}…")


def _copy_decompressing(
    source: _Source,
    out: BinaryIO,
    total: int | None,
    name: str,
    bar: Progress | None,
    limits: _Limits,
    deadline: _Deadline,
) -> str:
    """Copies `source` to `out`, gunzipping it if it is gzip; returns the sha256 of what was written.

    Stops as soon as the mirror sends more than a gzip of the file takes, or it inflates to more than the file has.
    """
    digest = hashlib.sha256()
    inflater: zlib._Decompress | None = None
    received = written = 0
    next_report = 0.25
    for chunk in _chunks(source, deadline):
        if received == 0 and chunk[:2] == _GZIP_MAGIC:
            inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        received += len(chunk)
        if inflater is None or not inflater.eof:  # bytes after the gzip stream are ignored, as before, not kept
            for data in _inflate(inflater, chunk, limits.size - written) if inflater else (chunk,):
                written += len(data)
                if written > limits.size:
                    raise _Permanent(limits.too_much_data(gzipped=inflater is not None))
                digest.update(data)
                out.write(data)
        if received > limits.most_sent:  # after the output's bound, which a plain body meets first
            raise _Permanent(limits.too_much_sent())
        if bar:
            bar.update(len(chunk))
        elif total and total > _CHUNK and received / total >= next_report:
            log.info("%s: %3.0f%% of %.1f MB", name, 100 * received / total, total / 1e6)
            next_report += 0.25
    if inflater is not None and not inflater.eof:
        raise _Transient(f"truncated gzip stream after {received} bytes")
    if total is not None and received != total:
        raise _Transient(f"got {received} of {total} bytes")
    return digest.hexdigest()


def _inflate(inflater: zlib._Decompress, chunk: bytes, room: int) -> Iterator[bytes]:
    """`chunk` inflated a piece at a time: at most _CHUNK bytes each, and room + 1 in all, enough to tell that the
    output outgrows the file; whatever the chunk would inflate to (a 1 MB gzip bomb: 1 GB), memory stays small.

    At the end of the stream zlib has handed out all its output (eof), so there is nothing left to flush.
    """
    while room >= 0:
        limit = min(_CHUNK, room + 1)
        try:
            piece = inflater.decompress(chunk, limit)
        except zlib.error as error:
            raise _Permanent(f"corrupt gzip data: {error}") from None
        room -= len(piece)
        yield piece
        chunk = inflater.unconsumed_tail
        if inflater.eof or (not chunk and len(piece) < limit):
            return


def _chunks(source: _Source, deadline: _Deadline) -> Iterator[bytes]:
    """The mirror's bytes as they arrive; the first chunk holds the two bytes that tell gzip, unless the body is
    shorter (a slow mirror's first read may bring just one)."""
    head = b""
    while len(head) < 2 and (chunk := _read(source, len(head), deadline)):
        head += chunk
    if head:
        yield head
    received = len(head)
    while chunk := _read(source, received, deadline):
        received += len(chunk)
        yield chunk


def _read(source: _Source, received: int, deadline: _Deadline) -> bytes:
    """One chunk from a mirror, whatever has arrived (read1: a drip-fed body cannot hold one read for ever);
    network trouble becomes a transient failure, and the deadline's passing (the watchdog's cut) a permanent one."""
    try:
        chunk = source.read1(_CHUNK)
    except http.client.IncompleteRead:
        deadline.check(received)
        raise _Transient(f"connection closed early after {received} bytes") from None
    except (OSError, http.client.HTTPException) as error:  # timeouts and resets
        deadline.check(received)
        raise _Transient(_describe(error)) from None
    deadline.check(received + len(chunk))
    return chunk


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
