"""A run's winner as an output: `export-config` retrains it exactly, and `train.warm_start` seeds a new search with
a run's trials. Real pipeline runs (CLI, local Ray, Tune's successive halving) on a slice of real MNIST."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.e2e

SLICE = [
    "data.max_train_images=2000", "data.validation_size=500", "data.max_test_images=500",
    "model.conv1_filters=4", "model.conv2_filters=8", "model.dense_units=32", "model.lr_schedule=one_cycle",
    "train.num_samples=4", "train.finalists=2", "train.grace_period=1", "train.epochs=3", "train.time_budget_s=null",
    "train.search_space={dropout: {uniform: [0.0, 0.4]}, learning_rate: {loguniform: [1.0e-3, 1.0e-2]}}",
    "ray.num_cpus=2", "ray.include_dashboard=false", "evaluate.ensemble_top_k=null",
]


def pipeline(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def searched(mnist_mirror, tmp_path_factory):
    """A finished halving search: 4 trials of an epoch, the best 2 to epoch 3."""
    work = tmp_path_factory.mktemp("export")
    common = [f"run.root={work / 'runs'}", f"data.cache_dir={work / 'cache'}", f"data.mirrors=[{mnist_mirror}]"]
    sets = [part for setting in [*common, *SLICE] for part in ("--set", setting)]
    result = pipeline("run", "--run-id", "search", *sets, cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    trained = sorted(trial["epochs"] for trial in metrics(work, "search")["trials"])
    assert trained == [1, 1, 3, 3], "the best 2 of the first rung (an epoch) go on to epoch 3, the others stop"
    return work, sets


def metrics(work: Path, run: str) -> dict:
    return json.loads((work / "runs" / run / "metrics.json").read_text())


def test_export_config_retrains_the_winner_to_the_last_digit(searched):
    work, sets = searched
    exported = pipeline("export-config", "search", *sets, cwd=work)
    assert exported.returncode == 0, exported.stderr
    config = yaml.safe_load(exported.stdout)
    search = metrics(work, "search")
    winner = next(t for t in search["trials"] if t["trial_id"] == search["best_trial_id"])
    assert winner["rungs"] == [1, 3], "the winner is a finalist: one cycle to epoch 1, one to 3"
    assert config["train"]["lr_cycle_ends"] == [1, 3] and config["train"]["trial_seed"] == winner["trial_seed"]
    assert config["train"]["num_samples"] == 1 and config["train"]["search_space"] == {}
    assert config["train"]["epochs"] == search["best_epoch"]
    assert {k: config["model"][k] for k in ("dropout", "learning_rate")} == {
        k: search["hyperparameters"][k] for k in ("dropout", "learning_rate")}
    (work / "winner.yaml").write_text(exported.stdout)
    replay = pipeline("run", "--config", str(work / "winner.yaml"), "--run-id", "replay", cwd=work)
    assert replay.returncode == 0, replay.stderr[-3000:]
    again = metrics(work, "replay")
    assert again["val_accuracy"] == search["val_accuracy"] and again["best_epoch"] == search["best_epoch"]
    assert again["trials"][0]["val_accuracy_by_epoch"] == winner["val_accuracy_by_epoch"][: search["best_epoch"]]
    assert again["test_accuracy"] == search["test_accuracy"]


def test_export_config_refuses_what_is_not_a_finished_run(searched):
    work, sets = searched
    refused = pipeline("export-config", "nothing-here", *sets, cwd=work)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "nothing-here" in refused.stderr


def test_a_warm_start_tries_the_earlier_runs_best_settings_first(searched):
    work, sets = searched
    best = max(metrics(work, "search")["trials"], key=lambda t: t["best_val_accuracy"])["hyperparameters"]
    short = ["--set", "train.num_samples=3", "--set", "train.epochs=1", "--set", "train.include_base_trial=false"]
    warm = pipeline("run", "--run-id", "warm", *sets, *short, "--set", "train.warm_start=[search]", cwd=work)
    assert warm.returncode == 0, warm.stderr[-3000:]
    cold = pipeline("run", "--run-id", "cold", *sets, *short, cwd=work)
    assert cold.returncode == 0, cold.stderr[-3000:]

    def searched_values(run: str) -> list[dict]:
        trials = sorted(metrics(work, run)["trials"], key=lambda t: t["trial_id"])  # in the order Tune made them
        return [{k: t["hyperparameters"][k] for k in ("dropout", "learning_rate")} for t in trials]

    warm_trials, cold_trials = searched_values("warm"), searched_values("cold")
    # a third of the 3 trials: the earlier run's best settings, first; then the samples the search makes anyway
    assert warm_trials[0] == {k: best[k] for k in ("dropout", "learning_rate")}
    assert warm_trials[1:] == cold_trials[:2]


def test_a_warm_start_gives_optuna_the_earlier_results_and_skips_what_its_space_cannot_hold():
    from stages.training.hyperparameters import Hyperparameters
    from stages.training.search_algorithms import EarlierTrial, make_searcher
    from stages.training.train_settings import TrainSettings
    from stages.training.tune_results import METRIC, MODE

    settings = TrainSettings.model_validate({
        "searcher": "optuna", "num_samples": 4,
        "search_space": {"dropout": {"uniform": [0.0, 0.5]}, "batch_size": {"choice": [64, 128]},
                         "dense_units": {"randint": [16, 64]}},
    })
    base = Hyperparameters()
    earlier = [
        EarlierTrial({"dropout": 0.1, "batch_size": 64, "dense_units": 32}, 0.99, 0.97),
        EarlierTrial({"dropout": 0.4, "batch_size": 128, "dense_units": 16}, 0.98, 0.95),
        EarlierTrial({"dropout": 0.2, "batch_size": 256, "dense_units": 32}, 0.995, 0.98),  # 256: not a choice here
        EarlierTrial({"dropout": 0.2, "batch_size": 64, "dense_units": 64}, 0.995, 0.98),  # randint excludes 64
    ]
    searcher = make_searcher(settings, base, seed=3, earlier=earlier)
    assert searcher.set_search_properties(METRIC, MODE, settings.param_space(base))
    told = [(trial.params, trial.value) for trial in searcher._ot_study.trials]
    assert told == [({"dropout": 0.1, "batch_size": 64, "dense_units": 32}, 0.97),
                    ({"dropout": 0.4, "batch_size": 128, "dense_units": 16}, 0.95)]
