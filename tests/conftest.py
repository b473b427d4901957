"""Shared fixtures: the real MNIST mirror beside the repo, a loopback HTTP mirror, and a verified cache."""

from __future__ import annotations

import gzip
import http.server
import os
import struct
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# resolved: test nodes with private disks see the mirror at its real place, not through a link in their /tmp
SHARED_MNIST = Path(os.environ.get("MNIST_MIRROR", REPO.parent / "shared" / "mnist")).resolve()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The e2e modules (minutes each) first: pytest-xdist hands out modules in this order (`--dist loadfile`), so
    the short ones fill the workers' last minutes instead of one long module running alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("e2e") is None)  # stable: each group keeps its order


@pytest.fixture(scope="session")
def mnist_mirror() -> Path:
    """The folder of real MNIST .gz files (../shared/mnist, or $MNIST_MIRROR)."""
    if not (SHARED_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"real MNIST not found in {SHARED_MNIST}; set MNIST_MIRROR to a folder holding the four .gz files")
    return SHARED_MNIST


@pytest.fixture(scope="session")
def raw_files(mnist_mirror, tmp_path_factory):
    """The four verified IDX files, downloaded once per test session from the real mirror."""
    from stages.download import download

    return download([str(mnist_mirror)], tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def raw_data(raw_files):
    """The four verified IDX files' contents: what the download stage hands to preprocess."""
    return raw_files.read()


class MirrorHandler(http.server.BaseHTTPRequestHandler):
    """Serves the real files under /ok/, and each kind of broken mirror under its own prefix.

    /ok/NAME          the file
    /missing/NAME     404
    /error/NAME       500, always
    /flaky/NAME       500 on the first request for each file, then the file
    /truncated/NAME   announces the full length, sends half, closes
    /corrupt/NAME     a well-formed gzip of wrong content (checksum mismatch)
    /slow/NAME        stalls longer than the client's timeout
    /trickle/NAME     the file, slowly (64 KiB every 50 ms): a download that is still running when a test kills it

    Hostile mirrors (see gzip_bomb and `HOSTILE`):
    /bomb/NAME        a 2 MB gzip (Content-Length given) that inflates to 2 GiB of zeros
    /endless/NAME     zeros for ever (no Content-Length: the body ends when the connection does)
    /padded/NAME      a gzip stream for ever that inflates to nothing (empty deflate blocks), no Content-Length
    /drip/NAME        the file's true Content-Length, then its bytes one every 0.5 s
    /dripheaders/NAME the status line and headers one byte every 0.5 s
    /huge/NAME        announces a Content-Length of 1 TB, then sends zeros for ever
    /redirect-away/NAME   302 to /ok/NAME on another origin (localhost instead of 127.0.0.1)
    /redirect-home/NAME   302 to /ok/NAME on this origin
    """

    HOSTILE = ("bomb", "endless", "padded", "drip", "dripheaders", "huge")

    folder: Path
    requests: list[str]
    authorizations: list[str | None]
    flaky_seen: set[str]

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        self.requests.append(self.path)
        self.authorizations.append(self.headers.get("Authorization"))
        _, behaviour, name = self.path.partition("?")[0].split("/", 2)
        if behaviour in self.HOSTILE:
            try:
                return getattr(self, f"_send_{behaviour}")(self.folder / name)
            except (BrokenPipeError, ConnectionResetError):
                return  # the downloader gave up on us: what these behaviours are for
        if behaviour in ("redirect-away", "redirect-home"):  # to the same files on another origin, or this one
            host = "localhost" if behaviour == "redirect-away" else "127.0.0.1"
            self.send_response(302)
            self.send_header("Location", f"http://{host}:{self.server.server_address[1]}/ok/{name}")
            self.send_header("Content-Length", "0")
            return self.end_headers()
        source = self.folder / name
        if behaviour == "missing" or not source.is_file():
            return self.send_error(404, "Not Found")
        if behaviour == "error":
            return self.send_error(500, "Internal Server Error")
        if behaviour == "flaky" and name not in self.flaky_seen:
            self.flaky_seen.add(name)
            return self.send_error(503, "Service Unavailable")
        body = source.read_bytes()
        if behaviour == "corrupt":
            body = gzip.compress(b"\0" * len(gzip.decompress(body)))
        if behaviour == "slow":
            time.sleep(3)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if behaviour == "truncated":
            body = body[: len(body) // 2]
        if behaviour == "trickle":
            try:
                for start in range(0, len(body), 65536):
                    self.wfile.write(body[start : start + 65536])
                    time.sleep(0.05)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the downloader was killed: what this behaviour is for
            return
        self.wfile.write(body)

    def _send_bomb(self, source: Path) -> None:
        self._send_head(len(gzip_bomb()))
        self.wfile.write(gzip_bomb())

    def _send_endless(self, source: Path) -> None:
        self._send_head(None)
        self._send_for_ever(bytes(65536))

    def _send_padded(self, source: Path) -> None:
        self._send_head(None)
        self.wfile.write(_GZIP_HEADER)
        self._send_for_ever(_EMPTY_STORED_BLOCK * 13107)

    def _send_drip(self, source: Path) -> None:
        body = source.read_bytes()
        self._send_head(len(body))
        self._drip(body)

    def _send_dripheaders(self, source: Path) -> None:
        self._drip(f"HTTP/1.0 200 OK\r\nContent-Length: {source.stat().st_size}\r\n\r\n".encode())

    def _send_huge(self, source: Path) -> None:
        self._send_head(10**12)
        self._send_for_ever(bytes(65536))

    def _send_head(self, length: int | None) -> None:
        self.send_response(200)
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.end_headers()

    def _send_for_ever(self, block: bytes) -> None:
        """`block` again and again until the client hangs up (or 8 GiB, so that a lost client frees the thread)."""
        for _ in range((8 << 30) // len(block)):
            self.wfile.write(block)

    def _drip(self, data: bytes) -> None:
        """One byte every 0.5 s: each arrives well within any read timeout, the whole never does (2 min at most)."""
        for i in range(min(len(data), 240)):
            self.wfile.write(data[i : i + 1])
            time.sleep(0.5)


class LoopbackServer(http.server.ThreadingHTTPServer):
    """A threading HTTP server whose handler threads say nothing when a client hangs up mid-answer (a download
    that gave up, timed out or was killed): the traceback socketserver prints for it would land in the stderr of
    whichever test runs beside it in this process."""

    daemon_threads = True

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@pytest.fixture(scope="session")
def mirror_server(mnist_mirror):
    """A loopback HTTP server over the real MNIST files, for the whole test session; see MirrorHandler."""
    state = {"folder": mnist_mirror, "requests": [], "authorizations": [], "flaky_seen": set()}
    handler = type("Handler", (MirrorHandler,), state)
    server = LoopbackServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.base_url = f"http://127.0.0.1:{server.server_address[1]}"
    server.handler = handler
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def http_mirror(mirror_server):
    """The loopback mirror with a fresh request log (`.requests`, `.authorizations`) and fresh flaky state."""
    mirror_server.handler.requests.clear()
    mirror_server.handler.authorizations.clear()
    mirror_server.handler.flaky_seen.clear()
    mirror_server.requests = mirror_server.handler.requests
    mirror_server.authorizations = mirror_server.handler.authorizations
    return mirror_server


_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # gzip, deflate, no name, no time
_EMPTY_STORED_BLOCK = b"\x00\x00\x00\xff\xff"  # a non-final deflate block holding nothing (what a sync flush writes)
_bomb: list[bytes] = []
_bomb_lock = threading.Lock()


def gzip_bomb() -> bytes:
    """A valid 2 MB gzip of 2 GiB of zeros, built in a second (once per session).

    Compressing 2 GiB would take 10 s, so 16 MiB of zeros are deflated once, ending in a full flush (byte-aligned,
    no reference back into earlier data), and that piece is repeated 128 times; CRC and length make it valid gzip.
    """
    with _bomb_lock:
        if not _bomb:
            zeros, copies = bytes(16 << 20), 128
            piece = zlib.compressobj(9, zlib.DEFLATED, -15)
            segment = piece.compress(zeros) + piece.flush(zlib.Z_FULL_FLUSH)
            crc = 0
            for _ in range(copies):
                crc = zlib.crc32(zeros, crc)
            final_empty_block = zlib.compressobj(9, zlib.DEFLATED, -15).flush()
            trailer = struct.pack("<II", crc, (copies * len(zeros)) & 0xFFFFFFFF)
            _bomb.append(_GZIP_HEADER + segment * copies + final_empty_block + trailer)
        return _bomb[0]


@pytest.fixture(scope="module")
def data(raw_data):
    """The training and validation slices (1,000 and 500 images) for real Tune searches of a tiny CNN, put into Ray's
    object store once for every experiment of the module that asks for them."""
    import ray

    from stages.preprocess import preprocess

    splits = preprocess(raw_data, validation_size=500, seed=0, max_train_images=1500, max_test_images=10)
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield ray.put(splits.train), ray.put(splits.validation)
    if started_here:
        ray.shutdown()
