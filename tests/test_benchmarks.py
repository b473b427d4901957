"""`python -m benchmarks` runs every suite end to end on a tiny slice of real MNIST and writes well-formed results.

What it measures (speed) is not tested here: the machine is shared and noisy. Its code paths are: the TF1 and Keras
workers, real Tune trials, a real `mnist-pipeline run` and its breakdown, ASHA and FIFO, the disk figures.
"""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent
EPOCHS = 2


@pytest.fixture(scope="module")
def results(mnist_mirror, tmp_path_factory):
    folder = tmp_path_factory.mktemp("benchmarks")
    command = [
        sys.executable, "-m", "benchmarks", "--cpus", "2", "--images", "384", "--validation", "128",
        "--epochs", str(EPOCHS), "--search-trials", "2", "--search-epochs", "2",
        "--mirror", str(mnist_mirror), "--json", str(folder / "results.json"),
        "--work", str(folder / "work"),
        "--set", "data.max_train_images=1000", "--set", "data.validation_size=200", "--set", "data.max_test_images=300",
        "--set", "train.epochs=2", "--set", "train.num_samples=2", "--set", "train.grace_period=1",
    ]
    finished = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert finished.returncode == 0, finished.stderr[-3000:]
    return json.loads((folder / "results.json").read_text()), finished.stdout, folder / "work"


def test_throughput_measures_every_trainer_in_every_layout(results):
    data, stdout, _ = results
    rows = data["throughput"]
    layouts = {(row["name"], row["processes"], row["threads"]) for row in rows}
    assert layouts == {
        (name, processes, threads)
        for name in ("TF1 graph loop (seed)", "plain Keras fit", "pipeline trials")
        for processes, threads in ((1, 2), (2, 1))
    }
    for row in rows:
        assert len(row["epoch_rates"]) == row["processes"]
        assert all(len(rates) == EPOCHS and all(rate > 0 for rate in rates) for rates in row["epoch_rates"])
        assert row["slowest_epoch"] <= row["median_rate"] <= max(map(max, row["epoch_rates"]))
        assert row["slowest_epoch_vs_median"] == pytest.approx(row["slowest_epoch"] / row["median_rate"], abs=2e-3)
        if row["name"] == "pipeline trials":  # set against plain Keras and the TF1 loop in the same layout
            keras, tf1 = (next(r for r in rows if r["name"] == name and r["processes"] == row["processes"])
                          for name in ("plain Keras fit", "TF1 graph loop (seed)"))
            assert row["median_vs_plain_keras"] == pytest.approx(row["median_rate"] / keras["median_rate"], abs=2e-3)
            assert row["median_vs_tf1"] == pytest.approx(row["median_rate"] / tf1["median_rate"], abs=2e-3)
    targets = {check["target"] for check in data["targets"]}
    assert {"1x2 trials (float32) >= 1.0x the TF1 loop's median epoch",
            "every epoch of 2x1 trials >= 0.95x their median"} <= targets
    assert "TF1 graph loop (seed)" in stdout and "slowest vs" in stdout
    assert data["input_pipeline_images_per_second"] > 0 and "input pipeline alone" in stdout


def test_pipeline_breakdown_adds_up_to_the_wall_time(results):
    data, stdout, work = results
    run = data["pipeline"]
    assert math.isclose(sum(run["parts_seconds"].values()), run["wall_seconds"], abs_tol=1.0)
    assert run["parts_seconds"]["train: training_at_full_rate"] > 0 and run["parts_seconds"]["train: trial_startup"] > 0
    assert run["parts_seconds"]["train: idle_slots"] >= -0.5  # slot time no trial used; never much below zero
    assert run["epochs_trained"] == 4 and run["trial_slots"] == 2 and 0 < run["useful_training_fraction"] < 1
    assert 0 < run["test_accuracy"] <= 1
    # the disk figures are the run folder's own
    folder = next((work / "runs").iterdir())
    assert run["run_id"] == folder.name
    kept = list((folder / "tune").glob("*/checkpoint_*"))
    assert run["disk"]["checkpoints_kept"] == len(kept) > 0
    assert 0 < run["disk"]["tune_folder_bytes"] < run["disk"]["run_folder_bytes"]
    # written with Adam's two slots per weight, kept without them (train.slim_checkpoints)
    assert run["disk"]["written_checkpoint_bytes"] > 2 * run["disk"]["kept_checkpoint_bytes"] > 0
    written = run["disk"]["written_checkpoint_bytes"]
    assert run["disk"]["checkpoint_bytes_written"] == pytest.approx(4 * written, rel=0.01)
    assert f"pipeline run {folder.name}" in stdout
    with (folder / "trials.csv").open() as trials:
        policies = {row["dtype_policy"] for row in csv.DictReader(trials)}
    assert run["dtype_policies"] == sorted(policies) and len(policies) == 1  # trials on one machine
    assert f"computing in {run['dtype_policies'][0]}" in stdout


def test_schedulers_run_on_the_same_search_and_targets_are_judged(results):
    data, stdout, _ = results
    assert [row["scheduler"] for row in data["schedulers"]] == ["fifo", "asha"]
    fifo, asha = data["schedulers"]
    assert fifo["trials"] == asha["trials"] == 2 and fifo["epochs_trained"] == 4
    assert 2 <= asha["epochs_trained"] <= 4 and 0 < asha["best_val_accuracy"] <= 1
    judged = {check["target"].split(" ")[0] for check in data["targets"]}
    assert {"every", "useful", "test", "overhead", "tune/"} <= judged
    assert all(isinstance(check["met"], bool) for check in data["targets"])
    assert data["machine"]["cpus_available"] >= 1 and data["settings"]["epochs"] == EPOCHS
    assert "targets:" in stdout


def test_bad_arguments_are_refused_in_one_line():
    finished = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--suites", "throughput,speed"], cwd=REPO, capture_output=True, text=True
    )
    assert finished.returncode == 2 and "unknown suite 'speed'" in finished.stderr


def test_a_mirror_without_mnist_is_refused_in_one_line(tmp_path):
    finished = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--suites", "throughput", "--mirror", str(tmp_path), "--work",
         str(tmp_path / "work")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert finished.returncode == 2, finished.stderr[-2000:]
    assert "benchmarks: could not download a verified train-images-idx3-ubyte" in finished.stderr
    assert "Traceback" not in finished.stderr
