"""Shared fixtures: the real MNIST mirror beside the repo, a loopback HTTP mirror, and a verified cache."""

from __future__ import annotations

import gzip
import http.server
import os
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_MNIST = Path(os.environ.get("MNIST_MIRROR", REPO.parent / "shared" / "mnist"))


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
    """

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


@pytest.fixture(scope="session")
def mirror_server(mnist_mirror):
    """A loopback HTTP server over the real MNIST files, for the whole test session; see MirrorHandler."""
    state = {"folder": mnist_mirror, "requests": [], "authorizations": [], "flaky_seen": set()}
    handler = type("Handler", (MirrorHandler,), state)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
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
