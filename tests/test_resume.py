"""kill -9 the pipeline's driver during each stage, then `run --resume`: the run must finish correctly, skip what
had finished (stages, Tune trials), continue unfinished trials from their checkpoints, leave no partial file, and
its metrics must match a recomputation from the exported model.

Real processes: the driver is a `python -m pipeline run` subprocess with its own local Ray, killed with SIGKILL at
the moment the run folder shows the stage under way.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from run_data import dataset_file

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent


def pipeline_command(tmp_path, run_id, *sets, mirror):
    common = {
        "run.root": tmp_path / "runs",
        "data.cache_dir": tmp_path / "cache",
        "data.mirrors": f"[{mirror}]",
        "data.max_train_images": 3000,
        "data.validation_size": 500,
        "data.max_test_images": 1000,
        "train.epochs": 3,
        "train.num_samples": 2,
        "train.max_concurrent_trials": 1,  # one trial finishes while the other runs
        "train.scheduler": "fifo",
        "train.search_space": "{batch_size: {choice: [64]}}",
        "ray.num_cpus": 2,
        "ray.include_dashboard": "false",
    }
    for setting in sets:
        key, _, value = setting.partition("=")
        common[key] = value
    command = [sys.executable, "-m", "pipeline", "run", "--run-id", run_id]
    for key, value in common.items():
        command += ["--set", f"{key}={value}"]
    return command


def resume(target, *extra):
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "--resume", str(target), *extra],
        capture_output=True, text=True, cwd=REPO, timeout=600, env={**os.environ, "RAY_ADDRESS": ""},
    )


def run_and_kill(command, tmp_path, when, timeout=300):
    """Starts the driver, SIGKILLs it as soon as `when()` is true, then removes what its Ray left behind."""
    log = open(tmp_path / "killed-driver.log", "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                               env={**os.environ, "RAY_ADDRESS": ""}, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while not when():
            assert process.poll() is None, f"the run ended before the kill point:\n{_tail(tmp_path)}"
            assert time.monotonic() < deadline, "the kill point never came"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
        _end_session(process.pid)
        log.close()


def _end_session(session: int) -> None:
    """Waits for Ray's raylet and GCS to notice their driver died, then kills what stays (Ray's agents linger)."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(
        name in ("raylet", "gcs_server") for _, name in _session_processes(session)
    ):
        time.sleep(0.2)
    for pid, _ in _session_processes(session):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _session_processes(session: int) -> list[tuple[int, str]]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[3]) == session:  # field 6 of /proc/PID/stat: the session id
            found.append((int(stat.parent.name), name))
    return found


def _tail(tmp_path, lines=40):
    return "\n".join((tmp_path / "killed-driver.log").read_text().splitlines()[-lines:])


def stage_records(folder):
    try:
        return json.loads((folder / "stages.json").read_text())
    except (OSError, ValueError):
        return {}


def underway(folder, stage):
    record = stage_records(folder).get(stage)
    return record is not None and record["finished"] is None


def trial_epochs(folder):
    """{trial id: [epoch of each result row]} from the trials' result.json files."""
    epochs = {}
    for result_file in (folder / "tune").glob("*/result.json"):
        rows = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
        if rows:
            epochs[rows[0]["trial_id"]] = [row["epoch"] for row in rows]
    return epochs


def trial_timestamps(folder):
    """{trial id: [time of each result row, in seconds]}"""
    stamps = {}
    for result_file in (folder / "tune").glob("*/result.json"):
        rows = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
        if rows:
            stamps[rows[0]["trial_id"]] = [row["timestamp"] - row["time_this_iter_s"] for row in rows]
    return stamps


def _saved_trials(folder):
    """[(trial json, run metadata json)] from the newest experiment state Tune saved in the run folder."""
    states = sorted((folder / "tune").glob("experiment_state-*.json"))
    if not states:
        return []
    try:
        return json.loads(states[-1].read_text())["trial_data"]
    except ValueError:
        return []  # being replaced right now


def trial_statuses(folder):
    """{trial id: status} from the newest experiment state Tune saved in the run folder."""
    return {json.loads(trial)["trial_id"]: json.loads(trial)["status"] for trial, _ in _saved_trials(folder)}


def checkpointed_epochs(folder):
    """{trial id: the epoch of the newest checkpoint Tune recorded for it} from the newest experiment state.

    A restore goes on from what the experiment state records, not from what a trial has written: a checkpoint
    written after the last snapshot of the state is not restored from. Kill tests wait for this record.
    """
    from ray.tune.utils.serialization import TuneFunctionDecoder

    def decoder(**kwargs):  # the state is this test's own run: its pickled checkpoint manager is trusted
        return TuneFunctionDecoder(allow_cloudpickle=True, **kwargs)

    epochs = {}
    for trial, metadata in _saved_trials(folder):
        latest = json.loads(metadata, cls=decoder)["checkpoint_manager"].latest_checkpoint_result
        if latest is not None:
            epochs[json.loads(trial)["trial_id"]] = latest.metrics["epoch"]
    return epochs


def check_finished_run(result, folder, cache):
    """Exit 0, nothing partial anywhere, every stage recorded, metrics recomputed from the exported model."""
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    partial = [str(p) for p in [*folder.rglob("*.part*"), *cache.rglob("*.part*")]]
    assert not partial, f"temporary files left behind: {partial}"
    assert all(record["finished"] for record in stage_records(folder).values())
    assert set(stage_records(folder)) == {"download", "preprocess", "train", "evaluate"}

    import keras

    metrics = json.loads((folder / "metrics.json").read_text())
    with np.load(dataset_file(folder)) as dataset:
        images, labels = dataset["test_images"], dataset["test_labels"]
    model = keras.models.load_model(folder / "model" / "model.keras", safe_mode=True)
    predicted = model.predict(images, batch_size=500, verbose=0).argmax(axis=1)
    assert metrics["test_accuracy"] == pytest.approx(float(np.mean(predicted == labels)), abs=1e-9)
    assert metrics["test_accuracy"] > 0.8
    assert json.loads((folder / "summary.json").read_text())["test_accuracy"] == metrics["test_accuracy"]
    return metrics


def skipped_stages(result):
    return [stage for stage in ("download", "preprocess", "train", "evaluate")
            if f"stage {stage}: finished earlier" in result.stderr + result.stdout]


def test_killed_during_download(tmp_path, mirror_server):
    folder, cache = tmp_path / "runs" / "dl", tmp_path / "cache"
    command = pipeline_command(tmp_path, "dl", mirror=f"{mirror_server.base_url}/trickle/")
    # the training images' part file: seconds of trickling are still to come when the kill lands, however busy the
    # machine (a label file, a block or two, may be complete and renamed by then)
    run_and_kill(command, tmp_path, lambda: any(p.stat().st_size > 0
                                                for p in cache.glob(".train-images-idx3-ubyte.*.part*")))
    assert list(cache.glob(".*.part*")), "the kill should leave the download's temporary file"
    assert underway(folder, "download")

    result = resume(folder, "--set", f"data.mirrors=[{mirror_server.base_url}/ok/]")
    check_finished_run(result, folder, cache)
    assert skipped_stages(result) == []


def test_killed_during_preprocess(tmp_path, mnist_mirror):
    # the whole training file, so that preprocessing takes long enough to be caught
    folder, cache = tmp_path / "runs" / "pre", tmp_path / "cache"
    command = pipeline_command(
        tmp_path, "pre", "data.max_train_images=null", "data.validation_size=5000", "train.num_samples=1",
        "train.epochs=1", "model.conv1_filters=8", "model.conv2_filters=16", "model.dense_units=64",  # 55,000 images
        mirror=mnist_mirror,
    )
    run_and_kill(command, tmp_path, lambda: underway(folder, "preprocess"))
    assert stage_records(folder)["download"]["finished"] and underway(folder, "preprocess")

    result = resume("pre", "--set", f"run.root={tmp_path / 'runs'}")
    check_finished_run(result, folder, cache)
    # the download stage runs again to hand the files to preprocess (through Ray, not a path), from its cache
    assert skipped_stages(result) == []
    assert "train-images-idx3-ubyte: cached and verified" in result.stdout + result.stderr
    manifest = json.loads((folder / "data" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["shape"] == [55000, 28, 28]


def test_killed_mid_tune_restores_the_experiment(tmp_path, mnist_mirror):
    folder, cache = tmp_path / "runs" / "tune", tmp_path / "cache"
    command = pipeline_command(tmp_path, "tune", mirror=mnist_mirror)
    seen = {}

    def one_trial_finished_the_other_checkpointed():
        statuses = trial_statuses(folder)
        if sorted(statuses.values()) == ["RUNNING", "TERMINATED"]:
            running = next(trial for trial, status in statuses.items() if status == "RUNNING")
            if running in checkpointed_epochs(folder):
                seen.update(statuses=statuses)
                return True
        return False

    run_and_kill(command, tmp_path, one_trial_finished_the_other_checkpointed)
    finished = next(trial for trial, status in seen["statuses"].items() if status == "TERMINATED")
    interrupted = next(trial for trial, status in seen["statuses"].items() if status == "RUNNING")

    result = resume(folder)
    check_finished_run(result, folder, cache)
    assert skipped_stages(result) == ["download", "preprocess"]
    assert "restoring the Tune experiment" in result.stderr
    epochs = trial_epochs(folder)
    assert epochs[finished] == [1, 2, 3], "a finished trial was trained again"
    # the interrupted trial went on from a checkpoint: it never started again from epoch 1
    assert epochs[interrupted].count(1) == 1 and epochs[interrupted][-1] == 3, epochs[interrupted]
    assert set(epochs[interrupted]) == {1, 2, 3}
    assert all(status == "TERMINATED" for status in trial_statuses(folder).values())
    # train.max_concurrent_trials=1 held: the second trial started after the first had finished
    started = {trial: min(rows) for trial, rows in trial_timestamps(folder).items()}
    assert started[interrupted] >= max(trial_timestamps(folder)[finished]) - 1


def test_killed_during_evaluate_skips_training(tmp_path, mnist_mirror):
    folder, cache = tmp_path / "runs" / "eval", tmp_path / "cache"
    command = pipeline_command(tmp_path, "eval", "train.num_samples=1", "train.epochs=2", mirror=mnist_mirror)
    run_and_kill(command, tmp_path, lambda: underway(folder, "evaluate"))
    epochs_before = trial_epochs(folder)
    assert not (folder / "metrics.json").exists()

    result = resume(folder)
    check_finished_run(result, folder, cache)
    assert skipped_stages(result) == ["download", "preprocess", "train"]
    assert trial_epochs(folder) == epochs_before, "training ran again"

    # a finished run resumed: nothing to do, same result; a gate set now is checked against it
    again = resume(folder, "--set", "evaluate.min_test_accuracy=0.9999")
    assert again.returncode == 1 and "is below evaluate.min_test_accuracy=0.9999" in again.stderr
    assert skipped_stages(again) == ["download", "preprocess", "train", "evaluate"]
    # resuming with other training settings would throw the experiment away: refused, nothing touched
    changed = resume(folder, "--set", "train.epochs=5")
    assert changed.returncode == 2, changed.stderr
    assert changed.stderr.strip().splitlines()[-1] == (
        "mnist-pipeline: error: cannot resume run eval: its Tune experiment was started with other settings "
        "(train.epochs: 2 -> 5); resume without those changes, or start a new run"
    )
    assert trial_epochs(folder) == epochs_before
    assert "Ray" not in changed.stderr, "refused before any Ray started"


def test_resume_refusals(tmp_path, mnist_mirror):
    runs = tmp_path / "runs"
    missing = resume("nothing-here", "--set", f"run.root={runs}")
    assert missing.returncode == 2
    assert missing.stderr.strip() == (
        f"mnist-pipeline: error: no run to resume at {runs / 'nothing-here'} (no config.yaml there)"
    )
    both = resume("x", "--run-id", "y")
    assert both.returncode == 2 and "leave out --run-id" in both.stderr
    with_config = resume("x", "--config", "configs/quick.yaml")
    assert with_config.returncode == 2 and "not --config" in with_config.stderr

    # a run still going on cannot be resumed by a second driver
    folder = runs / "live"
    command = pipeline_command(tmp_path, "live", "train.epochs=20", "train.num_samples=1", mirror=mnist_mirror)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
                               env={**os.environ, "RAY_ADDRESS": ""}, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not underway(folder, "train"):
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.1)
        second = resume(folder)
        assert second.returncode == 2
        assert second.stderr.strip().splitlines()[-1].startswith("mnist-pipeline: error: run live is in progress (pid ")
    finally:
        process.kill()
        process.wait()
        _end_session(process.pid)


def test_state_pickled_before_the_parts_moved_into_subpackages_still_loads():
    """Tune restores an experiment by unpickling it; a run started when the stages' parts were modules of `stages`
    itself (stages.trial.run_trial, stages.search_algorithms..., stages.errors...) names them so. In a fresh
    interpreter, every old name unpickles to the very object of the module it moved to."""
    script = """
import inspect, pickle, sys
import stages
for old, package in stages._MOVED.items():
    module = __import__(f"stages.{package}.{old}", fromlist=["_"])
    name = next(name for name, value in vars(module).items()
                if (inspect.isfunction(value) or inspect.isclass(value)) and value.__module__ == module.__name__)
    loaded = pickle.loads(f"cstages.{old}\\n{name}\\n.".encode())
    assert loaded is getattr(module, name), (old, name)
    assert module.__spec__.name == module.__name__, "the moved module keeps its own spec"
print(len(stages._MOVED))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) == 21, "every module that moved"
