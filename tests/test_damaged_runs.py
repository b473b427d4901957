"""`run --resume` never harms what it is given, and `runs` survives damage.

One tiny real run is made (a few hundred images, one trial of one epoch, a small CNN); each case damages a copy.
Refusals run the CLI in this process (no Ray starts: that is part of what they check); one real resume recovers a
copy whose every output is damaged.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from run_data import dataset_file

REPO = Path(__file__).resolve().parent.parent
OTHER_ID = 54321  # a user and group id that no account here has


def pipeline(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout, env={**os.environ, "RAY_ADDRESS": ""})


@pytest.fixture(scope="module")
def finished(tmp_path_factory, mnist_mirror) -> Path:
    """A finished tiny run: its folder."""
    work = tmp_path_factory.mktemp("damaged")
    sets = {
        "run.root": work / "runs", "data.cache_dir": work / "cache", "data.mirrors": f"[{mnist_mirror}]",
        "data.max_train_images": 600, "data.validation_size": 100, "data.max_test_images": 200,
        "model.conv1_filters": 4, "model.conv2_filters": 8, "model.dense_units": 16,
        "train.epochs": 1, "train.num_samples": 1, "train.scheduler": "fifo", "train.search_space": "{}",
        "ray.num_cpus": 1, "ray.include_dashboard": "false",
    }
    result = pipeline("run", "--run-id", "good", *[f"--set={key}={value}" for key, value in sets.items()])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return work / "runs" / "good"


def copy_run(finished: Path, root: Path, name: str) -> Path:
    return Path(shutil.copytree(finished, root / name, symlinks=True))


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every path under `folder` with its kind, size, time and mode: what any write would change."""
    found = {}
    for path in [folder, *folder.rglob("*")]:
        status = path.lstat()
        found[str(path.relative_to(folder))] = (stat.S_IFMT(status.st_mode), status.st_size, status.st_mtime_ns,
                                                status.st_mode, status.st_uid)
    return found


def cli(capsys, *args: str) -> tuple[int, str]:
    """The CLI in this process: (exit code, stderr). These cases end before Ray starts."""
    from pipeline.cli import main

    code = main(list(args))
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized(), "Ray was started"
    return code, capsys.readouterr().err


def assert_refused(code: int, err: str, *expected: str) -> str:
    """Exit 2, one line on stderr, no traceback, the line holding each of `expected`."""
    assert code == 2, err
    assert "Traceback" not in err
    line = err.strip()
    assert "\n" not in line and line.startswith("mnist-pipeline: error: "), err
    for text in expected:
        assert text in line, line
    return line


def write_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value))


# --- a folder that is not a run -----------------------------------------------------------------------------------


def test_a_folder_that_is_not_a_run_is_refused_untouched(tmp_path, capsys, monkeypatch):
    project = tmp_path / "myproject"
    project.mkdir()
    own = b"# my project's settings\ntrain:\n  epochs: 3   # keep this comment\n"
    (project / "config.yaml").write_bytes(own)
    before = snapshot(project)
    code, err = cli(capsys, "run", "--resume", str(project))
    assert_refused(code, err, f"{project} is not a run of mnist-pipeline", "nothing there was changed")
    assert (project / "config.yaml").read_bytes() == own
    assert snapshot(project) == before, "no file written, not even a lock"

    # a stages.json of something else does not make a run either
    (project / "stages.json").write_text('["not", "ours"]')
    before = snapshot(project)
    code, err = cli(capsys, "run", "--resume", str(project))
    assert_refused(code, err, f"{project} is not a run", "stages.json is damaged (a JSON list, not an object)")
    assert snapshot(project) == before

    # the current folder, named as "."
    monkeypatch.chdir(project)
    code, err = cli(capsys, "run", "--resume", ".")
    assert_refused(code, err, f"{project} is not a run")
    assert snapshot(project) == before


def test_a_run_without_the_marker_is_recognised_by_its_records(finished, tmp_path, capsys):
    """Runs made before the marker existed: config.yaml and stages.json in our format. Recognised, it goes on to
    the checks after (here: a setting that would throw its training away), still before Ray starts."""
    run = copy_run(finished, tmp_path, "old")
    (run / ".mnist-pipeline-run").unlink()
    before = snapshot(run)
    code, err = cli(capsys, "run", "--resume", str(run), "--set", "train.epochs=2")
    assert_refused(code, err, "cannot resume run old: its Tune experiment was started with other settings "
                              "(train.epochs: 1 -> 2)")
    assert snapshot(run) == before


# --- overrides ------------------------------------------------------------------------------------------------------


def test_overrides_are_checked_against_the_runs_own_config(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path, "own")
    before = snapshot(run)
    # valid for the run (validation_size 100 of 600 images), not for the defaults (5000 of 600): accepted; the
    # refusal that follows is check_resume's, about the training setting changed alongside
    code, err = cli(capsys, "run", "--resume", str(run), "--set", "data.max_train_images=600",
                    "--set", "train.epochs=2")
    assert_refused(code, err, "its Tune experiment was started with other settings (train.epochs: 1 -> 2)")
    # valid for the defaults (60,000 images), not for the run (600): refused, naming the key
    code, err = cli(capsys, "run", "--resume", str(run), "--set", "data.validation_size=1000")
    assert_refused(code, err, "data.validation_size: 1000 leaves no training images (only 600 are used")
    # a run id is looked up under run.root, the only setting read against the defaults
    code, err = cli(capsys, "run", "--resume", "own", "--set", f"run.root={tmp_path}", "--set",
                    "data.validation_size=1000")
    assert_refused(code, err, "data.validation_size: 1000 leaves no training images (only 600 are used")
    assert snapshot(run) == before


# --- damaged bookkeeping ------------------------------------------------------------------------------------------


def _records(run: Path) -> dict:
    return json.loads((run / "stages.json").read_text())


STAGES_DAMAGE = {
    "a list": (lambda run: write_json(run / "stages.json", [1, 2]), "a JSON list, not an object"),
    "truncated": (lambda run: (run / "stages.json").write_bytes((run / "stages.json").read_bytes()[:200]),
                  "not valid JSON"),
    "binary": (lambda run: (run / "stages.json").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00garbage"),
               "not text (binary data)"),
    "a record lacks a field": (
        lambda run: write_json(run / "stages.json", {**_records(run), "train": {
            k: v for k, v in _records(run)["train"].items() if k != "code"}}),
        "record 'train': no 'code'"),
    "a record has an extra field": (
        lambda run: write_json(run / "stages.json", {**_records(run), "train": {
            **_records(run)["train"], "surprise": 1}}),
        "record 'train': unexpected field 'surprise'"),
    "a number for a string": (
        lambda run: write_json(run / "stages.json", {**_records(run), "train": {
            **_records(run)["train"], "fingerprint": 5}}),
        "record 'train': 'fingerprint' should be a string, got a number"),
    "a record that is a string": (
        lambda run: write_json(run / "stages.json", {**_records(run), "evaluate": "done"}),
        "record 'evaluate': not an object"),
    "an unknown stage": (lambda run: write_json(run / "stages.json", {**_records(run), "deploy": {}}),
                         "unknown stage 'deploy'"),
    "a folder": (lambda run: ((run / "stages.json").unlink(), (run / "stages.json").mkdir()),
                 "a folder, not a file"),
    "a FIFO": (lambda run: ((run / "stages.json").unlink(), os.mkfifo(run / "stages.json")),
               "not a regular file"),
}

CONFIG_DAMAGE = {
    "a list": (lambda run: (run / "config.yaml").write_text("- run\n- train\n"), "a list, not a mapping"),
    "cut short": (lambda run: (run / "config.yaml").write_text(
        (run / "config.yaml").read_text().split("\nevaluate:")[0]), "no 'evaluate' section (cut short?)"),
    "cut mid-line": (lambda run: (run / "config.yaml").write_text(
        (run / "config.yaml").read_text().split("\ndata:")[0] + "\ndata:\n  mirrors: [/x\n"), "not valid YAML"),
    "binary": (lambda run: (run / "config.yaml").write_bytes(b"\x00\xff\xfe" * 50), "not text (binary data)"),
    "a number for a string": (lambda run: (run / "config.yaml").write_text(
        (run / "config.yaml").read_text().replace("cache_dir: ", "cache_dir: 5 #")), "data.cache_dir"),
    "a folder": (lambda run: ((run / "config.yaml").unlink(), (run / "config.yaml").mkdir()),
                 "a folder, not a file"),
}


@pytest.mark.parametrize("file, damage", [("stages.json", name) for name in STAGES_DAMAGE]
                         + [("config.yaml", name) for name in CONFIG_DAMAGE])
def test_damaged_records_are_refused_in_one_line(finished, tmp_path, capsys, file, damage):
    run = copy_run(finished, tmp_path, "damaged")
    spoil, what = (STAGES_DAMAGE if file == "stages.json" else CONFIG_DAMAGE)[damage]
    spoil(run)
    before = snapshot(run)
    code, err = cli(capsys, "run", "--resume", str(run))
    assert_refused(code, err, f"{run / file}", what)
    assert snapshot(run) == before


# --- someone else's run ---------------------------------------------------------------------------------------------


def test_a_run_another_user_could_write_is_refused(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path, "shared")
    tune = run / "tune"
    trial = next(path for path in tune.iterdir() if path.is_dir())

    def refused(path: Path, problem: str, fix: str) -> None:
        before = snapshot(run)
        code, err = cli(capsys, "run", "--resume", str(run))
        assert_refused(code, err, f"not resuming {run}: {path} {problem}", "pickle", fix)
        assert snapshot(run) == before

    tune.chmod(tune.stat().st_mode | stat.S_IWOTH)
    refused(tune, "is writable by every user", f"chmod -R go-w {run}")
    tune.chmod(tune.stat().st_mode & ~stat.S_IWOTH)
    run.chmod(run.stat().st_mode | stat.S_IWOTH)
    refused(run, "is writable by every user", f"chmod -R go-w {run}")
    run.chmod(run.stat().st_mode & ~stat.S_IWOTH)

    link = trial / "params.pkl"
    target = tmp_path / "elsewhere.pkl"
    link.rename(target)
    link.symlink_to(target)
    refused(link, "is a symbolic link", "replace")
    link.unlink()
    target.rename(link)

    if os.geteuid() != 0:
        pytest.skip("giving a file to another user or group needs root")
    state = next(tune.glob("experiment_state-*.json"))
    os.chown(state, OTHER_ID, -1)
    refused(state, f"belongs to uid {OTHER_ID}, not to you (root)", f"chown -R root {run}")
    os.chown(state, 0, -1)
    os.chown(trial, -1, OTHER_ID)
    trial.chmod(trial.stat().st_mode | stat.S_IWGRP)
    refused(trial, f"is writable by group gid {OTHER_ID}", f"chmod -R go-w {run}")


def test_the_experiment_is_restored_only_from_the_run_folder():
    from pipeline.run_folder import RunFolder
    from stages.common import storage
    from stages.train import EXPERIMENT_NAME

    for location in ("/runs/x", "s3://bucket/runs/x?region=us-east-1"):
        assert RunFolder(location).tune_dir == storage.join(location, EXPERIMENT_NAME)


# --- what resume finds damaged, before any stage runs -----------------------------------------------------------------


def test_damaged_outputs_are_recognised(finished, tmp_path):
    from pipeline.run_files import DamagedFile, check_exported_model, experiment_problem, read_metrics
    from pipeline.run_folder import RunFolder

    run = copy_run(finished, tmp_path, "outputs")
    folder = RunFolder(str(run))
    assert read_metrics(folder).test_images == 200
    check_exported_model(folder)
    assert experiment_problem(folder) is None

    metrics = json.loads((run / "metrics.json").read_text())
    for damaged, what in [
        (b'{"val_accuracy": 0.9, "test_acc', "not valid JSON"),
        (b"[]", "a JSON list, not an object"),
        (json.dumps({**metrics, "test_accuracy": "high"}).encode(), "'test_accuracy' should be a number"),
        (json.dumps({**metrics, "trials": [{"trial_id": 1}]}).encode(), "trials[0]: 'trial_id' should be a string"),
        (json.dumps({k: v for k, v in metrics.items() if k != "best_epoch"}).encode(), "no 'best_epoch'"),
    ]:
        (run / "metrics.json").write_bytes(damaged)
        with pytest.raises(DamagedFile, match="metrics.json: " + what.replace("[", r"\[")):
            read_metrics(folder)

    model = (run / "model" / "model.keras").read_bytes()
    (run / "model" / "model.keras").write_bytes(model[: len(model) // 2])
    with pytest.raises(DamagedFile, match="truncated or garbled"):
        check_exported_model(folder)
    (run / "model" / "model.keras").write_bytes(model[:1000] + bytes(200) + model[1200:])
    with pytest.raises(DamagedFile, match="model.keras: garbled .* fails its checksum|truncated or garbled"):
        check_exported_model(folder)
    (run / "model" / "model.keras").unlink()
    with pytest.raises(DamagedFile, match="model.keras: missing"):
        check_exported_model(folder)

    tune = run / "tune"
    tuner = (tune / "tuner.pkl").read_bytes()
    (tune / "tuner.pkl").write_bytes(tuner[:100])
    assert experiment_problem(folder).endswith("tuner.pkl: truncated or garbled")
    (tune / "tuner.pkl").write_bytes(tuner)
    state = next(tune.glob("experiment_state-*.json"))
    state.write_bytes(state.read_bytes()[:300])
    assert "experiment_state-" in experiment_problem(folder) and "not valid JSON" in experiment_problem(folder)
    state.unlink()
    assert experiment_problem(folder).endswith("no experiment_state-*.json beside tuner.pkl")


def test_a_finished_experiment_read_back_damaged_is_a_data_error(finished, tmp_path, monkeypatch):
    """What the resumed train stage reads back (load_outcome_task): damage is a DataError, which trains again."""
    from pipeline.tasks import load_outcome_task
    from stages.common.errors import DataError

    monkeypatch.setattr("pipeline.tasks._worker_logging", lambda level: None)  # pytest's logging stays
    read_back = load_outcome_task._function  # the task's own code, here, without Ray
    run = copy_run(finished, tmp_path, "experiment")
    tune = run / "tune"
    assert read_back(str(tune), 30).best_trial_id
    trial = next(path for path in tune.iterdir() if path.is_dir())
    result = (trial / "result.json").read_bytes()
    (trial / "result.json").write_text("{garbled\n")
    with pytest.raises(DataError, match="tune: no trial finished with a usable checkpoint|cannot be read"):
        read_back(str(tune), 30)
    (trial / "result.json").write_bytes(result)
    for checkpoint in trial.glob("checkpoint_*"):
        shutil.rmtree(checkpoint)
    with pytest.raises(DataError, match="the best checkpoint is gone"):
        read_back(str(tune), 30)
    shutil.rmtree(tune)
    with pytest.raises(DataError, match="tune: "):
        read_back(str(tune), 30)


# --- resumes that recover -------------------------------------------------------------------------------------------


def test_resume_runs_again_what_is_damaged(finished, tmp_path):
    """A real resume of a run whose every output is damaged: metrics.json cut short, the exported model truncated,
    summary.json garbled, the dataset garbled, the Tune experiment's state cut short. Each is said, the stages run
    again (train too: its experiment cannot be read back), the damaged experiment is kept aside, the run is whole.

    The other path, evaluate again with training kept, is the same check (read_metrics, check_exported_model:
    test_damaged_outputs_are_recognised) leading to the branch that test_resume (killed during evaluate) and
    test_remote_storage (metrics.json and the model deleted) run for real; a second resume here would double this
    file's time."""
    run = copy_run(finished, tmp_path, "again")
    (run / "metrics.json").write_bytes((finished / "metrics.json").read_bytes()[:150])
    model = (finished / "model" / "model.keras").read_bytes()
    (run / "model" / "model.keras").write_bytes(model[: len(model) // 3])
    (run / "summary.json").write_bytes(b"\x00\x01garbage")
    shutil.rmtree(dataset_file(run).parent)  # the split it references, in the node's cache: gone
    state = next((run / "tune").glob("experiment_state-*.json"))
    state.write_bytes(state.read_bytes()[:400])

    result = pipeline("run", "--resume", str(run), timeout=400)
    log = result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "Traceback" not in log
    assert f"stage evaluate: {run / 'metrics.json'}: not valid JSON" in log
    assert "stage preprocess: started" in log and "stage preprocess: done" in log and "is gone or changed" in log
    assert "Tune experiment cannot be" in log and "stage train: done" in log
    assert "stage evaluate: done" in log
    (kept,) = run.glob("tune.damaged-*")
    assert (kept / state.name).stat().st_size == 400, "the damaged experiment is kept as it was"
    assert_whole(run)


def assert_whole(run: Path) -> None:
    """Every artifact there and sound: the metrics match a recomputation from the exported model."""
    import keras
    import numpy as np

    metrics = json.loads((run / "metrics.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test_accuracy"] == metrics["test_accuracy"] and summary["trials"] == 1
    with np.load(dataset_file(run)) as dataset:
        images, labels = dataset["test_images"], dataset["test_labels"]
    model = keras.models.load_model(run / "model" / "model.keras", safe_mode=True)
    accuracy = float(np.mean(model.predict(images, verbose=0).argmax(axis=1) == labels))
    assert metrics["test_accuracy"] == pytest.approx(accuracy, abs=1e-9)
    assert all(record["finished"] for record in json.loads((run / "stages.json").read_text()).values())


# --- the listing ----------------------------------------------------------------------------------------------------


def test_runs_lists_every_run_and_marks_the_damaged(finished, tmp_path):
    root = tmp_path / "runs"
    small = ["config.yaml", "stages.json", "summary.json", "metrics.json", ".mnist-pipeline-run"]

    def run(name: str) -> Path:
        folder = root / name
        (folder / "model").mkdir(parents=True)
        for file in small:
            shutil.copy(finished / file, folder / file)
        (folder / "model" / "model.keras").write_bytes(b"listing does not open it")
        return folder

    run("a-good")
    write_json(run("b-stages-list") / "stages.json", [1, 2])
    (run("c-stages-cut") / "stages.json").write_bytes((finished / "stages.json").read_bytes()[:100])
    (run("d-stages-binary") / "stages.json").write_bytes(b"\x89PNG\r\n\x1a\n\xff")
    records = json.loads((finished / "stages.json").read_text())
    write_json(run("e-stages-field") / "stages.json", {**records, "train": {**records["train"], "seconds": "slow"}})
    write_json(run("f-summary-list") / "summary.json", ["a"])
    summary = json.loads((finished / "summary.json").read_text())
    write_json(run("g-summary-shape") / "summary.json", {**summary, "trials": "one"})
    (run("h-summary-cut") / "summary.json").write_bytes((finished / "summary.json").read_bytes()[:50])
    config = run("i-config-folder") / "config.yaml"
    config.unlink()
    config.mkdir()
    fifo = run("j-stages-fifo") / "stages.json"
    fifo.unlink()
    os.mkfifo(fifo)
    (run("k-metrics-gone") / "metrics.json").unlink()
    (root / "l-not-a-run").mkdir()
    (root / "a-file").write_text("not a folder")
    locked = run("m-locked")
    if os.geteuid() != 0:  # root reads whatever the permissions say
        (locked / "summary.json").chmod(0)
        locked.chmod(0)

    result = pipeline("runs", "--set", f"run.root={root}", timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" or "Traceback" not in result.stderr
    lines = result.stdout.strip().splitlines()
    rows = {line.split()[0]: line for line in lines[1:-1]}
    assert sorted(rows) == ["a-good", "b-stages-list", "c-stages-cut", "d-stages-binary", "e-stages-field",
                            "f-summary-list", "g-summary-shape", "h-summary-cut", "i-config-folder", "j-stages-fifo",
                            "k-metrics-gone", "m-locked"]
    metrics = json.loads((finished / "metrics.json").read_text())
    assert rows["a-good"].split()[1:4] == ["finished", f"{metrics['val_accuracy']:.2%}",
                                           f"{metrics['test_accuracy']:.2%}"]
    expected = {
        "b-stages-list": "damaged (stages.json: a JSON list, not an object)",
        "c-stages-cut": "damaged (stages.json: not valid JSON",
        "d-stages-binary": "damaged (stages.json: not text (binary data))",
        "e-stages-field": "damaged (stages.json: record 'train': 'seconds' should be a number or null, got a",
        "f-summary-list": "damaged (summary.json: a JSON list, not an object)",
        "g-summary-shape": "damaged (summary.json: 'trials' should be an integer, got a string)",
        "h-summary-cut": "damaged (summary.json: not valid JSON",
        "i-config-folder": "damaged (config.yaml: a folder, not a file)",
        "j-stages-fifo": "damaged (stages.json: not a regular file)",
        "k-metrics-gone": "damaged (metrics.json: missing)",
        "m-locked": "damaged (folder: permission denied)" if os.geteuid() != 0 else "finished",
    }
    for name, status in expected.items():
        assert status in rows[name], rows[name]
    assert lines[-1].startswith(f"12 runs in {root} ({10 if os.geteuid() == 0 else 11} damaged)")
    if os.geteuid() != 0:
        locked.chmod(0o755)
