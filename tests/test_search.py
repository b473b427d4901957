"""Searchers, schedulers and when a search stops, through real Ray Tune and the real trainable (stages.training.trial
via stages.train.train) on a slice of real MNIST (1,000 training and 500 validation images) with a tiny CNN.

Each setting is checked against what it must do, so that a setting silently ignored fails its test: ASHA's epochs are
replayed from the trials' own results with its rule, the model-based searchers' suggestions are replayed with the
same seed, trials limited to one at a time must not overlap, and so on.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from stages.common.errors import BadInputError, TrainingError
from stages.training.hyperparameters import Hyperparameters
from stages.training.train_settings import TrainSettings, unrepeatable_because
from stages.training.tune_results import METRIC, MODE

pytestmark = pytest.mark.e2e

BASE = Hyperparameters(conv1_filters=4, conv2_filters=8, dense_units=32, learning_rate=3e-3)
BASE_PARAMETERS = (5 * 5 * 1 * 4 + 4) + (5 * 5 * 4 * 8 + 8) + (7 * 7 * 8 * 32 + 32) + (32 * 10 + 10)
SEED = 7


def settings(**changes) -> TrainSettings:
    """Small experiments: no retries (a failure shows at once), one searched hyperparameter unless said otherwise."""
    values = {
        "epochs": 2, "num_samples": 2, "max_failures": 0, "include_base_trial": False, "scheduler": "fifo",
        "time_budget_s": None, "reduction_factor": 2.0, "mixed_precision": False,  # the defaults these tests knew
        "search_space": {"learning_rate": {"loguniform": [1e-3, 1e-2]}},
    }
    return TrainSettings.model_validate({**values, **changes})


def run(data, root: Path, train_settings: TrainSettings, **options):
    from stages.train import train

    return train(*data, base=BASE, settings=train_settings, storage_path=str(root), seed=SEED, **options)


def trials_in_order(experiment: Path) -> list[dict]:
    """Every trial that reported, in the order Tune created them: its id, folder and result rows."""
    found = []
    for result_file in experiment.glob("*/result.json"):
        rows = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
        if rows:
            trial_id = rows[0]["trial_id"]
            # folders are named {trainable}_{trial id}_{experiment tag}_{date}; a tag starts with the trial's number
            number = int(result_file.parent.name.split(f"{trial_id}_", 1)[1].split("_", 1)[0])
            found.append({"id": trial_id, "number": number, "folder": result_file.parent, "rows": rows})
    return sorted(found, key=lambda trial: trial["number"])


def epochs_of(trial: dict) -> list[int]:
    return [row["epoch"] for row in trial["rows"]]


def assert_one_at_a_time(trials: list[dict]) -> None:
    """No two trials overlap in time: each starts after the one before ended. From the trials' own results: a trial
    starts time_this_iter_s before its first result, and ends at its last; Tune's timestamps are whole seconds, so a
    start may show up to one second before the previous end."""
    spans = sorted((t["rows"][0]["timestamp"] - t["rows"][0]["time_this_iter_s"], t["rows"][-1]["timestamp"], t["id"])
                   for t in trials)
    for (_, end, before), (start, _, after) in zip(spans, spans[1:]):
        assert start > end - 1, f"trial {after} started at {start:.1f} before trial {before} ended at {end}"


def searched(hyperparameters: dict, space: dict) -> dict:
    return {name: hyperparameters[name] for name in space}


# --- settings that are refused ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("changes, message", [
    ({"searcher": "optuna", "search_space": {"optimizer": {"grid": ["adam", "sgd"]}}},
     "searcher: optuna cannot take grid entries (search_space.optimizer): only searcher random expands grids"),
    ({"searcher": "hyperopt", "search_space": {}}, "searcher: hyperopt needs at least one search_space entry"),
    ({"scheduler": "bohb"}, "scheduler: bohb works only with searcher bohb, got searcher random"),
    ({"searcher": "bohb", "scheduler": "asha"}, "searcher: bohb needs scheduler bohb"),
    ({"scheduler": "pbt", "search_space": {"batch_size": {"choice": [64]}}},
     "scheduler: pbt needs a search_space entry with more than one value to perturb"),
    ({"scheduler": "pbt", "searcher": "optuna"}, "scheduler: pbt takes its population from searcher random"),
    ({"scheduler": "pbt", "num_samples": 1}, "scheduler: pbt needs a population of at least 2 trials"),
    ({"scheduler": "pbt", "epochs": 4, "pbt_interval": 4}, "pbt_interval: 4 is not below epochs (4)"),
    ({"scheduler": "hyperband", "num_samples": 4, "max_concurrent_trials": 2},
     "max_concurrent_trials: 2 is below the 4 trials, and scheduler hyperband pauses trials"),
    ({"target_val_accuracy": 0}, "greater than 0"),
    ({"target_val_accuracy": 1.5}, "less than or equal to 1"),
    ({"time_budget_s": 0}, "greater than 0"),
    ({"searcher": "grid"}, "Input should be 'random', 'optuna', 'hyperopt' or 'bohb'"),
])
def test_combinations_that_cannot_work_are_refused(changes, message):
    with pytest.raises(ValidationError) as refused:
        settings(**changes)
    assert message in str(refused.value)


def test_a_refusal_names_the_setting_to_change():
    from pipeline.config_loading import load_config

    with pytest.raises(BadInputError, match=r"train\.searcher: optuna cannot take grid entries"):
        load_config(None, ["train.searcher=optuna", "train.search_space={optimizer: {grid: [adam, sgd]}}"])
    with pytest.raises(BadInputError, match=r"train\.scheduler: bohb works only with searcher bohb"):
        load_config(None, ["train.scheduler=bohb"])


def test_a_base_trial_outside_the_choices_of_optuna_is_refused_before_tune_starts(tmp_path):
    from stages.train import train

    choosy = settings(searcher="optuna", include_base_trial=True, search_space={"optimizer": {"choice": ["sgd"]}})
    with pytest.raises(BadInputError, match=r"^train\.include_base_trial: searcher optuna starts from the model "
                                            r"section's values, and model\.optimizer \('adam'\) is not among"):
        train(None, None, base=BASE, settings=choosy, storage_path=str(tmp_path), seed=SEED)
    assert not list(tmp_path.iterdir()), "nothing may be written"


# --- whether a search can be repeated ---------------------------------------------------------------------------------


def test_what_makes_a_search_unrepeatable():
    assert unrepeatable_because(settings(scheduler="asha", max_concurrent_trials=1), 1) is None
    assert unrepeatable_because(settings(scheduler="hyperband", num_samples=8), 8) is None
    assert unrepeatable_because(settings(scheduler="fifo", searcher="optuna"), 1) is None
    assert unrepeatable_because(settings(scheduler="pbt", num_samples=4, epochs=4), 4) is None
    assert unrepeatable_because(settings(scheduler="asha", num_samples=1), 8) is None  # one trial races no other

    asha = unrepeatable_because(settings(scheduler="asha", num_samples=8), 4)
    assert asha.startswith("this search cannot be repeated exactly from run.seed: ASHA compares each trial")
    assert "with 4 trials at once" in asha and "(scheduler hyperband or fifo, or max_concurrent_trials: 1" in asha
    optuna = unrepeatable_because(settings(searcher="optuna", scheduler="fifo", num_samples=8), 2)
    assert "Optuna's TPE suggests each trial from the results that arrived before it" in optuna
    assert "max_concurrent_trials: 1 repeats exactly" in optuna
    budget = unrepeatable_because(settings(time_budget_s=60.0), 1)
    assert "where time_budget_s falls depends on the machine's speed" in budget
    # halving suggests every trial before any finishes: the same suggestions in the same order (test_halving)
    assert unrepeatable_because(settings(searcher="optuna", scheduler="halving", num_samples=8), 2) is None
    both = unrepeatable_because(settings(searcher="hyperopt", scheduler="asha", num_samples=3), 2)
    assert "ASHA" in both and "HyperOpt's TPE" in both and ". " not in both and both.endswith(")."), both


# --- searchers and schedulers, end to end -----------------------------------------------------------------------------


def asha_epochs(curves: list[list[float]], grace_period: int, reduction_factor: float, epochs: int) -> list[int]:
    """The epochs ASHA lets each trial train when the trials run one after the other: at each rung (grace_period
    times a power of reduction_factor, below `epochs`) a trial stops when its val_accuracy is below the
    (1 - 1/reduction_factor) quantile of what the trials before it had there."""
    rungs, rung = [], grace_period
    while rung < epochs:
        rungs.append(rung)
        rung *= reduction_factor
    seen: dict[float, list[float]] = {rung: [] for rung in rungs}
    trained = []
    for curve in curves:
        stop = epochs
        for rung in rungs:
            value = curve[int(rung) - 1]
            earlier, seen[rung] = list(seen[rung]), seen[rung] + [value]
            if earlier and value < np.nanpercentile(earlier, (1 - 1 / reduction_factor) * 100):
                stop = int(rung)
                break
        trained.append(stop)
    return trained


def test_random_search_with_asha_one_trial_at_a_time(data, tmp_path, caplog):
    # rungs at epochs 1 and 3 (the defaults, grace 2 and factor 2, would decide at epoch 2); learning rates in an order
    # that makes ASHA stop some: 1e-5 learns nearly nothing in an epoch
    asha = settings(
        scheduler="asha", grace_period=1, reduction_factor=3.0, epochs=4, num_samples=1, max_concurrent_trials=1,
        checkpoints_to_keep=1, search_space={"learning_rate": {"grid": [3e-3, 1e-5, 1e-3]}},
        slim_checkpoints=False,  # what Tune kept, as it left it
    )
    with caplog.at_level(logging.INFO, logger="stages.train"):
        outcome = run(data, tmp_path, asha)
    assert "cannot be repeated" not in caplog.text  # one at a time, ASHA repeats exactly
    trials = trials_in_order(Path(outcome.experiment_path))
    assert [t["rows"][0]["config"]["learning_rate"] for t in trials] == [3e-3, 1e-5, 1e-3]
    curves = [[row[METRIC] for row in t["rows"]] for t in trials]
    trained = [len(curve) for curve in curves]
    assert all(epochs_of(t) == list(range(1, len(t["rows"]) + 1)) for t in trials)
    assert trained == asha_epochs(curves, grace_period=1, reduction_factor=3.0, epochs=4), curves
    assert min(trained) < 4, "ASHA stopped no trial: the test shows nothing"
    assert set(trained) <= {1, 3, 4}, "ASHA decides at epochs 1 and 3 only"

    assert_one_at_a_time(trials)

    for trial, curve in zip(trials, curves):  # checkpoints_to_keep 1: the best epoch's checkpoint, and the latest
        kept = {json.loads((f / "state.json").read_text())["epoch"] for f in trial["folder"].glob("checkpoint_*")}
        best = {epoch for epoch, value in enumerate(curve, 1) if value == max(curve)}
        last = len(curve)
        assert last in kept and kept & best and kept <= best | {last} and len(kept) <= 2, (kept, curve)
    assert outcome.stop_reason is None
    assert outcome.best_val_accuracy == max(max(curve) for curve in curves)


def test_a_finished_search_keeps_each_trials_best_checkpoint_without_optimizer_state(data, tmp_path):
    import zipfile

    import h5py
    import keras

    from stages.evaluate import load_checkpoint_model

    # every epoch's checkpoint is kept while the trials run (3 best + the latest): slimming has two to delete each
    three_epochs = settings(epochs=3, checkpoints_to_keep=3)  # BASE trains with Adam
    outcome = run(data, tmp_path, three_epochs)
    trials = trials_in_order(Path(outcome.experiment_path))
    assert len(trials) == 2
    for trial in trials:
        curve = [row[METRIC] for row in trial["rows"]]
        (kept,) = trial["folder"].glob("checkpoint_*")  # one folder left
        assert json.loads((kept / "state.json").read_text())["epoch"] == curve.index(max(curve)) + 1, curve
        with zipfile.ZipFile(kept / "model.keras") as archive, archive.open("model.weights.h5") as weights:
            with h5py.File(weights, "r") as store:
                assert not len(store.get("optimizer/vars", {})), "Adam's moments are gone"
        model = load_checkpoint_model(kept)
        assert model.count_params() == BASE_PARAMETERS
        assert (kept / "model.keras").stat().st_size < 2 * 4 * BASE_PARAMETERS, "Adam would triple it"
    assert {Path(entry.location) for entry in outcome.ranked} == {
        next(trial["folder"].glob("checkpoint_*")) for trial in trials
    }
    keras.backend.clear_session()

    # the finished experiment read back (a resumed run whose train code changed): the same winner, still there
    again = run(data, tmp_path, three_epochs, resume=True)
    assert (again.best_trial_id, again.best_val_accuracy) == (outcome.best_trial_id, outcome.best_val_accuracy)
    assert Path(again.best_checkpoint_location, "model.keras").is_file()


def test_trials_reusing_one_process_train_as_trials_in_fresh_ones(data, tmp_path):
    # three trials one at a time: with reuse_actors the second and third run in the first one's process (Tune puts
    # the process id in every result), without it each has its own; the numbers are the same to the bit either way
    def one_at_a_time(reuse: bool) -> list[dict]:
        outcome = run(data, tmp_path / str(reuse), settings(
            epochs=1, num_samples=3, max_concurrent_trials=1, reuse_actors=reuse,
            search_space={"dropout": {"uniform": [0.1, 0.5]}},
        ))
        return trials_in_order(Path(outcome.experiment_path))

    reused, fresh = one_at_a_time(True), one_at_a_time(False)
    assert len({trial["rows"][0]["pid"] for trial in reused}) == 1
    assert len({trial["rows"][0]["pid"] for trial in fresh}) == 3
    numbers = ("trial_seed", "val_accuracy", "val_loss", "train_loss")
    assert [[trial["rows"][0][key] for key in numbers] for trial in reused] == [
        [trial["rows"][0][key] for key in numbers] for trial in fresh
    ]
    assert len({trial["rows"][0]["val_loss"] for trial in reused}) == 3  # three different trials, not one thrice


def test_evaluation_modules_load_in_the_train_process_once_no_trial_waits(data, tmp_path):
    import ray

    @ray.remote(num_cpus=0)
    def train_in_a_fresh_worker(refs: list, root: str, base, search, seed: int) -> tuple[bool, bool, bool]:
        import sys

        from stages.train import train
        from stages.training.preload import MODULES, preloading

        before = all(name in sys.modules for name in MODULES)
        train(*refs, base=base, settings=search, storage_path=root, seed=seed)
        thread = preloading()
        if thread is not None:
            thread.join(timeout=120)
        return before, thread is not None, all(name in sys.modules for name in MODULES)

    # a runtime env of its own: a worker no other task of this session has used
    task = train_in_a_fresh_worker.options(runtime_env={"env_vars": {"PRELOAD_TEST": str(tmp_path)}})
    search = settings(epochs=1, num_samples=3, max_concurrent_trials=2)  # the 3rd waits, then none does
    before, started, after = ray.get(task.remote(list(data), str(tmp_path), BASE, search, SEED))
    assert not before, "the worker had them already: the test shows nothing"
    assert started and after


def replay(searcher, trials: list[dict], space: dict, *, results: bool = True) -> list[dict]:
    """What `searcher` suggests for the trials, given each one's results before the next (one trial at a time), or
    none of them (all trials at once)."""
    suggested = []
    for trial in trials:
        suggestion = searcher.suggest(trial["id"])
        suggested.append({name: suggestion[name] for name in space})
        if not results:
            continue
        for row in trial["rows"]:
            searcher.on_trial_result(trial["id"], {METRIC: row[METRIC], "training_iteration": row["epoch"]})
        searcher.on_trial_complete(trial["id"], {METRIC: trial["rows"][-1][METRIC], "training_iteration": 1})
    return suggested


@pytest.mark.parametrize("name", ["optuna", "hyperopt"])
def test_a_model_based_searcher_suggests_the_trials_after_the_base_trial(data, tmp_path, name):
    space = {"learning_rate": {"loguniform": [1e-3, 1e-2]}, "batch_size": {"choice": [64, 128]}}
    search = settings(searcher=name, num_samples=2, epochs=1, include_base_trial=True, search_space=space)
    outcome = run(data, tmp_path, search)
    trials = trials_in_order(Path(outcome.experiment_path))
    assert len(trials) == 2 and all(t.status == "TERMINATED" for t in outcome.trials)
    configs = [searched(t["rows"][0]["config"], space) for t in trials]
    assert configs[0] == searched(BASE.model_dump(), space), "the base trial comes first, as it is"
    assert configs[1] != configs[0]

    if name == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        again = OptunaSearch(points_to_evaluate=[configs[0]], seed=SEED)
    else:
        from ray.tune.search.hyperopt import HyperOptSearch

        again = HyperOptSearch(points_to_evaluate=[configs[0]], random_state_seed=SEED)
    again.set_search_properties(METRIC, MODE, search.param_space(BASE))
    # both trials run at once, so both were suggested before any result came
    assert replay(again, trials, space, results=False) == configs, f"not {name}'s suggestions from seed {SEED}"


def test_bohb_with_its_hyperband_and_the_classic_baseline_outside_its_space(data, tmp_path):
    # the base trial's dropout (0) lies outside the searched range: BOHB runs it without learning from it
    space = {"learning_rate": {"loguniform": [1e-3, 1e-2]}, "dropout": {"uniform": [0.2, 0.5]}}
    search = settings(searcher="bohb", scheduler="bohb", num_samples=2, epochs=2, include_base_trial=True,
                      search_space=space)
    outcome = run(data, tmp_path, search)
    trials = trials_in_order(Path(outcome.experiment_path))
    assert len(trials) == 2 and all(t.status == "TERMINATED" for t in outcome.trials)
    configs = [searched(t["rows"][0]["config"], space) for t in trials]
    assert configs[0] == searched(BASE.model_dump(), space)
    for config in configs[1:]:
        assert 1e-3 <= config["learning_rate"] <= 1e-2 and 0.2 <= config["dropout"] <= 0.5

    from ray.tune.search.bohb import TuneBOHB

    again = TuneBOHB(points_to_evaluate=[configs[0]], seed=SEED)
    again.set_search_properties(METRIC, MODE, search.param_space(BASE))
    again.suggest("base")
    assert searched(again.suggest("first"), space) == pytest.approx(configs[1]), "not BOHB's first sample"

    # HyperBand for BOHB, largest bracket first: with 2 epochs and a factor of 2, the first two trials train one
    # epoch and only the better goes on (the defaults, asha with grace period 2, would train both to the end)
    first, second = (t["rows"][0][METRIC] for t in trials)
    assert first != second
    assert [len(t["rows"]) for t in trials] == ([2, 1] if first > second else [1, 2])


def test_hyperband_stops_the_same_trials_in_two_identical_runs(data, tmp_path, caplog):
    # two trials at once (2 CPUs): the order of their results varies, HyperBand's decisions must not
    band = settings(scheduler="hyperband", num_samples=1, epochs=2,
                    search_space={"learning_rate": {"grid": [3e-3, 1e-3, 1e-5, 3e-3]}})
    runs = []
    for attempt in ("one", "two"):
        with caplog.at_level(logging.INFO, logger="stages.train"):
            outcome = run(data, tmp_path / attempt, band)
        trials = trials_in_order(Path(outcome.experiment_path))
        runs.append([(t["rows"][0]["config"]["learning_rate"], len(t["rows"])) for t in trials])
    assert "cannot be repeated" not in caplog.text
    assert runs[0] == runs[1]
    # smallest bracket first: two trials train both epochs; in the next bracket one epoch decides which goes on
    assert runs[0] == [(3e-3, 2), (1e-3, 2), (1e-5, 1), (3e-3, 2)]


def test_pbt_continues_a_weak_trial_from_a_strong_ones_checkpoint_with_perturbed_hyperparameters(
        data, tmp_path, monkeypatch):
    # storage lagging the driver by a whole sync, as under load or with remote storage: the exploiting trial's
    # earlier rows must survive its restart all the same (Tune's own loggers copy storage's stale log over them)
    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "3600")
    space = {"learning_rate": {"loguniform": [1e-5, 1e-2]}, "batch_size": {"choice": [64, 128, 256]}}
    population = settings(scheduler="pbt", num_samples=2, epochs=3, pbt_interval=2, search_space=space)
    outcome = run(data, tmp_path, population)
    trials = trials_in_order(Path(outcome.experiment_path))
    assert len(trials) == 2 and all(t.status == "TERMINATED" for t in outcome.trials)
    perturbed = []
    for trial in trials:
        configs = [searched(row["config"], space) for row in trial["rows"]]
        assert epochs_of(trial) == [1, 2, 3], "epochs must go on from the checkpoint's, never start again"
        changes = [epoch for epoch in range(1, 3) if configs[epoch] != configs[epoch - 1]]
        if changes:
            perturbed.append(trial)
            assert changes == [2], "perturbed at the interval only (epoch 2), synchronously"
            new = configs[2]
            assert 1e-5 <= new["learning_rate"] <= 1e-2 and new["batch_size"] in (64, 128, 256)
    assert len(perturbed) == 1, "with two trials, the weaker one exploits the stronger at the interval"
    weak = perturbed[0]
    strong = next(t for t in trials if t is not weak)
    assert weak["rows"][1][METRIC] <= strong["rows"][1][METRIC]


# --- ending a search early --------------------------------------------------------------------------------------------


def test_target_val_accuracy_ends_the_search_and_says_so(data, tmp_path):
    from stages.train import load_outcome

    target = settings(target_val_accuracy=0.3, num_samples=3, epochs=4, max_concurrent_trials=1,
                      search_space={"learning_rate": {"choice": [3e-3]}})
    outcome = run(data, tmp_path, target)
    trials = trials_in_order(Path(outcome.experiment_path))
    reached = [(t["id"], row["epoch"]) for t in trials for row in t["rows"] if row[METRIC] >= 0.3]
    assert reached, "no trial reached 0.3: the test shows nothing"
    trial_id, epoch = reached[0]
    assert outcome.stop_reason.startswith(f"target val_accuracy 0.3 reached by trial {trial_id} at epoch {epoch} ")
    hit = next(t for t in trials if t["id"] == trial_id)
    assert epochs_of(hit)[-1] == epoch, "the trial that reached the target trains no further"
    assert trials[-1] is hit, "no trial starts after the target is reached"
    assert {t.trial_id for t in outcome.trials if t.epochs} == {t["id"] for t in trials}
    # the best checkpoint so far wins, the one reported with the result that reached the target included
    assert outcome.best_val_accuracy == max(row[METRIC] for t in trials for row in t["rows"])
    best = json.loads((Path(outcome.best_checkpoint.path) / "state.json").read_text())
    assert (best["epoch"], best[METRIC]) == (outcome.best_epoch, outcome.best_val_accuracy)
    assert load_outcome(outcome.experiment_path).stop_reason == outcome.stop_reason


def test_a_time_budget_ends_the_search_and_says_so(data, tmp_path, caplog):
    # half a second: over before any trial's first epoch (a trial's process alone takes longer to start)
    budget = settings(time_budget_s=0.5, num_samples=2, epochs=2)
    with caplog.at_level(logging.INFO, logger="stages.train"):
        with pytest.raises(BadInputError, match=r"^train\.time_budget_s: 0\.5 s is too small for even one trial: "
                                                r"none finished its first epoch in it$"):
            run(data, tmp_path, budget)
    assert "where time_budget_s falls depends on the machine's speed" in caplog.text
    state = json.loads(sorted((tmp_path / "tune").glob("experiment_state-*.json"))[-1].read_text())
    statuses = [json.loads(trial)["status"] for trial, _ in state["trial_data"]]
    assert statuses == ["TERMINATED", "TERMINATED"], "stopped cleanly, not failed"
    assert json.loads((tmp_path / "tune" / "stop_reason.json").read_text()) == {"reason": "time budget of 0.5 s spent"}


# --- resuming a search ------------------------------------------------------------------------------------------------


def test_a_resumed_optuna_search_goes_on_with_new_suggestions(data, tmp_path):
    space = {"learning_rate": {"loguniform": [1e-3, 1e-2]}, "batch_size": {"choice": [64, 128]}}
    search = settings(searcher="optuna", num_samples=3, epochs=1, max_concurrent_trials=1, include_base_trial=True,
                      search_space=space)
    experiment = tmp_path / "tune"

    def stop_after_one_trial():  # SIGTERM, as the pipeline's driver stopping sends it, once a trial finished
        deadline = time.monotonic() + 600
        while not trials_in_order(experiment) and time.monotonic() < deadline:
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)

    watcher = threading.Thread(target=stop_after_one_trial, daemon=True)
    watcher.start()
    with pytest.raises(TrainingError, match="SIGTERM stopped the Tune experiment"):
        run(data, tmp_path, search)
    watcher.join()
    before = {t["id"]: searched(t["rows"][0]["config"], space) for t in trials_in_order(experiment)}
    assert 1 <= len(before) < 3

    outcome = run(data, tmp_path, search, resume=True)
    assert len(outcome.trials) == 3 and all(t.status == "TERMINATED" and t.epochs == 1 for t in outcome.trials)
    configs = {t.trial_id: searched(t.hyperparameters, space) for t in outcome.trials}
    assert all(configs[trial_id] == config for trial_id, config in before.items()), "earlier trials are kept"
    assert len({json.dumps(c, sort_keys=True) for c in configs.values()}) == 3, f"a suggestion came again: {configs}"
    assert list(configs.values()).count(searched(BASE.model_dump(), space)) == 1, "the base trial ran once"
    assert_one_at_a_time(trials_in_order(experiment))  # the ConcurrencyLimiter, before and after the resume
