"""A Ray that cannot be reached or started, and a stage task that fails: one line naming the setting, variable or
file, the right exit code, bounded time, no run folder left behind by a run that never began."""

import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import LoopbackServer

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args, env=None, timeout=120):
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=REPO, timeout=timeout,
        env={**os.environ, "RAY_ADDRESS": "", **(env or {})},
    )
    result.seconds = time.monotonic() - started
    return result


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # closed again when this returns: nothing listens there


@pytest.fixture(scope="module")
def web_server():
    """An HTTP/1 server on loopback: a port that answers, but not as Ray."""
    server = LoopbackServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def assert_refused_before_the_run(result, runs: Path, *expected: str, code: int = 2) -> None:
    assert result.returncode == code, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("mnist-pipeline: error: "), result.stderr[-2000:]
    assert all(text in lines[-1] for text in expected), lines[-1]
    assert "Traceback" not in result.stderr and "\x1b[" not in lines[-1]
    assert not runs.exists(), f"left {runs} ({list(runs.iterdir())})"  # run.root too: the run made it


def run_in_process(capsys, *args: str) -> subprocess.CompletedProcess:
    """The CLI in this process, for cases that end before Ray starts (which is part of what they check)."""
    from pipeline.cli import main

    started = time.monotonic()
    code = main(list(args))
    result = subprocess.CompletedProcess(args, code, "", capsys.readouterr().err)
    result.seconds = time.monotonic() - started
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized(), "Ray was started"
    return result


@pytest.mark.parametrize(
    "address, problem, given_by",
    [
        ("127.0.0.1:{closed}", "connection refused", "--address"),
        ("no-such-host.invalid:6379", "does not resolve", "RAY_ADDRESS"),
        ("ray://127.0.0.1:{closed}", "connection refused", "RAY_ADDRESS"),
        ("{web}", "does not speak gRPC", "--address"),
    ],
)
def test_a_cluster_nobody_answers_for_is_refused_in_seconds(
    address, problem, given_by, web_server, tmp_path, capsys, monkeypatch
):
    address = address.format(closed=closed_port(), web=web_server)
    runs = tmp_path / "runs"
    args = ["run", "--run-id", "same", "--set", f"run.root={runs}"]
    if given_by == "--address":
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        result = run_in_process(capsys, *args, "--address", address)
    else:
        monkeypatch.setenv("RAY_ADDRESS", address)
        result = run_in_process(capsys, *args)
    source = "ray.address" if given_by == "--address" else "RAY_ADDRESS"
    assert_refused_before_the_run(result, runs, f"{source}={address}: no Ray cluster answers there", problem)


def test_a_dead_address_given_on_the_command_line_ends_in_seconds(tmp_path):
    """The same through the installed entry point, as a user runs it: exit 2 from the process itself."""
    runs = tmp_path / "runs"
    result = run_cli("run", "--set", f"run.root={runs}", "--address", f"127.0.0.1:{closed_port()}")
    assert_refused_before_the_run(result, runs, "no Ray cluster answers there", "connection refused")


def test_address_auto_without_a_cluster_leaves_no_run_root(tmp_path):
    """`--address auto` passes the reachability check (there is nothing to dial) and fails in ray.init: the run
    folder and the run.root folders the run made are removed; a root that was there before is kept."""
    runs = tmp_path / "new" / "runs"
    result = run_cli("run", "--set", f"run.root={runs}", "--address", "auto")
    assert_refused_before_the_run(result, tmp_path / "new", "ray.address=auto", "Could not find any running Ray")
    kept = tmp_path / "kept"
    (kept / "other").mkdir(parents=True)
    result = run_cli("run", "--set", f"run.root={kept}", "--address", "auto")
    assert result.returncode == 2 and sorted(path.name for path in kept.iterdir()) == ["other"]


@pytest.mark.parametrize("value", ["http://head:8265", "head:99999", "a b:1"])
def test_a_malformed_ray_address_variable_is_named(value, tmp_path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    monkeypatch.setenv("RAY_ADDRESS", value)
    result = run_in_process(capsys, "run", "--set", f"run.root={runs}")
    assert_refused_before_the_run(result, runs, "RAY_ADDRESS: ", "(unset it to start a local Ray)")


@pytest.mark.parametrize("variable", ["HOME", "RAY_TMPDIR"])
def test_an_unwritable_home_or_ray_folder_is_named(variable, tmp_path):
    folder = tmp_path / "unwritable"
    folder.mkdir()
    if os.geteuid() == 0:  # root writes through permissions: a read-only mount of the kernel's is unwritable for all
        folder = Path("/sys/kernel")
    else:
        folder.chmod(0o500)
    runs = tmp_path / "runs"
    result = run_cli(
        "run", "--set", f"run.root={runs}", "--set", "ray.include_dashboard=false", "--set", "ray.num_cpus=1",
        "--set", f"data.cache_dir={tmp_path / 'cache'}", env={variable: str(folder), "RAY_AUTH_MODE": "token"},
    )
    assert_refused_before_the_run(result, runs, f"{variable}={folder} is not writable", "cannot write")


def test_a_failing_stage_task_is_one_line_and_its_traceback_is_in_the_log(tmp_path, mnist_mirror):
    """The download task cannot create its cache (a folder below a file): the console's last line names the stage
    and the path, with no RayTaskError, process ids or colour codes; the worker's traceback is in pipeline.log."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    runs = tmp_path / "runs"
    result = run_cli(
        "run", "--run-id", "failing", "--set", f"run.root={runs}", "--set", f"data.cache_dir={blocker / 'cache'}",
        "--set", f"data.mirrors=[{mnist_mirror}]", "--set", "ray.include_dashboard=false", "--set", "ray.num_cpus=1",
        timeout=300,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"mnist-pipeline: error: stage download: Not a directory: {blocker / 'cache'}", last
    for noise in ("RayTaskError", "pid=", "\x1b[", "Traceback"):
        assert noise not in result.stderr, noise
    log = (runs / "failing" / "pipeline.log").read_text()
    assert "run stopped: stage download: Not a directory" in log
    assert "Traceback" not in log or "ray::download_task()" in log
    assert 'in download_task' in log and "NotADirectoryError" in log


def test_a_start_killed_before_its_run_began_does_not_block_its_run_id(tmp_path):
    """kill -9 while Ray starts leaves the folder with its marker and an unheld lock: the same --run-id may start
    again. A lock still held (that start goes on) or anything more in the folder (a run) keeps the id taken."""
    import fcntl

    from pipeline.run_folder import LOCK_FILE, create_run_folder
    from stages.common.errors import BadInputError

    first = create_run_folder(str(tmp_path), "again")
    Path(first.location, LOCK_FILE).write_text("pid 1 on a host that was killed\n")
    assert create_run_folder(str(tmp_path), "again") == first
    with open(Path(first.location, LOCK_FILE)) as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(BadInputError, match="exists already"):
            create_run_folder(str(tmp_path), "again")
    Path(first.config_file).write_text("run: {}\n")
    with pytest.raises(BadInputError, match="exists already"):
        create_run_folder(str(tmp_path), "again")
