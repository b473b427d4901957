"""download against hostile mirrors: a gzip bomb, endless and drip-fed bodies, a huge Content-Length, and local
"files" that are FIFOs, devices or huge. Each attempt stops at the file's known size or at its deadline, the next
mirror is tried, memory stays small and nothing partial is left in the cache.

Every download runs in a child process, which reports its own peak RSS, and runs with its address space and file
size capped: were a bound missing, the child would fail or time out, never take the machine down.
"""

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, LoopbackServer, gzip_bomb
from peak_memory import OWN_PEAK

from stages.download import CANONICAL_FILES

FAST = {"retries": 2, "backoff_s": 0.01, "timeout_s": 10.0, "deadline_s": 60.0}  # retries: to show none happen
# Generous: what stops a hostile attempt here is a size bound, never the clock, so a busy machine changes nothing.
# The drip tests set a short deadline of their own, with only a tiny file left to download.
MAX_RSS_MB = 600  # a Python process with numpy is ~100 MB; unbounded, the bomb alone would take 1 GB a chunk
TRAIN_IMAGES = CANONICAL_FILES["train-images-idx3-ubyte"][1]  # 47,040,016 bytes: the largest bound

CHILD = OWN_PEAK + r"""
import json, logging, resource, sys, time
from pathlib import Path

resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # a missing bound fails here, not on the machine
resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 20, 256 << 20))
logging.basicConfig(level=logging.WARNING, format="%(message)s")
from stages.download import download
from stages.common.errors import DownloadError

args = json.loads(sys.argv[1])
bars = []

class Bar:
    def update(self, received): pass
    def close(self): pass

def progress(name, total):
    bars.append([name, total])
    return Bar()

start = time.monotonic()
try:
    download(args["mirrors"], Path(args["cache"]), progress=progress, **args["options"])
    error = None
except DownloadError as failure:
    error = str(failure)
print(json.dumps({
    "error": error, "seconds": time.monotonic() - start, "bars": bars,
    "peak_rss_mb": own_peak_rss_bytes() / 2**20,
}))
"""


@dataclass
class Child:
    error: str | None
    seconds: float
    bars: list[list]  # [file name, bytes expected] of each transfer that began
    peak_rss_mb: float
    log: str


def _download_in_child(mirrors: list[str], cache: Path, **options) -> Child:
    args = json.dumps({"mirrors": mirrors, "cache": str(cache), "options": {**FAST, **options}})
    result = subprocess.run(
        [sys.executable, "-c", CHILD, args], capture_output=True, text=True, cwd=REPO, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    child = Child(**json.loads(result.stdout.splitlines()[-1]), log=result.stderr)
    assert child.peak_rss_mb < MAX_RSS_MB, child
    return child


def _cache_without(raw_files, folder: Path, missing: str) -> Path:
    """A cache holding the verified files (links to the session's) but `missing`: only that one is fetched."""
    folder.mkdir()
    for name in CANONICAL_FILES:
        if name != missing:
            os.link(raw_files.train_images.parent / name, folder / name)
    return folder


def _assert_cache_complete(cache: Path) -> None:
    assert sorted(os.listdir(cache)) == sorted(CANONICAL_FILES), "partial or temporary files left behind"
    for name, (sha256, size) in CANONICAL_FILES.items():
        data = (cache / name).read_bytes()
        assert len(data) == size and hashlib.sha256(data).hexdigest() == sha256


@pytest.fixture
def bomb() -> bytes:
    """The mirror's gzip bomb, built before a download asks for it (building takes about a second)."""
    return gzip_bomb()


def _requests_to(http_mirror, behaviour: str) -> list[str]:
    return [path for path in http_mirror.requests if path.startswith(f"/{behaviour}/")]


def test_a_gzip_bomb_and_endless_bodies_stop_at_the_file_size(http_mirror, bomb, tmp_path):
    base = http_mirror.base_url
    cache = tmp_path / "cache"
    child = _download_in_child([f"{base}/bomb/", f"{base}/endless/", f"{base}/padded/", f"{base}/ok/"], cache)

    assert child.error is None
    _assert_cache_complete(cache)
    name = "train-images-idx3-ubyte"
    assert f"{name} from {base}/bomb/: inflates to more than the {TRAIN_IMAGES:,} bytes {name} has" in child.log
    assert f"{name} from {base}/endless/: sends more than the {TRAIN_IMAGES:,} bytes {name} has" in child.log
    assert f"{name} from {base}/padded/: sends more than 47," in child.log  # compressed bytes inflating to nothing
    assert f"more than any gzip of the {TRAIN_IMAGES:,}-byte {name}" in child.log
    # the bomb is larger than a gzip of the small files can be: refused on its Content-Length alone
    assert f"t10k-labels-idx1-ubyte from {base}/bomb/: offers {len(bomb):,} bytes" in child.log
    for behaviour in ("bomb", "endless", "padded"):
        assert len(_requests_to(http_mirror, behaviour)) == 4, f"{behaviour}: a hostile mirror is not retried"


@pytest.mark.parametrize("behaviour", ["drip", "dripheaders"])
def test_a_drip_fed_mirror_misses_the_deadline_and_the_next_is_tried(http_mirror, raw_files, tmp_path, behaviour):
    base, name = http_mirror.base_url, "t10k-labels-idx1-ubyte"
    cache = _cache_without(raw_files, tmp_path / "cache", name)
    child = _download_in_child([f"{base}/{behaviour}/", f"{base}/ok/"], cache, deadline_s=2.0)

    assert child.error is None
    _assert_cache_complete(cache)
    assert f"{name} from {base}/{behaviour}/: no complete file within the 2 s deadline" in child.log
    assert len(_requests_to(http_mirror, behaviour)) == 1, "a mirror that missed the deadline is not retried"
    assert child.seconds >= 2.0  # it waited for the deadline, no less


def test_a_huge_content_length_is_refused_before_reading(http_mirror, raw_files, mnist_mirror, tmp_path):
    base, name = http_mirror.base_url, "train-images-idx3-ubyte"
    cache = _cache_without(raw_files, tmp_path / "cache", name)
    child = _download_in_child([f"{base}/huge/", f"{base}/ok/"], cache)

    assert child.error is None
    _assert_cache_complete(cache)
    assert f"{name} from {base}/huge/: offers 1,000,000,000,000 bytes; a gzip of the {TRAIN_IMAGES:,}" in child.log
    good = (mnist_mirror / f"{name}.gz").stat().st_size
    assert child.bars == [[name, good]], "the huge body was read: its transfer began"


def test_local_bombs_fifos_devices_and_huge_files_are_refused(mnist_mirror, bomb, tmp_path):
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    (hostile / "train-images-idx3-ubyte.gz").write_bytes(bomb)  # read a whole 1 MB chunk at a time: 1 GB inflated
    os.mkfifo(hostile / "train-labels-idx1-ubyte.gz")  # opening it to read would wait for a writer for ever
    with open(hostile / "t10k-images-idx3-ubyte.gz", "wb") as sparse:
        sparse.truncate(10**11)  # 100 GB that take no disk
    (hostile / "t10k-labels-idx1-ubyte.gz").symlink_to("/dev/zero")  # endless
    cache = tmp_path / "cache"
    child = _download_in_child([str(hostile), str(mnist_mirror)], cache)

    assert child.error is None
    _assert_cache_complete(cache)
    name = "train-images-idx3-ubyte"
    assert f"{name} from {hostile}: inflates to more than the {TRAIN_IMAGES:,} bytes {name} has" in child.log
    assert f"train-labels-idx1-ubyte from {hostile}: {hostile}/train-labels-idx1-ubyte.gz is not a regular" in child.log
    assert f"t10k-images-idx3-ubyte from {hostile}: offers 100,000,000,000 bytes" in child.log
    assert f"t10k-labels-idx1-ubyte from {hostile}: {hostile}/t10k-labels-idx1-ubyte.gz is not a regular" in child.log


def test_only_hostile_mirrors_fail_in_one_line_and_leave_nothing(http_mirror, bomb, tmp_path):
    base = http_mirror.base_url
    cache = tmp_path / "cache"
    mirrors = [f"{base}/bomb/", f"{base}/endless/", f"{base}/huge/", f"{base}/drip/"]
    child = _download_in_child(mirrors, cache, deadline_s=5.0)

    message = child.error
    assert message is not None and "\n" not in message
    assert message.startswith("could not download a verified train-images-idx3-ubyte from any mirror")
    assert f"{base}/bomb/: inflates to more than the {TRAIN_IMAGES:,} bytes" in message
    assert f"{base}/endless/: sends more than the {TRAIN_IMAGES:,} bytes" in message
    assert f"{base}/huge/: offers 1,000,000,000,000 bytes" in message
    assert f"{base}/drip/: no complete file within the 5 s deadline" in message
    assert "attempts" not in message, "a hostile mirror was retried"
    assert os.listdir(cache) == []


def test_a_mirror_whose_certificate_is_not_trusted_is_not_retried(tmp_path, mnist_mirror):
    """A self-signed https mirror on loopback: refused once (retrying will not make it trusted), the next one used."""
    import http.server
    import shutil
    import ssl
    import threading

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"], check=True, capture_output=True)
    requests = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            self.send_error(404)

        def log_message(self, *args):
            pass

    server = LoopbackServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        mirror = f"https://127.0.0.1:{server.server_address[1]}/mnist/"
        child = _download_in_child([mirror, str(mnist_mirror)], tmp_path / "cache")
    finally:
        server.shutdown()
        server.server_close()
    assert child.error is None, child
    assert child.log.count("its TLS certificate is not trusted") == 4, child.log  # once per file: no retries
    assert "retrying" not in child.log and requests == []
