"""`mnist-pipeline dashboard`: TensorBoard over a run's Tune results (per-trial curves, the HPARAMS view), plus the
URL of the Ray dashboard when one is up. Works while the run goes on (TensorBoard re-reads the files) and after."""

from __future__ import annotations

import logging
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from pipeline.run_folder import RunFolder, locate_run
from stages.common import storage
from stages.common.errors import BadInputError, PipelineError

log = logging.getLogger(__name__)

DEFAULT_RAY_DASHBOARD = "http://127.0.0.1:8265"
EXPERIMENT_DIR = "tune"  # stages.train.EXPERIMENT_NAME, not imported: that would load Ray Tune for a viewer


def logdir_for(run: str | None, root: str) -> Path:
    """The folder TensorBoard reads: a run's tune/ folder (by id under `root`, or its path), or every run in `root`.

    Raises:
      BadInputError: no such run, or it lives in an object store (TensorBoard reads local or mounted folders).
    """
    target = root if run is None else locate_run(run, root).location
    if storage.is_uri(target):
        raise BadInputError(
            f"TensorBoard reads local or mounted folders, not {target}: copy the run down first "
            "(e.g. `aws s3 sync s3://bucket/runs/ID runs/ID`) or mount the bucket"
        )
    folder = Path(target).expanduser().resolve()
    if run is not None:
        if not Path(RunFolder(str(folder)).config_file).is_file():
            raise BadInputError(f"no run {run!r} at {folder} (no config.yaml there)")
        folder = folder / EXPERIMENT_DIR
    elif not folder.is_dir():
        raise BadInputError(f"run.root={root!r}: {folder} is not a folder")
    return folder


def ray_dashboard_url(run_folder: Path | None) -> str | None:
    """The Ray dashboard that answers: the one the run logged (a local run's own), else Ray's default address."""
    candidates = []
    log_file = Path(RunFolder(str(run_folder)).log_file) if run_folder else None
    if log_file and log_file.is_file():
        candidates += reversed(re.findall(r"Ray dashboard: (http://\S+)", log_file.read_text(errors="replace")))
    candidates.append(DEFAULT_RAY_DASHBOARD)
    for url in dict.fromkeys(candidates):
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return url
        except OSError:
            continue
    return None


def start_tensorboard(logdir: Path, host: str, port: int) -> tuple[subprocess.Popen, str]:
    """Starts TensorBoard as a child process and waits until it answers; returns (the process, its URL).

    Raises:
      BadInputError: the port is taken.
      PipelineError: TensorBoard did not come up.
    """
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            raise BadInputError(f"--port {port}: {host}:{port} is in use; choose another port") from None
    # --reload_interval: new epochs of a running experiment appear within seconds
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", host,
               "--port", str(port), "--reload_interval", "5"]
    board = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://{host}:{port}/"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if board.poll() is not None:
            raise PipelineError(f"TensorBoard stopped at start: {board.stderr.read().strip()[-300:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return board, url
        except OSError:
            time.sleep(0.3)
    board.kill()
    raise PipelineError(f"TensorBoard did not answer on {url} within 2 minutes")


def stop(board: subprocess.Popen) -> None:
    board.terminate()
    try:
        board.wait(timeout=10)
    except subprocess.TimeoutExpired:
        board.kill()
        board.wait()
