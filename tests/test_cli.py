"""The command line as a user runs it: bad input gives one line, exit code 2, no traceback, no Ray, no run folder."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args, cwd=None):
    env = {**os.environ, "RAY_ADDRESS": ""}
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=cwd or REPO, env=env,
        timeout=120,
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--config", "nope.yaml"], "config file not found: nope.yaml"),
        (["run", "--set", "train.epoch=2"], "train.epoch: unknown key (did you mean 'epochs'?)"),
        (["run", "--set", "train.num_samples=0"], "train.num_samples: Input should be greater than or equal to 1"),
        (["run", "--set", "data.mirrors=[/no/such/dir]"], "mirror '/no/such/dir': no such folder"),
        (["run", "--set", "train.search_space.dropout={uniform: [0, 2]}"], "dropout: 2.0 is not allowed"),
        (["run", "--set", "nonsense"], "--set expects KEY=VALUE"),
        (["run", "--run-id", "a/b"], "run.id: 'a/b' is not a valid run id"),
        (["run", "--address", "nowhere"], "ray.address: 'nowhere' is not a Ray address"),
        (["run", "--set", "ray.num_cpus=1", "--set", "train.cpus_per_trial=2"], "exceeds ray.num_cpus=1"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path):
    args = [*args, "--set", f"run.root={tmp_path / 'runs'}"] if "run.root" not in " ".join(args) else args
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("mnist-pipeline: error: ") and message in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert "stage download" not in result.stderr + result.stdout  # refused before Ray started
    assert "(download_task" not in result.stderr + result.stdout
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_bad_arguments_exit_2_with_usage():
    result = run_cli("run", "--no-such-flag")
    assert result.returncode == 2
    assert "unrecognized arguments: --no-such-flag" in result.stderr
    result = run_cli()
    assert result.returncode == 2 and "COMMAND" in result.stderr


def test_a_run_root_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    result = run_cli("run", "--set", f"run.root={tmp_path / 'file'}")
    assert result.returncode == 2
    assert result.stderr.strip().endswith("is not a folder")


def test_a_run_id_in_use_is_refused(tmp_path):
    (tmp_path / "taken").mkdir()
    result = run_cli("run", "--run-id", "taken", "--set", f"run.root={tmp_path}")
    assert result.returncode == 2
    assert "run 'taken' exists already" in result.stderr


def test_config_command_prints_the_resolved_config():
    result = run_cli("config", "--config", "configs/quick.yaml", "--set", "train.epochs=2")
    assert result.returncode == 0, result.stderr
    assert "epochs: 2" in result.stdout and "num_samples: 4" in result.stdout


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "mnist-pipeline"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "run" in result.stdout


@pytest.mark.parametrize(
    "behaviour, reason",
    [
        ("missing", "HTTP 404"),
        ("error", "HTTP 500"),
        ("truncated", ""),
        ("corrupt", "sha256"),
        ("slow", "timed out"),
    ],
)
def test_a_run_whose_only_mirror_is_broken_fails_in_one_line(behaviour, reason, http_mirror, tmp_path):
    """Whole-CLI runs (real Ray) against each broken-mirror behaviour: exit 1 (a runtime failure, not bad input), one
    line naming the file and the mirror's problem, no run artifacts, nothing partial in the cache."""
    mirror = f"{http_mirror.base_url}/{behaviour}/"
    result = run_cli(
        "run", "--set", f"run.root={tmp_path / 'runs'}", "--set", f"data.cache_dir={tmp_path / 'cache'}",
        "--set", f"data.mirrors=[{mirror}]", "--set", "data.retries=1", "--set", "data.timeout_s=1",
        "--set", "ray.num_cpus=1", "--set", "ray.include_dashboard=false",
    )
    assert result.returncode == 1, result.stderr[-2000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("mnist-pipeline: error: could not download a verified train-images-idx3-ubyte ")
    assert mirror in error and reason in error, error
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "cache").glob(".*.part*"))
    (run_folder,) = (tmp_path / "runs").iterdir()
    assert not (run_folder / "data").exists() and not (run_folder / "metrics.json").exists()
