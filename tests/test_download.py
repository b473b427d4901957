"""download against real mirrors: local folders, file:// URLs and a loopback HTTP server with broken variants."""

import hashlib
import os

import pytest

from stages.common.errors import BadInputError, DownloadError
from stages.download import CANONICAL_FILES, check_mirror, download

FAST = {"backoff_s": 0.01, "timeout_s": 1.0}


def _assert_cache_complete(cache):
    for name, (sha256, size) in CANONICAL_FILES.items():
        data = (cache / name).read_bytes()
        assert len(data) == size and hashlib.sha256(data).hexdigest() == sha256
    assert sorted(p.name for p in cache.iterdir()) == sorted(CANONICAL_FILES), "partial files left behind"


def test_local_folder_and_file_url_mirrors(mnist_mirror, tmp_path):
    download([str(mnist_mirror)], tmp_path / "a")
    _assert_cache_complete(tmp_path / "a")
    download([mnist_mirror.as_uri()], tmp_path / "b")
    _assert_cache_complete(tmp_path / "b")


def test_http_mirror_and_cached_files_are_not_fetched_again(http_mirror, tmp_path):
    raw = download([f"{http_mirror.base_url}/ok/"], tmp_path, **FAST)
    _assert_cache_complete(tmp_path)
    assert len(http_mirror.requests) == 4
    assert raw.train_images == tmp_path / "train-images-idx3-ubyte"
    stamp = raw.train_images.stat().st_mtime_ns
    download([f"{http_mirror.base_url}/ok/"], tmp_path, **FAST)
    assert len(http_mirror.requests) == 4, "valid cached files were downloaded again"
    assert raw.train_images.stat().st_mtime_ns == stamp


def test_a_corrupted_cached_file_is_replaced(http_mirror, tmp_path):
    download([f"{http_mirror.base_url}/ok/"], tmp_path, **FAST)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"garbage")
    download([f"{http_mirror.base_url}/ok/"], tmp_path, **FAST)
    assert http_mirror.requests[-1] == "/ok/t10k-labels-idx1-ubyte.gz"
    _assert_cache_complete(tmp_path)


@pytest.mark.parametrize("behaviour", ["missing", "error", "truncated", "corrupt", "slow"])
def test_a_broken_mirror_falls_through_to_the_next(http_mirror, tmp_path, behaviour):
    download([f"{http_mirror.base_url}/{behaviour}/", f"{http_mirror.base_url}/ok/"], tmp_path, retries=1, **FAST)
    _assert_cache_complete(tmp_path)
    assert any(path.startswith(f"/{behaviour}/") for path in http_mirror.requests)


def test_transient_failures_are_retried_on_the_same_mirror(http_mirror, tmp_path):
    download([f"{http_mirror.base_url}/flaky/"], tmp_path, retries=2, **FAST)
    _assert_cache_complete(tmp_path)
    flaky = [p for p in http_mirror.requests if p == "/flaky/train-labels-idx1-ubyte.gz"]
    assert len(flaky) == 2  # a 503, then the file


def test_no_working_mirror_names_every_attempt_and_leaves_nothing(http_mirror, tmp_path, mnist_mirror):
    mirrors = [f"{http_mirror.base_url}/missing/", f"{http_mirror.base_url}/corrupt/", str(tmp_path / "empty")]
    (tmp_path / "empty").mkdir()
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError) as caught:
        download(mirrors, cache, retries=0, **FAST)
    message = str(caught.value)
    assert "\n" not in message
    assert "HTTP 404" in message and "sha256 mismatch" in message and "no train-images-idx3-ubyte.gz" in message
    assert "data.mirrors" in message
    assert os.listdir(cache) == []


def test_retries_give_up_after_the_configured_attempts(http_mirror, tmp_path):
    with pytest.raises(DownloadError, match=r"HTTP 500 .*after 3 attempts"):
        download([f"{http_mirror.base_url}/error/"], tmp_path, retries=2, **FAST)
    assert len(http_mirror.requests) == 3


@pytest.mark.parametrize(
    "mirror, problem",
    [("ftp://example.org/mnist/", "unsupported mirror scheme 'ftp://'"), ("/no/such/folder", "no such folder")],
)
def test_mirrors_that_can_never_work_are_refused_up_front(mirror, problem):
    with pytest.raises(BadInputError, match=problem):
        check_mirror(mirror)


def test_leftovers_of_a_killed_download_are_swept_and_live_ones_kept(mnist_mirror, tmp_path):
    import socket
    import subprocess
    import sys

    # a real download process, killed with SIGKILL while it writes the largest file
    script = (
        "import sys, time; from pathlib import Path; import stages.download as d\n"
        "def slow(*a):\n"
        "    a[1].write(b'partial'); a[1].flush(); print('writing', flush=True); time.sleep(60)\n"
        "d.copy_decompressing = slow\n"
        f"d.download([{str(mnist_mirror)!r}], Path({str(tmp_path)!r}))\n"
    )
    writer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"
    writer.kill()
    writer.wait()
    leftovers = list(tmp_path.glob(".*.part*"))
    assert len(leftovers) == 1 and f".{socket.gethostname()}.{writer.pid}." in leftovers[0].name
    live = tmp_path / f".other.{socket.gethostname()}.{os.getpid()}.abc123.part"
    live.write_bytes(b"still being written")

    download([str(mnist_mirror)], tmp_path)
    _assert_cache_complete_except(tmp_path, live)


def _assert_cache_complete_except(cache, live):
    names = sorted(p.name for p in cache.iterdir())
    assert names == sorted([*CANONICAL_FILES, live.name]), names
