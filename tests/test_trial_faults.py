"""Trials whose worker process dies: retried from the last checkpoint, or, retries exhausted, reported while the
other trials finish and the best completed one is evaluated. Real processes, killed with SIGKILL mid-training."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent


def run_and_kill_one_trial(tmp_path, mnist_mirror, max_failures):
    """Starts a 2-trial run, SIGKILLs a trial's process mid-run (after an epoch, before its last two); returns
    (exit code, output, the killed trial's folder)."""
    command = [
        sys.executable, "-m", "pipeline", "run", "--run-id", "faults",
        "--set", f"run.root={tmp_path / 'runs'}", "--set", f"data.cache_dir={tmp_path / 'cache'}",
        "--set", f"data.mirrors=[{mnist_mirror}]", "--set", "data.max_train_images=2500",
        "--set", "data.validation_size=500", "--set", "data.max_test_images=500", "--set", "train.epochs=6",
        "--set", "train.num_samples=2", "--set", "train.scheduler=fifo", "--set", "train.search_space={}",
        "--set", f"train.max_failures={max_failures}", "--set", "ray.num_cpus=2",
        "--set", "ray.include_dashboard=false",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                               env={**os.environ, "RAY_ADDRESS": ""})
    victim, deadline = None, time.monotonic() + 300
    try:
        while victim is None and process.poll() is None and time.monotonic() < deadline:
            for result_file in sorted((tmp_path / "runs" / "faults" / "tune").glob("*/result.json")):
                rows = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
                if rows and rows[-1]["epoch"] <= 4:  # Tune may write several epochs' rows at once
                    victim = result_file.parent
                    os.kill(rows[-1]["pid"], signal.SIGKILL)
                    break
            time.sleep(0.2)
        output, _ = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
    assert victim is not None, "no trial finished an epoch"
    return process.returncode, output, victim


def epochs_of(trial_folder):
    return [json.loads(line)["epoch"] for line in (trial_folder / "result.json").read_text().splitlines()]


def test_a_killed_trial_is_retried_from_its_checkpoint(tmp_path, mnist_mirror):
    code, output, trial = run_and_kill_one_trial(tmp_path, mnist_mirror, max_failures=2)
    assert code == 0, output[-3000:]
    epochs = epochs_of(trial)
    # continued from its latest checkpoint (possibly one Tune had not recorded a result for yet), never started again
    assert epochs[-1] == 6 and epochs.count(1) == 1 and epochs == sorted(set(epochs)), epochs
    metrics = json.loads((tmp_path / "runs" / "faults" / "metrics.json").read_text())
    assert all(t["status"] == "TERMINATED" for t in metrics["trials"])


def test_a_trial_out_of_retries_is_reported_and_the_others_finish(tmp_path, mnist_mirror):
    code, output, trial = run_and_kill_one_trial(tmp_path, mnist_mirror, max_failures=0)
    assert code == 0, output[-3000:]
    metrics = json.loads((tmp_path / "runs" / "faults" / "metrics.json").read_text())
    failed = [t for t in metrics["trials"] if t["status"] == "ERROR"]
    finished = [t for t in metrics["trials"] if t["status"] == "TERMINATED"]
    assert len(failed) == 1 and len(finished) == 1 and failed[0]["error"]
    assert metrics["best_trial_id"] == finished[0]["trial_id"]
    assert failed[0]["trial_id"] in trial.name
    assert f"failed after retries: {failed[0]['trial_id']} (" in output
    summary = json.loads((tmp_path / "runs" / "faults" / "summary.json").read_text())
    assert list(summary["failed_trials"]) == [failed[0]["trial_id"]]
