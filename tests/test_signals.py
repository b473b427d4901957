"""Stopping a run the way the system does: SIGTERM (`docker stop`, Kubernetes, Slurm, systemd, `kill`) and SIGINT
(Ctrl-C) sent to a real run mid-training end it cleanly (exit 143 / 130, one last line, Tune's experiment saved, no
partial file, no Ray process left) and `run --resume` finishes it; a train task whose worker is killed is retried by
Ray and continues the experiment instead of starting it anew.

Real processes: the driver is a `python -m pipeline run` subprocess with its own local Ray, in its own session.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_resume import checkpointed_epochs, pipeline_command, trial_epochs, trial_statuses

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "RAY_ADDRESS": ""}


# test_resume's run made smaller: one trial unless a test asks for more
SMALL_RUN = ("data.max_train_images=1500", "data.validation_size=300", "data.max_test_images=300",
             "train.num_samples=1")
SIGNAL_EPOCHS = 12


def command(tmp_path, run_id, mirror, *sets):
    return pipeline_command(tmp_path, run_id, *SMALL_RUN, *sets, mirror=mirror)


def start(args, tmp_path):
    out, err = open(tmp_path / "stdout.txt", "w"), open(tmp_path / "stderr.txt", "w")
    process = subprocess.Popen(args, stdout=out, stderr=err, cwd=REPO, env=ENV, start_new_session=True)
    out.close(), err.close()
    return process


def wait_for(process, tmp_path, condition, timeout=420):
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, "the run ended too early:\n" + tail(tmp_path / "stderr.txt")
        assert time.monotonic() < deadline, "the moment never came:\n" + tail(tmp_path / "stderr.txt")
        time.sleep(0.05)


def tail(path, lines=40):
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])


def session_processes(session):
    """(pid, command line) of every process of that session: the driver's local Ray (its workers have their own
    process groups, but stay in the session)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[3]) == session:
            found.append((int(stat.parent.name), cmdline))
    return found


def stop_leftovers(process):
    """Whatever the test's outcome: the driver ended, and every process of its session with it."""
    if process.poll() is None:
        process.kill()
        process.wait()
    end_session(process.pid)


def end_session(session):
    for pid, _ in session_processes(session):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def resume(folder):
    return subprocess.run([sys.executable, "-m", "pipeline", "run", "--resume", str(folder)],
                          capture_output=True, text=True, cwd=REPO, env=ENV, timeout=600)


@pytest.mark.parametrize("signum, exit_code, said", [
    (signal.SIGTERM, 143, "stopped (SIGTERM)"),  # docker stop, Kubernetes, Slurm, systemd: to the driver
    (signal.SIGINT, 130, "interrupted"),  # Ctrl-C: to the terminal's foreground process group
], ids=["SIGTERM", "SIGINT"])
def test_a_signal_mid_training_stops_the_run_cleanly_and_resume_finishes_it(signum, exit_code, said, tmp_path,
                                                                            mnist_mirror):
    name = signal.Signals(signum).name.lower()
    folder = tmp_path / "runs" / name
    # 12 short epochs: the stop lands mid-training however long a busy machine takes to deliver it (with 3, the trial
    # could finish its last two while Tune was being stopped)
    process = start(command(tmp_path, name, mnist_mirror, f"train.epochs={SIGNAL_EPOCHS}"), tmp_path)
    try:
        # mid-training: the trial has reported an epoch (and checkpointed it), more are to come
        wait_for(process, tmp_path, lambda: any(trial_epochs(folder).values()))
        if signum == signal.SIGINT:
            os.killpg(process.pid, signum)
        else:
            process.send_signal(signum)
        returncode = process.wait(timeout=120)
        # what the run's local Ray ran is gone with the driver (polled: the kernel may take a moment to reap)
        deadline = time.monotonic() + 10
        while session_processes(process.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = session_processes(process.pid)
    finally:
        stop_leftovers(process)

    stderr = (tmp_path / "stderr.txt").read_text()
    assert returncode == exit_code, tail(tmp_path / "stderr.txt")
    assert not left, f"processes of the run outlived it: {left}"
    assert stderr.strip().splitlines()[-1] == (
        f"mnist-pipeline: {said}; continue with: mnist-pipeline run --resume {folder}"
    )
    for noise in ["*** SIGTERM received", "PC: @", "Traceback", "Tuner.restore"]:
        assert noise not in stderr, noise
    log = (folder / "pipeline.log").read_text()
    assert f"run {name}: {signal.Signals(signum).name} received: stopping" in log
    assert log.strip().splitlines()[-1] == (
        f"run stopped: {signal.Signals(signum).name} received; continue with: mnist-pipeline run --resume {folder}"
    )
    # the driver found the train task and asked it to end Tune's loop (whether that took more than the grace period
    # depends on the machine's load; Tune's own words reach the log only if Ray forwards them in time). That the
    # experiment's state was saved is what the resume below shows.
    assert re.search(rf"run {name}: the Tune experiment (stopped|did not stop in time)", log), "Tune was not asked"
    assert not list(folder.rglob("*.part*")) and not list((tmp_path / "cache").rglob("*.part*"))
    stages = json.loads((folder / "stages.json").read_text())
    assert stages["train"]["finished"] is None and "evaluate" not in stages
    (trial,) = trial_statuses(folder)
    assert trial_statuses(folder)[trial] != "TERMINATED"
    epochs_before = trial_epochs(folder)[trial]

    result = resume(folder)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "restoring the Tune experiment" in result.stderr
    assert json.loads((folder / "metrics.json").read_text())["test_accuracy"] > 0.5
    epochs = trial_epochs(folder)[trial]
    # the trial went on from its checkpoint: epoch 1 was trained once
    assert epochs[: len(epochs_before)] == epochs_before and epochs.count(1) == 1, epochs
    assert epochs[-1] == SIGNAL_EPOCHS, epochs
    assert trial_statuses(folder) == {trial: "TERMINATED"}


def test_a_killed_train_task_is_retried_and_continues_the_experiment(tmp_path, mnist_mirror):
    """Ray runs a task again when its worker dies; the train task's new attempt restores the Tune experiment the
    dead one left: the finished trial is not trained again, the interrupted one goes on from its checkpoint."""
    folder = tmp_path / "runs" / "retry"
    process = start(command(tmp_path, "retry", mnist_mirror, "train.num_samples=2", "train.max_concurrent_trials=1"),
                    tmp_path)
    seen = {}

    def one_trial_finished_the_other_checkpointed():
        statuses = trial_statuses(folder)
        if sorted(statuses.values()) == ["RUNNING", "TERMINATED"]:
            running = next(trial for trial, status in statuses.items() if status == "RUNNING")
            if running in checkpointed_epochs(folder):
                seen.update(statuses=statuses)
                return True
        return False

    try:
        wait_for(process, tmp_path, one_trial_finished_the_other_checkpointed)
        (train_worker,) = [pid for pid, cmdline in session_processes(process.pid)
                           if cmdline.startswith("ray::train_task")]
        os.kill(train_worker, signal.SIGKILL)
        returncode = process.wait(timeout=600)
    finally:
        stop_leftovers(process)

    stderr = (tmp_path / "stderr.txt").read_text()
    assert returncode == 0, tail(tmp_path / "stderr.txt")
    assert "which an earlier attempt of this train task left (its worker died)" in stderr
    finished = next(trial for trial, status in seen["statuses"].items() if status == "TERMINATED")
    interrupted = next(trial for trial, status in seen["statuses"].items() if status == "RUNNING")
    epochs = trial_epochs(folder)
    assert set(epochs) == {finished, interrupted}, "the retry started a new experiment"
    assert epochs[finished] == [1, 2, 3], "a finished trial was trained again"
    assert epochs[interrupted].count(1) == 1 and epochs[interrupted][-1] == 3, epochs[interrupted]
    assert trial_statuses(folder) == {finished: "TERMINATED", interrupted: "TERMINATED"}
    metrics = json.loads((folder / "metrics.json").read_text())
    assert {trial["trial_id"] for trial in metrics["trials"]} == {finished, interrupted}
