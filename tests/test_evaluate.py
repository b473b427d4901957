"""Test-set metrics from predictions, and the exported model."""

import json

import numpy as np
import pytest

from stages.evaluate import export_model, score
from stages.hyperparameters import Hyperparameters
from stages.model import build_model


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
