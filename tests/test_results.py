"""What a Tune experiment found, and what evaluate makes of it: each trial's best checkpoint (not its latest),
trials.csv, the top trials, the stop reason and the top-k ensemble.

One real Tune experiment (real Ray, real checkpoints in our layout: model.keras + state.json, real Keras models) runs
a scripted function trainable: its metrics are fixed per trial and epoch, so the test knows which checkpoint is each
trial's best, and its models are tiny CNNs built here beforehand, one per trial and epoch, so the test knows which
model evaluate scored. One trial's validation accuracy peaks before its last epoch; one crashes after reporting an
epoch and trains that epoch again from its checkpoint; one fails for good. evaluate then runs for real as the Ray task
of the pipeline, with a 2-member ensemble.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from stages.evaluation.metrics import RunMetrics
from stages.training.hyperparameters import Hyperparameters
from stages.training.tune_results import METRIC, MODE, TuneOutcome, summarize

# validation accuracy per epoch of each scripted trial; "retry" first reports its epoch 3 as 0.1 and crashes, then
# trains epoch 3 again from its epoch-2 checkpoint; "broken" fails in epoch 2 on every attempt
SCRIPTS = {"peak": [0.5, 0.9, 0.7, 0.6], "retry": [0.6, 0.7, 0.8, 0.75], "low": [0.3, 0.4], "broken": [0.2]}
FIRST_ATTEMPT_EPOCH_3 = 0.1
LEARNING_RATES = {"peak": 0.01, "retry": 0.02, "low": 0.03, "broken": 0.04}
TINY = Hyperparameters(conv1_filters=4, conv2_filters=8, dense_units=32)
STOP_REASON = "val_accuracy reached train.target_accuracy=0.9"


def scripted_trial(config: dict, *, models: str) -> None:
    """A Tune function trainable that trains nothing: each epoch it checkpoints the model prepared for this trial and
    epoch, as run_trial does (model.keras + state.json), and reports the scripted metrics."""
    import ray
    from ray import tune

    name, script = config["name"], SCRIPTS[config["name"]]
    checkpoint = tune.get_checkpoint()
    done = 0
    if checkpoint:
        with checkpoint.as_directory() as folder:
            done = json.loads((Path(folder) / "state.json").read_text())["epoch"]
    for epoch in range(done + 1, len(script) + 1 + (name == "broken")):
        if name == "broken" and epoch == 2:
            raise RuntimeError("scripted failure in epoch 2")
        metrics = {
            "val_accuracy": script[epoch - 1], "val_loss": 1 - script[epoch - 1], "train_accuracy": 0.5,
            "train_loss": 0.5, "epoch": epoch, "images_per_second": 1000.0 * epoch,
            "node_id": ray.get_runtime_context().get_node_id(), "trial_seed": 7,
        }
        if name == "retry" and epoch == 3 and checkpoint is None:  # reported, never checkpointed: then a crash
            tune.report({**metrics, "val_accuracy": FIRST_ATTEMPT_EPOCH_3})
            raise RuntimeError("scripted crash after epoch 3")
        with tempfile.TemporaryDirectory() as folder:
            shutil.copy(Path(models) / f"{name}-{epoch}.keras", Path(folder) / "model.keras")
            (Path(folder) / "state.json").write_text(json.dumps(metrics))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


@pytest.fixture(scope="module")
def splits(raw_data):
    from stages.preprocess import preprocess

    return preprocess(raw_data, validation_size=200, max_train_images=2200, max_test_images=500)


@pytest.fixture(scope="module")
def models(splits, tmp_path_factory) -> Path:
    """One tiny untrained CNN per trial and epoch; only the model of "low"'s last epoch is trained (one epoch on
    2,000 images), so that it is by far the best on the test set while its validation accuracy is the worst."""
    import keras

    from stages.training.model import build_model

    folder = tmp_path_factory.mktemp("models")
    for index, (name, script) in enumerate(SCRIPTS.items()):
        for epoch in range(1, len(script) + 1):
            keras.utils.set_random_seed(10 * index + epoch)
            model = build_model(TINY)
            if (name, epoch) == ("low", 2):
                model.fit(splits.train.images, splits.train.labels, batch_size=32, epochs=1, verbose=0)
            model.save(folder / f"{name}-{epoch}.keras")
    return folder


@pytest.fixture(scope="module")
def ray_session():
    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import this test module
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def experiment(ray_session, models, tmp_path_factory):
    """The finished scripted experiment: (its ResultGrid, its path)."""
    from ray import tune

    storage = tmp_path_factory.mktemp("run")
    tuner = tune.Tuner(
        tune.with_parameters(scripted_trial, models=str(models)),
        param_space={
            "name": tune.grid_search(list(SCRIPTS)),
            "learning_rate": tune.sample_from(lambda spec: LEARNING_RATES[spec.config["name"]]),
            "batch_size": 64,  # the same in every trial: not a searched hyperparameter
        },
        tune_config=tune.TuneConfig(metric=METRIC, mode=MODE),
        run_config=tune.RunConfig(
            name="tune", storage_path=str(storage), verbose=0,
            # as stages.train keeps them: the best 2 by validation accuracy (and the latest)
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=METRIC, checkpoint_score_order=MODE
            ),
            failure_config=tune.FailureConfig(max_failures=1),
        ),
    )
    results = tuner.fit()
    return results, results.experiment_path


@pytest.fixture(scope="module")
def outcome(experiment) -> TuneOutcome:
    results, path = experiment
    return summarize(results, experiment_path=path)


def trial_ids(outcome: TuneOutcome) -> dict[str, str]:
    """Scripted name -> Tune's trial id."""
    return {trial.hyperparameters["name"]: trial.trial_id for trial in outcome.trials}


@pytest.fixture(scope="module")
def evaluated(outcome, splits, tmp_path_factory):
    """evaluate_task run for real on the outcome (with a stop reason, as train sets it), a 2-member ensemble asked
    for: (run folder, the metrics it returned)."""
    import ray

    from pipeline.config import EvaluateSection
    from pipeline.tasks import evaluate_task
    from stages.training.train_settings import TrainSettings

    folder = tmp_path_factory.mktemp("runs") / "results"
    folder.mkdir()
    metrics = ray.get(evaluate_task.remote(
        dataclasses.replace(outcome, stop_reason=STOP_REASON), splits.validation, splits.test,
        EvaluateSection(ensemble_top_k=2), str(folder), {"download": 1.0, "preprocess": 1.0, "train": 10.0},
        TrainSettings(epochs=4), logging.WARNING,
    ))
    return folder, metrics


def predictions(model_file: Path, images: np.ndarray) -> np.ndarray:
    import keras

    return keras.models.load_model(model_file, safe_mode=True, compile=False).predict(images, verbose=0)


# ---- the best checkpoint -------------------------------------------------------------------------------------------


def test_each_trial_is_ranked_by_its_best_checkpoint_not_its_latest(outcome, experiment):
    ids = trial_ids(outcome)
    assert [(entry.trial_id, entry.val_accuracy, entry.epoch) for entry in outcome.ranked] == [
        (ids["peak"], 0.9, 2), (ids["retry"], 0.8, 3), (ids["low"], 0.4, 2),
    ], "ranked by each trial's best validation accuracy; the failed trial never among them"
    assert (outcome.best_trial_id, outcome.best_val_accuracy, outcome.best_epoch) == (ids["peak"], 0.9, 2)
    for entry in outcome.ranked:  # the checkpoint itself is the one of that epoch, not the trial's latest
        with entry.checkpoint.as_directory() as folder:
            assert json.loads((Path(folder) / "state.json").read_text())["epoch"] == entry.epoch
        assert Path(entry.location, "model.keras").is_file()
    assert outcome.best_checkpoint_location == outcome.ranked[0].location
    results, _ = experiment
    retried = next(result for result in results if result.config["name"] == "retry").metrics_dataframe
    assert retried["epoch"].tolist() == [1, 2, 3, 3, 4], "Tune keeps both results of the epoch trained twice"
    assert retried["val_accuracy"].tolist()[2] == FIRST_ATTEMPT_EPOCH_3
    latest = {result.config["name"]: result.checkpoint.path for result in results}
    assert outcome.best_checkpoint.path != latest["peak"], "the peak is not the latest epoch: a real choice"
    by_name = {trial.hyperparameters["name"]: trial for trial in outcome.trials}
    assert by_name["broken"].status == "ERROR" and "scripted failure" in by_name["broken"].error
    assert by_name["retry"].val_accuracy_by_epoch == [0.6, 0.7, 0.8, 0.75], "the retried epoch: its last result"


def test_an_experiment_read_back_from_its_folder_is_ranked_the_same(outcome, experiment):
    """What a resumed run does (stages.train.load_outcome): the outcome from Tune's files, not its live results."""
    from ray import tune

    _, path = experiment
    again = summarize(tune.ResultGrid(tune.ExperimentAnalysis(path, default_metric=METRIC, default_mode=MODE)),
                      experiment_path=path)
    assert [(e.trial_id, e.val_accuracy, e.epoch, e.location) for e in again.ranked] == [
        (e.trial_id, e.val_accuracy, e.epoch, e.location) for e in outcome.ranked
    ]
    assert again.history == outcome.history


def test_evaluate_scores_and_exports_the_best_checkpoint(evaluated, models, splits):
    from stages.evaluate import score

    folder, metrics = evaluated
    images, labels = splits.test.images, splits.test.labels
    peak = score(predictions(models / "peak-2.keras", images), labels)
    latest = score(predictions(models / "peak-4.keras", images), labels)
    assert metrics.test_loss == pytest.approx(peak.test_loss, rel=1e-5)
    assert metrics.test_loss != pytest.approx(latest.test_loss, rel=1e-5)
    assert metrics.test_accuracy == peak.test_accuracy and metrics.best_epoch == 2
    exported = predictions(folder / "model" / "model.keras", images[:20])
    assert np.allclose(exported, predictions(models / "peak-2.keras", images[:20]), atol=1e-6)


# ---- trials.csv ----------------------------------------------------------------------------------------------------


def test_trials_csv_has_one_row_per_trial_and_epoch(evaluated, outcome):
    folder, _ = evaluated
    text = (folder / "trials.csv").read_text()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == sum(len(script) for script in SCRIPTS.values()) == 11
    assert text.splitlines()[0].split(",") == [
        "trial_id", "status", "epoch", "name", "learning_rate", "batch_size", "val_accuracy", "val_loss",
        "train_accuracy", "train_loss", "images_per_second", "node_id", "trial_seed",
    ]
    ids = trial_ids(outcome)
    for name, script in SCRIPTS.items():
        mine = [row for row in rows if row["trial_id"] == ids[name]]
        assert [int(row["epoch"]) for row in mine] == list(range(1, len(script) + 1)), name
        assert [float(row["val_accuracy"]) for row in mine] == script, "the retried epoch once: its last result"
        assert {(row["name"], float(row["learning_rate"]), int(row["batch_size"])) for row in mine} == {
            (name, LEARNING_RATES[name], 64)
        }
        assert {row["status"] for row in mine} == {"ERROR" if name == "broken" else "TERMINATED"}
        assert all(row["node_id"] and row["trial_seed"] == "7" for row in mine)
    assert [float(row["images_per_second"]) for row in rows if row["trial_id"] == ids["peak"]] == [
        1000.0, 2000.0, 3000.0, 4000.0
    ]
    assert not list(folder.glob(".*part*")), "written atomically: no temporary file left"


# ---- top trials, stop reason, summary, report ----------------------------------------------------------------------


def test_top_trials_in_metrics_summary_and_report(evaluated, outcome):
    from pipeline.summary import RunSummary, format_summary, summary_record

    folder, metrics = evaluated
    ids = trial_ids(outcome)
    expected = [
        {"trial_id": ids["peak"], "best_val_accuracy": 0.9, "best_epoch": 2, "epochs": 4,
         "hyperparameters": {"name": "peak", "learning_rate": 0.01}},
        {"trial_id": ids["retry"], "best_val_accuracy": 0.8, "best_epoch": 3, "epochs": 4,
         "hyperparameters": {"name": "retry", "learning_rate": 0.02}},
        {"trial_id": ids["low"], "best_val_accuracy": 0.4, "best_epoch": 2, "epochs": 2,
         "hyperparameters": {"name": "low", "learning_rate": 0.03}},
    ]
    written = json.loads((folder / "metrics.json").read_text())
    assert [dataclasses.asdict(top) for top in metrics.top_trials] == written["top_trials"] == expected
    assert written["stop_reason"] == STOP_REASON
    seconds = {"download": 1.0, "preprocess": 1.0, "train": 10.0, "evaluate": 5.0}
    assert RunMetrics.from_json(written) == metrics, "metrics.json reads back as the metrics evaluate returned"
    summary = RunSummary("results", str(folder), RunMetrics.from_json(written), seconds)
    record = summary_record(summary)
    assert record["top_trials"] == expected and record["stop_reason"] == STOP_REASON
    assert record["ensemble"]["trial_ids"] == [ids["peak"], ids["retry"]]
    lines = format_summary(summary).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("  top trials:"))
    assert lines[start - 1].startswith("  best trial:"), "under the best trial"
    header, *rows = lines[start:start + 4]
    assert header.split() == ["top", "trials:", "#", "trial", "val", "acc", "epoch", "epochs", "name", "learning_rate"]
    assert [row.split() for row in rows] == [
        ["1", ids["peak"], "0.9000", "2", "4", "peak", "0.01"],
        ["2", ids["retry"], "0.8000", "3", "4", "retry", "0.02"],
        ["3", ids["low"], "0.4000", "2", "2", "low", "0.03"],
    ]
    assert len({header.index("trial "), *(row.index(row.split()[1]) for row in rows)}) == 1, "aligned columns"
    assert len({header.index("learning_rate"), *(row.index(row.split()[-1]) for row in rows)}) == 1
    assert f"  search stopped:  {STOP_REASON}" in lines
    page = (folder / "report.html").read_text()
    top = page.split("<h2>Top trials</h2>")[1].split("<h2>")[0]
    assert [top.index(ids[name]) for name in ("peak", "retry", "low")] == sorted(
        top.index(ids[name]) for name in ("peak", "retry", "low")
    ) and ids["broken"] not in top
    assert STOP_REASON in page


# ---- the ensemble --------------------------------------------------------------------------------------------------


def test_the_ensemble_averages_the_k_best_trials_by_validation(evaluated, outcome, models, splits):
    from stages.evaluate import score

    folder, metrics = evaluated
    ids = trial_ids(outcome)
    ensemble = metrics.ensemble
    assert ensemble.k == 2 and ensemble.trial_ids == [ids["peak"], ids["retry"]]
    images, labels = splits.test.images, splits.test.labels
    members = [predictions(models / "peak-2.keras", images), predictions(models / "retry-3.keras", images)]
    expected = score(np.mean(members, axis=0), labels)
    assert ensemble.test_accuracy == expected.test_accuracy
    assert ensemble.test_loss == pytest.approx(expected.test_loss, rel=1e-5)
    # only validation decided: "low" alone is far better on the test set, yet not a member
    low = score(predictions(models / "low-2.keras", images), labels)
    assert low.test_accuracy > max(score(p, labels).test_accuracy for p in members) + 0.3
    # the single best model's numbers stay the headline ones
    assert metrics.test_accuracy == score(members[0], labels).test_accuracy
    summary_line = next(line for line in format_summary_lines(folder, metrics) if "ensemble:" in line)
    assert f"test accuracy {ensemble.test_accuracy:.4f}" in summary_line and "the 2 best trials" in summary_line


def format_summary_lines(folder: Path, metrics) -> list[str]:
    from pipeline.summary import RunSummary, format_summary

    seconds = {"download": 1.0, "preprocess": 1.0, "train": 1.0, "evaluate": 1.0}
    return format_summary(RunSummary("results", str(folder), metrics, seconds)).splitlines()


def test_the_exported_ensemble_is_what_predict_loads(evaluated, models, splits):
    from pipeline.predict import find_model, predict
    from stages.common.errors import BadInputError

    folder, _ = evaluated
    location = find_model(str(folder), str(folder.parent), ensemble=True)
    assert location == str(folder / "model" / "ensemble.keras")
    assert find_model(str(folder), str(folder.parent), ensemble=False) == str(folder / "model" / "model.keras")
    # without a choice: whichever did better on validation, as metrics.json says
    preferred = json.loads((folder / "metrics.json").read_text())["ensemble"]
    assert preferred["val_accuracy"] > preferred["single_val_accuracy"], "this ensemble beat its single model there"
    assert find_model(str(folder), str(folder.parent)) == location
    with pytest.raises(BadInputError, match="--ensemble picks a run's ensemble"):
        find_model(location, str(folder.parent), ensemble=True)
    images = splits.test.images[:6]
    got = np.array([p.probabilities for p in predict(location, [(f"image{i}", image) for i, image in
                                                                enumerate(images)])])
    mean = np.mean([predictions(models / "peak-2.keras", images), predictions(models / "retry-3.keras", images)],
                   axis=0)
    assert np.allclose(got, mean, atol=1e-6)
    assert not np.allclose(got, predictions(models / "peak-2.keras", images), atol=1e-3), "really two members"


# ---- records of runs evaluated before these existed, and damaged ones ----------------------------------------------


def test_a_run_evaluated_before_top_trials_existed_still_summarizes(tmp_path):
    from pipeline.run_files import DamagedFile, read_metrics
    from pipeline.run_folder import RunFolder
    from pipeline.summary import RunSummary, format_summary, summary_record

    old = {  # what evaluate wrote before trials.csv, top_trials, ensemble and stop_reason
        "val_accuracy": 0.98, "test_accuracy": 0.97, "test_loss": 0.1, "test_images": 100, "best_trial_id": "a_00000",
        "best_epoch": 2, "hyperparameters": {"dropout": 0.1},
        "trials": [{"trial_id": "a_00000", "status": "TERMINATED", "nodes": ["n1"], "error": None}],
    }
    run = RunFolder(str(tmp_path))
    (tmp_path / "metrics.json").write_text(json.dumps(old))
    summary = RunSummary("old", str(tmp_path), read_metrics(run), {"download": 1, "preprocess": 1, "train": 1,
                                                                     "evaluate": 1})
    record = summary_record(summary)
    assert (record["top_trials"], record["ensemble"], record["stop_reason"]) == ([], None, None)
    text = format_summary(summary)
    assert "test accuracy:   0.9700 (loss 0.1000, 100 images)\n" in text
    assert "top trials" not in text and "search stopped" not in text and "ensemble" not in text
    for damaged, what in [
        ({"top_trials": {"a": 1}}, "'top_trials' should be a list, got an object"),
        ({"top_trials": [{"trial_id": "a_00000"}]}, "top_trials[0]: no 'best_val_accuracy'"),
        ({"ensemble": {"k": 2, "trial_ids": ["a"], "test_accuracy": "high", "test_loss": 0.1}},
         "ensemble: 'test_accuracy' should be a number, got a string"),
        ({"stop_reason": 3}, "'stop_reason' should be a string or null, got a number"),
    ]:
        (tmp_path / "metrics.json").write_text(json.dumps({**old, **damaged}))
        with pytest.raises(DamagedFile, match=re.escape(f"metrics.json: {what}")):
            read_metrics(run)


def test_trials_csv_leaves_missing_values_empty():
    from stages.training.tune_results import history_csv

    rows = [
        {"trial_id": "a", "status": "ERROR", "epoch": 1, "dropout": 0.5, "val_accuracy": None},
        {"trial_id": "b", "status": "TERMINATED", "epoch": 1, "dropout": 0.1, "val_accuracy": 0.25, "trial_seed": 3},
    ]
    assert history_csv(rows).decode().splitlines() == [
        "trial_id,status,epoch,dropout,val_accuracy,trial_seed", "a,ERROR,1,0.5,,", "b,TERMINATED,1,0.1,0.25,3",
    ]
    assert history_csv([]).decode() == "trial_id,status,epoch\n"
