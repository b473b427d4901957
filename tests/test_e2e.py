"""The whole pipeline through real Ray and real Tune, on a slice of real MNIST served over loopback HTTP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, mirror_server):
    """Runs `python -m pipeline run` once (2 trials, 2 epochs, 3,000 training images); returns (folder, result)."""
    work = tmp_path_factory.mktemp("e2e")
    url = mirror_server.base_url
    result = subprocess.run(
        [
            sys.executable, "-m", "pipeline", "run", "--run-id", "e2e",
            "--set", f"run.root={work / 'runs'}",
            "--set", f"data.cache_dir={work / 'cache'}",
            # the first mirror is down: the run must fall through to the working one
            "--set", f"data.mirrors=[{url}/missing/, {url}/ok/]",
            "--set", "data.max_train_images=3000",
            "--set", "data.validation_size=500",
            "--set", "data.max_test_images=1000",
            "--set", "train.epochs=2",
            "--set", "train.num_samples=2",
            "--set", "train.grace_period=1",
            "--set", "train.search_space.batch_size={choice: [64]}",
            "--set", "ray.num_cpus=2",
            "--set", "ray.include_dashboard=false",
            # out of reach for 2 epochs: the run must finish, keep its artifacts, then fail the gate with exit 1
            "--set", "evaluate.min_test_accuracy=0.999",
        ],
        capture_output=True, text=True, cwd=REPO, timeout=900, env={**os.environ, "RAY_ADDRESS": ""},
    )
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    return work / "runs" / "e2e", result


def test_the_run_folder_holds_every_artifact(finished_run):
    folder, _ = finished_run
    for artifact in [
        "config.yaml", "pipeline.log", "summary.json", "metrics.json",
        "data/dataset.npz", "data/manifest.json", "model/model.keras", "model/hyperparameters.json", "tune",
    ]:
        assert (folder / artifact).exists(), artifact
    assert not list(folder.rglob("*.part*")), "temporary files left behind"


def test_summary_is_printed_then_the_quality_gate_fails_the_run(finished_run):
    folder, result = finished_run
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("mnist-pipeline: error: test accuracy 0.")
    assert "is below evaluate.min_test_accuracy=0.999" in error and str(folder) in error
    assert "run e2e finished in" in result.stdout
    assert "test accuracy:" in result.stdout and str(folder) in result.stdout
    assert "of 2 trials on 1 node" in result.stdout
    for stage in ("download", "preprocess", "train", "evaluate"):
        assert stage in result.stdout.split("stage times:")[1]


def test_tune_ran_two_trials_with_checkpoints_and_picked_the_best(finished_run):
    folder, _ = finished_run
    metrics = json.loads((folder / "metrics.json").read_text())
    trials = metrics["trials"]
    assert len(trials) == 2 and all(t["status"] == "TERMINATED" for t in trials)
    assert all(len(t["nodes"]) == 1 for t in trials)
    trial_folders = [p for p in (folder / "tune").iterdir() if p.is_dir()]
    assert len(trial_folders) == 2
    best_per_trial = []
    for trial_folder in trial_folders:
        assert list(trial_folder.glob("checkpoint_*/model.keras")), f"no checkpoint in {trial_folder.name}"
        rows = [json.loads(line) for line in (trial_folder / "result.json").read_text().splitlines()]
        assert [row["epoch"] for row in rows] == list(range(1, len(rows) + 1))
        assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "images_per_second"} <= set(rows[0])
        best_per_trial.append(max(row["val_accuracy"] for row in rows))
    assert metrics["val_accuracy"] == pytest.approx(max(best_per_trial))
    assert Path(metrics["checkpoint"]).is_relative_to(folder / "tune")
    # the base trial runs the classic hyperparameters as they are
    assert any(t["hyperparameters"]["dropout"] == 0.0 and t["hyperparameters"]["batch_size"] == 128 for t in trials)


def test_metrics_agree_with_the_exported_model(finished_run):
    import keras

    folder, _ = finished_run
    metrics = json.loads((folder / "metrics.json").read_text())
    with np.load(folder / "data" / "dataset.npz") as dataset:
        images, labels = dataset["test_images"], dataset["test_labels"]
    assert len(labels) == 1000 == metrics["test_images"]
    model = keras.models.load_model(folder / "model" / "model.keras", safe_mode=True)
    predicted = model.predict(images, batch_size=500, verbose=0).argmax(axis=1)
    assert metrics["test_accuracy"] == pytest.approx(float(np.mean(predicted == labels)), abs=1e-9)
    confusion = np.zeros((10, 10), int)
    np.add.at(confusion, (labels, predicted), 1)
    assert metrics["confusion_matrix"] == confusion.tolist()
    assert metrics["test_accuracy"] > 0.85, "two epochs on 2,500 images should already learn the digits"
    hyperparameters = json.loads((folder / "model" / "hyperparameters.json").read_text())
    assert hyperparameters == metrics["hyperparameters"]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["test_accuracy"] == metrics["test_accuracy"]
    assert set(summary["stage_seconds"]) == {"download", "preprocess", "train", "evaluate"}


def test_manifest_describes_the_slice(finished_run):
    folder, _ = finished_run
    manifest = json.loads((folder / "data" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["shape"] == [2500, 28, 28]
    assert manifest["splits"]["validation"]["shape"] == [500, 28, 28]
    assert manifest["seed"] == 0 and len(manifest["fingerprint"]) == 64 and len(manifest["dataset_sha256"]) == 64
