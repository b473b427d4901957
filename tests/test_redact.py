"""Credentials in mirrors and storage URIs never reach the console, the logs or the run folder."""

import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stages.common.redact import redact, redact_uri
from stages.download import download

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "uri, shown",
    [
        ("https://user:hunter2@example.org/mnist/?token=abc&x=1", "https://user:***@example.org/mnist/?token=***&x=1"),
        ("https://ghp_secret@github.com/x", "https://***@github.com/x"),
        ("s3://b/p?endpoint_override=127.0.0.1:9000&secret_key=zz", "s3://b/p?endpoint_override=127.0.0.1:9000&secret_key=***"),
        ("http://127.0.0.1:8000/ok/", "http://127.0.0.1:8000/ok/"),
        ("/plain/folder", "/plain/folder"),
    ],
)
def test_redact_uri(uri, shown):
    assert redact_uri(uri) == shown


def test_redact_keeps_the_sentence_around_a_uri():
    assert redact("from https://u:p@h/x/: HTTP 404") == "from https://u:***@h/x/: HTTP 404"


def test_a_mirror_with_credentials_gets_them_as_basic_auth_and_a_query_kept(http_mirror, tmp_path):
    host = http_mirror.base_url.removeprefix("http://")
    download([f"http://reader:s3cret@{host}/ok/?token=t0k"], tmp_path, retries=0, timeout_s=5)
    assert http_mirror.requests[0] == "/ok/train-images-idx3-ubyte.gz?token=t0k"
    assert http_mirror.authorizations[0] == "Basic " + base64.b64encode(b"reader:s3cret").decode()


@pytest.mark.parametrize("redirect, kept", [("redirect-home", True), ("redirect-away", False)])
def test_credentials_follow_a_redirect_only_to_the_mirrors_own_origin(redirect, kept, http_mirror, tmp_path):
    host = http_mirror.base_url.removeprefix("http://")
    download([f"http://reader:s3cret@{host}/{redirect}/"], tmp_path, retries=0, timeout_s=5)
    basic = "Basic " + base64.b64encode(b"reader:s3cret").decode()
    assert http_mirror.requests[:2] == [f"/{redirect}/train-images-idx3-ubyte.gz", "/ok/train-images-idx3-ubyte.gz"]
    assert http_mirror.authorizations[:2] == [basic, basic if kept else None]


def test_secrets_stay_out_of_errors_logs_and_the_run_folder(http_mirror, tmp_path):
    host = http_mirror.base_url.removeprefix("http://")
    mirror = f"http://reader:hunter2@{host}/missing/?token=abc123"
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "--run-id", "secret", "--set", f"data.mirrors=['{mirror}']",
         "--set", f"run.root={tmp_path / 'runs'}", "--set", f"data.cache_dir={tmp_path / 'cache'}",
         "--set", "data.retries=0", "--set", "ray.include_dashboard=false", "--set", "ray.num_cpus=1"],
        capture_output=True, text=True, cwd=REPO, timeout=300, env={**os.environ, "RAY_ADDRESS": ""},
    )
    assert result.returncode == 1 and "HTTP 404" in result.stderr
    written = "".join(p.read_text() for p in (tmp_path / "runs" / "secret").iterdir() if p.is_file())
    for secret in ("hunter2", "abc123"):
        assert secret not in result.stdout + result.stderr + written
    assert "reader:***@" in result.stderr and "token=***" in (tmp_path / "runs" / "secret" / "config.yaml").read_text()
    shown = subprocess.run([sys.executable, "-m", "pipeline", "config", "--set", f"data.mirrors=['{mirror}']"],
                           capture_output=True, text=True, cwd=REPO, timeout=60)
    assert "hunter2" not in shown.stdout and "abc123" not in shown.stdout
