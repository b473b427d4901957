"""Test-set metrics from predictions, and the exported model."""

import json
import re

import numpy as np
import pytest

from stages.evaluate import export_model, score
from stages.training.hyperparameters import Hyperparameters
from stages.training.model import build_model


def test_metrics_from_known_predictions():
    labels = np.array([0, 0, 1, 1, 2, 2], np.uint8)
    predicted = np.array([0, 1, 1, 1, 2, 0])
    probabilities = np.full((6, 10), 0.01)
    probabilities[np.arange(6), predicted] = 0.91
    result = score(probabilities, labels)
    assert result.test_accuracy == pytest.approx(4 / 6)
    assert result.confusion_matrix[0][:3] == [1, 1, 0]
    assert result.confusion_matrix[2][:3] == [1, 0, 1]
    digit1 = result.per_class[1]
    assert (digit1.precision, digit1.recall, digit1.support) == (pytest.approx(2 / 3), 1.0, 2)
    assert digit1.f1 == pytest.approx(0.8)
    assert result.per_class[5].precision == 0.0 and result.per_class[5].support == 0
    expected_loss = -(4 * np.log(0.91) + 2 * np.log(0.01)) / 6
    assert result.test_loss == pytest.approx(expected_loss)


def test_exported_model_loads_safely_and_predicts_the_same(tmp_path):
    import keras

    hp = Hyperparameters(conv1_filters=4, conv2_filters=4, dense_units=8)
    model = build_model(hp)
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    path = export_model(model, hp.model_dump(), str(tmp_path))
    reloaded = keras.models.load_model(path, safe_mode=True)
    assert np.allclose(reloaded.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-6)
    assert json.loads((tmp_path / "hyperparameters.json").read_text()) == hp.model_dump()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hyperparameters.json", "model.keras"]


def test_the_ensemble_averages_its_members_and_reloads_as_predict_needs(tmp_path):
    import keras

    from pipeline.predict import predict
    from stages.evaluation.ensemble import build_ensemble, export_ensemble

    members = []
    for seed in range(3):
        keras.utils.set_random_seed(seed)
        members.append(build_model(Hyperparameters(conv1_filters=4, conv2_filters=8, dense_units=32)))
    ensemble = build_ensemble(members, ["a", "b", "c"])
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    each = [member.predict(images, verbose=0) for member in members]
    assert np.allclose(ensemble.predict(images, verbose=0), np.mean(each, axis=0), atol=1e-6)
    assert not np.allclose(each[0], each[1], atol=1e-3), "members that differ: averaging is visible"
    location = export_ensemble(ensemble, str(tmp_path))
    assert location == str(tmp_path / "ensemble.keras")
    got = [p.probabilities for p in predict(location, [(f"digit{i}", image) for i, image in enumerate(images)])]
    assert np.allclose(got, np.mean(each, axis=0), atol=1e-6)


def ranked(count: int, folder):
    from ray import tune

    from stages.training.tune_results import RankedCheckpoint

    checkpoint = tune.Checkpoint.from_directory(str(folder))
    return [RankedCheckpoint(f"t{i}", 0.9 - i / 100, 1, checkpoint, str(folder)) for i in range(count)]


def test_fewer_trials_than_k_make_a_smaller_ensemble_one_makes_none(tmp_path, caplog):
    from stages.evaluation.ensemble import choose_members, top_k_ensemble

    candidates = ranked(4, tmp_path)
    assert choose_members(candidates, 2) == candidates[:2]
    assert choose_members(candidates, 6) == candidates  # k is the most members
    assert not caplog.records
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "ensemble.keras").write_bytes(b"left by an earlier evaluation of this run")
    assert top_k_ensemble(ranked(1, tmp_path), 3, None, None, batch_size=10, model_dir=str(model_dir)) is None
    assert "only 1 trial has a checkpoint: no ensemble" in caplog.text
    assert not (model_dir / "ensemble.keras").exists(), "an ensemble no metrics describe is removed"


def test_the_ensemble_takes_as_many_members_as_do_best_on_validation_never_on_test(tmp_path):
    import keras
    from ray import tune

    from stages.evaluation.ensemble import top_k_ensemble
    from stages.preprocess import LabeledImages
    from stages.training.tune_results import RankedCheckpoint

    members, candidates = [], []
    for seed in range(3):  # three different (untrained) models, each in a checkpoint folder as a trial leaves it
        keras.utils.set_random_seed(seed)
        members.append(build_model(Hyperparameters(conv1_filters=4, conv2_filters=8, dense_units=32)))
        folder = tmp_path / f"trial{seed}"
        folder.mkdir()
        members[-1].save(folder / "model.keras")
        candidates.append(RankedCheckpoint(f"t{seed}", 0.9, 1, tune.Checkpoint.from_directory(str(folder)),
                                           str(folder)))
    rng = np.random.default_rng(0)
    val_images, test_images = (rng.integers(0, 256, (200, 28, 28), dtype=np.uint8) for _ in range(2))

    def averaged(models, images):
        return np.mean([model.predict(images, verbose=0) for model in models], axis=0)

    # validation labels are what the first two members agree on, test labels what all three do: only a choice made
    # on test would take three
    validation = LabeledImages(val_images, averaged(members[:2], val_images).argmax(axis=1).astype(np.uint8))
    test = LabeledImages(test_images, averaged(members, test_images).argmax(axis=1).astype(np.uint8))
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    ensemble = top_k_ensemble(candidates, 3, validation, test, batch_size=100, model_dir=str(model_dir))
    assert ensemble.k == 2 and ensemble.trial_ids == ["t0", "t1"]
    assert ensemble.val_accuracy == 1.0 == ensemble.val_accuracy_by_k[1]
    assert len(ensemble.val_accuracy_by_k) == 3 and ensemble.val_accuracy_by_k[2] < 1.0
    assert ensemble.single_val_accuracy == ensemble.val_accuracy_by_k[0] < 1.0 and ensemble.preferred
    expected = np.mean(averaged(members[:2], test_images).argmax(axis=1) == test.labels)
    assert ensemble.test_accuracy == pytest.approx(expected) and expected < 1.0
    assert (model_dir / "ensemble.keras").is_file()


def test_equal_validation_accuracies_take_the_most_members_and_predict_takes_the_ensemble():
    from stages.evaluation.ensemble import best_k
    from stages.evaluation.metrics import EnsembleMetrics

    assert best_k([0.9958, 0.9958, 0.9958, 0.9958, 0.9954]) == 4
    assert best_k([0.9958, 0.9960, 0.9958, 0.9960, 0.9954]) == 4
    assert best_k([0.9958, 0.9962, 0.9958, 0.9960]) == 2  # more members never beat a higher accuracy

    def ensemble(val_accuracy):
        return EnsembleMetrics(k=2, trial_ids=["a", "b"], test_accuracy=0.99, test_loss=0.1,
                               val_accuracy=val_accuracy, single_val_accuracy=0.9958)

    assert ensemble(0.9958).preferred and ensemble(0.9960).preferred and not ensemble(0.9956).preferred
    assert not EnsembleMetrics(k=2, trial_ids=["a", "b"], test_accuracy=0.99, test_loss=0.1).preferred


@pytest.mark.parametrize("value, error", [
    ("1", "Input should be greater than or equal to 2 (got 1)"),
    ("21", "Input should be less than or equal to 20 (got 21)"),
    ("true", "Input should be a valid integer"),
    ("2.5", "Input should be a valid integer"),
    ("three", "Input should be a valid integer"),
])
def test_ensemble_top_k_is_checked(value, error):
    from pipeline.config_loading import load_config
    from stages.common.errors import BadInputError

    with pytest.raises(BadInputError, match=rf"^evaluate.ensemble_top_k: {re.escape(error)}"):
        load_config(None, [f"evaluate.ensemble_top_k={value}"])
    assert load_config(None, ["evaluate.ensemble_top_k=20"]).evaluate.ensemble_top_k == 20
    assert load_config(None, ["evaluate.ensemble_top_k=null"]).evaluate.ensemble_top_k is None
    assert load_config(None).evaluate.ensemble_top_k == 5  # on by default


def test_parallel_coordinates_put_every_trial_on_each_axis_in_its_scale():
    from stages.evaluation.metrics import TrialSummary
    from stages.evaluation.report import parallel_axes

    def trial(best_val_accuracy: float, **hyperparameters) -> TrialSummary:
        return TrialSummary("t", "TERMINATED", hyperparameters, epochs=2, best_val_accuracy=best_val_accuracy)

    trials = [
        trial(0.98, learning_rate=1e-4, lr_schedule="cosine"),
        trial(0.99, learning_rate=1e-2, lr_schedule="constant"),
        trial(0.97, learning_rate=1e-3, lr_schedule="cosine"),
    ]
    axes = parallel_axes(trials, ["learning_rate", "lr_schedule"])
    assert [name for name, _, _ in axes] == ["learning_rate", "lr_schedule", "best_val_accuracy"]
    (_, rate, rate_ticks), (_, schedule, schedule_ticks), (_, accuracy, _) = axes
    assert rate == pytest.approx([0.0, 1.0, 0.5])  # logarithmic: 1e-3 halfway between 1e-4 and 1e-2
    assert [label for _, label in rate_ticks] == ["0.0001", "0.01"]
    assert schedule == [1.0, 0.0, 1.0] and schedule_ticks == [(0.0, "constant"), (1.0, "cosine")]  # sorted
    assert accuracy == pytest.approx([0.5, 1.0, 0.0])
    # one value only: the middle of its axis
    assert parallel_axes(trials[:1], ["learning_rate"])[0][1] == [0.5]
