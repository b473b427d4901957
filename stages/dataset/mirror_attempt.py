"""mirror_attempt: one bounded attempt at one file on one mirror, opened and copied out decompressed.

What the download stage asks of a mirror, whichever it is and in whatever order it tries them, is one file; this
module makes that request and holds it to bounds, because a mirror may be broken or hostile and the stage must still
end, in bounded memory and disk, with a clear reason for every mirror it gave up on:

- known sizes: the file's decompressed size bounds what a mirror may send, both the output (a gzip bomb or an endless
  plain body stops at the file's size) and the input (compressed bytes that inflate to nothing stop at the most any
  gzip of the file takes), and a Content-Length or local file larger than that is refused before a byte is read;
- a deadline: an attempt has an overall time limit, kept by a watchdog that cuts its connections, so a body or header
  drip-fed a byte at a time (which never lets the per-read timeout fire) still ends;
- regular files: a local mirror's files are read only if they are regular files (a FIFO would block for ever,
  /dev/zero never ends);
- credentials stay home: a mirror's user and password go only to the mirror's own origin, never to where a redirect
  points.

Every failure is either `Transient` (worth retrying on the same mirror) or `Permanent` (try the next mirror); which
mirrors are tried, how often, and whether the bytes are the right ones is the download stage's business
(stages.download), as is the cache the copy is written into.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
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
from typing import BinaryIO, Callable, Iterator, Protocol

CHUNK = 1 << 20  # the most read, or inflated, at a time: with the temporary file's buffer, all an attempt holds
_GZIP_MAGIC = b"\x1f\x8b"


class Transient(Exception):
    """A failure worth retrying on the same mirror (timeouts, resets, 5xx, short bodies)."""


class Permanent(Exception):
    """A failure that retrying the same mirror will not fix (404, wrong bytes, no such file, too many bytes).

    Missing the deadline is one too: the mirror had the whole deadline, far more than a sound mirror needs,
    and a retry would spend it again (`retries` + 1 times per file) before the next mirror is tried.
    """


@dataclass(frozen=True)
class Limits:
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

    def check_offered(self, offered: int | None) -> None:
        """Refuses a file whose announced size (Content-Length, a local file's size) no gzip of it reaches: before
        a byte is read or a temporary file made."""
        if offered is not None and offered > self.most_sent:
            raise Permanent(self.too_big(offered))

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


class Source(Protocol):
    def read1(self, size: int = ..., /) -> bytes: ...
    def close(self) -> None: ...


class Deadline:
    """One attempt's overall time limit, which no way of stalling escapes.

    The per-read timeout never fires on a mirror that sends a byte every few seconds, in its body or in its status
    line and headers (where http.client reads whole lines). So past the deadline a watchdog thread shuts down the
    attempt's connections, which wakes a read blocked on them; the reader then sees `passed` and fails the attempt.
    Local files need no watchdog: only regular files are read, and `passed` is checked between reads.
    """

    def __init__(self, limits: Limits):
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
            raise Permanent(self.limits.too_slow(received))

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

    deadline: Deadline

    def do_open(
        self, http_class: type[http.client.HTTPConnection], req: urllib.request.Request, **http_conn_args: object
    ) -> http.client.HTTPResponse:
        def connection(host: str, **kwargs: object) -> http.client.HTTPConnection:
            return self.deadline.watch(http_class(host, **kwargs))  # type: ignore[arg-type]

        return super().do_open(connection, req, **http_conn_args)  # type: ignore[misc]


class _WatchedHTTPHandler(_WatchedConnections, urllib.request.HTTPHandler):
    def __init__(self, deadline: Deadline):
        super().__init__()
        self.deadline = deadline


class _WatchedHTTPSHandler(_WatchedConnections, urllib.request.HTTPSHandler):
    def __init__(self, deadline: Deadline):
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


class open_from_mirror:
    """Context manager yielding (binary stream, size or None, description) for `name` on `mirror`."""

    def __init__(self, mirror: str, name: str, timeout_s: float, deadline: Deadline):
        self.mirror, self.name, self.timeout_s, self.deadline = mirror, name, timeout_s, deadline
        self._stream: Source | None = None

    def __enter__(self) -> tuple[Source, int | None, str]:
        try:
            if urllib.parse.urlsplit(self.mirror).scheme in ("http", "https"):
                return self._open_url()
            return self._open_local()
        except BaseException:
            self.deadline.stop()
            raise

    def _open_url(self) -> tuple[Source, int | None, str]:
        url, request = _request_for(self.mirror, self.name + ".gz")
        opener = urllib.request.build_opener(
            _WatchedHTTPHandler(self.deadline), _WatchedHTTPSHandler(self.deadline), _CredentialsStayHome()
        )
        try:
            response = opener.open(request, timeout=self.timeout_s)
        except urllib.error.HTTPError as error:
            failure = Transient if error.code >= 500 or error.code == 429 else Permanent
            raise failure(f"HTTP {error.code} {error.reason}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
            self.deadline.check(None)  # the watchdog cut a response that never came
            untrusted = getattr(error, "reason", error)
            if isinstance(untrusted, ssl.SSLCertVerificationError):  # retrying will not make it trusted
                raise Permanent(f"its TLS certificate is not trusted ({untrusted.verify_message})") from None
            raise Transient(_describe(error)) from None
        except (ValueError, http.client.InvalidURL) as error:
            raise Permanent(f"invalid URL: {error}") from None
        self._stream = response
        length = response.headers.get("Content-Length")
        return response, int(length) if length and length.isdigit() else None, url

    def _open_local(self) -> tuple[Source, int | None, str]:
        folder = local_folder(self.mirror)
        for candidate in (folder / (self.name + ".gz"), folder / self.name):
            if (opened := _open_regular_file(candidate)) is not None:
                self._stream = opened
                return opened, os.fstat(opened.fileno()).st_size, str(candidate)
        raise Permanent(f"no {self.name}.gz or {self.name} in {folder}")

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
        raise Permanent(f"cannot read {path}: {error.strerror or error}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise Permanent(f"{path} is not a regular file")
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


def local_folder(mirror: str) -> Path:
    """The folder a local mirror names: a path (`~` expanded) or a `file://` URL."""
    parts = urllib.parse.urlsplit(mirror)
    if parts.scheme == "file":
        return Path(urllib.request.url2pathname(parts.path))
    return Path(mirror).expanduser()


def copy_decompressing(
    source: Source,
    out: BinaryIO,
    total: int | None,
    limits: Limits,
    deadline: Deadline,
    on_received: Callable[[int], None],
) -> str:
    """Copies `source` to `out`, gunzipping it if it is gzip; returns the sha256 of what was written.

    Stops as soon as the mirror sends more than a gzip of the file takes, or it inflates to more than the file has.
    `on_received` is told the size of each piece the mirror sends, once it is written (for a progress report).
    """
    digest = hashlib.sha256()
    inflater: zlib._Decompress | None = None
    received = written = 0
    for chunk in _chunks(source, deadline):
        if received == 0 and chunk[:2] == _GZIP_MAGIC:
            inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        received += len(chunk)
        if inflater is None or not inflater.eof:  # bytes after the gzip stream are ignored, as before, not kept
            for data in _inflate(inflater, chunk, limits.size - written) if inflater else (chunk,):
                written += len(data)
                if written > limits.size:
                    raise Permanent(limits.too_much_data(gzipped=inflater is not None))
                digest.update(data)
                out.write(data)
        if received > limits.most_sent:  # after the output's bound, which a plain body meets first
            raise Permanent(limits.too_much_sent())
        on_received(len(chunk))
    if inflater is not None and not inflater.eof:
        raise Transient(f"truncated gzip stream after {received} bytes")
    if total is not None and received != total:
        raise Transient(f"got {received} of {total} bytes")
    return digest.hexdigest()


def _inflate(inflater: zlib._Decompress, chunk: bytes, room: int) -> Iterator[bytes]:
    """`chunk` inflated a piece at a time: at most CHUNK bytes each, and room + 1 in all, enough to tell that the
    output outgrows the file; whatever the chunk would inflate to (a 1 MB gzip bomb: 1 GB), memory stays small.

    At the end of the stream zlib has handed out all its output (eof), so there is nothing left to flush.
    """
    while room >= 0:
        limit = min(CHUNK, room + 1)
        try:
            piece = inflater.decompress(chunk, limit)
        except zlib.error as error:
            raise Permanent(f"corrupt gzip data: {error}") from None
        room -= len(piece)
        yield piece
        chunk = inflater.unconsumed_tail
        if inflater.eof or (not chunk and len(piece) < limit):
            return


def _chunks(source: Source, deadline: Deadline) -> Iterator[bytes]:
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


def _read(source: Source, received: int, deadline: Deadline) -> bytes:
    """One chunk from a mirror, whatever has arrived (read1: a drip-fed body cannot hold one read for ever);
    network trouble becomes a transient failure, and the deadline's passing (the watchdog's cut) a permanent one."""
    try:
        chunk = source.read1(CHUNK)
    except http.client.IncompleteRead:
        deadline.check(received)
        raise Transient(f"connection closed early after {received} bytes") from None
    except (OSError, http.client.HTTPException) as error:  # timeouts and resets
        deadline.check(received)
        raise Transient(_describe(error)) from None
    deadline.check(received + len(chunk))
    return chunk


def _describe(error: BaseException) -> str:
    reason = getattr(error, "reason", None)
    if isinstance(error, TimeoutError) or isinstance(reason, TimeoutError):
        return "timed out"
    return str(reason or error) or type(error).__name__
