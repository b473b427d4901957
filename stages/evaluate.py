"""evaluate: the best checkpoint on the test set (its only use), and the exported model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from stages.common import storage
from stages.common.atomic import atomic_path
from stages.dataset.idx import NUM_CLASSES
from stages.evaluation.metrics import ClassMetrics, EnsembleMetrics, RunMetrics
from stages.preprocess import LabeledImages

if TYPE_CHECKING:
    from stages.training.tune_results import TuneOutcome

EXPORTED_MODEL = "model.keras"
EXPORTED_HYPERPARAMETERS = "hyperparameters.json"
EXPORTED_ENSEMBLE = "ensemble.keras"  # evaluate.ensemble_top_k: beside model.keras (stages.evaluation.ensemble)


@dataclass(frozen=True)
class Evaluation:
    test_accuracy: float
    test_loss: float
    test_images: int
    per_class: list[ClassMetrics]
    confusion_matrix: list[list[int]]  # rows: true digit, columns: predicted digit


def run_metrics(
    outcome: TuneOutcome, evaluation: Evaluation, model: str, ensemble: EnsembleMetrics | None
) -> RunMetrics:
    """The run's metrics: the search's outcome, the best checkpoint's `evaluation` on the test set, where its model
    was exported (`model`, for people: credentials redacted), and the ensemble's, if any."""
    return RunMetrics(
        val_accuracy=outcome.best_val_accuracy,
        test_accuracy=evaluation.test_accuracy,
        test_loss=evaluation.test_loss,
        test_images=evaluation.test_images,
        best_trial_id=outcome.best_trial_id,
        best_epoch=outcome.best_epoch,
        hyperparameters=outcome.best_hyperparameters,
        trials=outcome.trials,
        per_class=evaluation.per_class,
        confusion_matrix=evaluation.confusion_matrix,
        checkpoint=outcome.best_checkpoint_location,
        model=model,
        stop_reason=outcome.stop_reason,
        ensemble=ensemble,
        top_trials=outcome.top_trials(),
    )


def evaluate(checkpoint: Path, test: LabeledImages, *, batch_size: int = 1000):
    """Loads the checkpointed model and measures it on the test set.

    Args:
      checkpoint: a trial checkpoint folder holding model.keras.
      test: the test split.
      batch_size: images per prediction step.

    Returns:
      (the loaded Keras model, its Evaluation, its predicted probabilities (n, 10)).
    """
    model = load_checkpoint_model(checkpoint)
    probabilities = model.predict(test.images, batch_size=batch_size, verbose=0)
    return model, score(probabilities, test.labels), probabilities


def load_checkpoint_model(checkpoint: Path):
    """The model in a trial checkpoint folder, for predicting: uncompiled, as predicting needs neither the optimizer
    (whose learning-rate schedule may be a custom object of stages.training.model) nor the loss; in float32 whatever
    precision it trained in (stages.training.precision.in_float32)."""
    import keras

    import stages.training.model  # noqa: F401  (registers our layers, schedules and loss for loading)
    from stages.training.precision import in_float32

    return in_float32(keras.models.load_model(checkpoint / EXPORTED_MODEL, safe_mode=True, compile=False))


def score(probabilities: np.ndarray, labels: np.ndarray) -> Evaluation:
    """Accuracy, mean cross-entropy, per-class precision/recall/F1 and the confusion matrix of predictions."""
    labels = labels.astype(np.int64)
    predicted = probabilities.argmax(axis=1)
    confusion = np.bincount(labels * NUM_CLASSES + predicted, minlength=NUM_CLASSES**2).reshape(
        NUM_CLASSES, NUM_CLASSES
    )
    true_positives = np.diag(confusion)
    support = confusion.sum(axis=1)
    predicted_count = confusion.sum(axis=0)
    precision = _safe_divide(true_positives, predicted_count)
    recall = _safe_divide(true_positives, support)
    f1 = _safe_divide(2 * precision * recall, precision + recall)
    picked = probabilities[np.arange(len(labels)), labels]
    loss = float(-np.mean(np.log(np.clip(picked, 1e-7, 1.0))))
    return Evaluation(
        test_accuracy=float(true_positives.sum() / max(len(labels), 1)),
        test_loss=loss,
        test_images=int(len(labels)),
        per_class=[
            ClassMetrics(digit, float(precision[digit]), float(recall[digit]), float(f1[digit]), int(support[digit]))
            for digit in range(NUM_CLASSES)
        ],
        confusion_matrix=confusion.tolist(),
    )


def export_model(model, hyperparameters: dict, location: str) -> str:
    """Writes `model.keras` (architecture and weights, uncompiled: no loss, no optimizer, which are training's and
    may be our own classes) and `hyperparameters.json` into the folder or URI `location`.

    Returns:
      The location of the exported model.
    """
    inference_model = type(model).from_config(model.get_config())  # clone_model would copy the compile config
    inference_model.set_weights(model.get_weights())
    with storage.local_folder_for(location) as folder:
        with atomic_path(folder / EXPORTED_MODEL) as temp:
            inference_model.save(temp)
        storage.write_json(str(folder / EXPORTED_HYPERPARAMETERS), hyperparameters)
    return storage.join(location, EXPORTED_MODEL)


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    return np.divide(numerator, denominator, out=np.zeros(len(numerator)), where=denominator > 0)
