"""A run's metrics: one typed shape, built by the evaluate stage, written to metrics.json by the pipeline and read
back from it (for the summary, the quality gate, the report, `runs` and MLflow).

`to_json` gives metrics.json's content; `from_json` reads it back, runs evaluated before a field existed included
(it takes its default). Checking that a file has this shape is pipeline.run_files'.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class ClassMetrics:
    digit: int
    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True)
class TrialSummary:
    """What one trial did."""

    trial_id: str
    status: str  # TERMINATED (finished or stopped early by the scheduler) or ERROR
    hyperparameters: dict[str, Any]
    epochs: int
    best_val_accuracy: float | None
    nodes: list[str] = field(default_factory=list)  # Ray node ids the trial's epochs ran on
    error: str | None = None
    val_accuracy_by_epoch: list[float] = field(default_factory=list)  # [epoch 1, epoch 2, ...]
    # halving: the epochs its rungs ended at (one learning-rate cycle each), the last where it stopped; else empty
    rungs: list[int] = field(default_factory=list)
    trial_seed: int | None = None  # the seed it trained with (stages.training.trial.trial_seed)

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> TrialSummary:
        return cls(
            trial_id=record["trial_id"],
            status=record["status"],
            hyperparameters=record.get("hyperparameters", {}),
            epochs=record.get("epochs", 0),
            best_val_accuracy=record.get("best_val_accuracy"),
            nodes=record.get("nodes", []),
            error=record.get("error"),
            val_accuracy_by_epoch=record.get("val_accuracy_by_epoch", []),
            rungs=record.get("rungs", []),
            trial_seed=record.get("trial_seed"),
        )


@dataclass(frozen=True)
class TopTrial:
    """One of the best trials: its best validation accuracy, at which epoch, and the hyperparameters searched."""

    trial_id: str
    best_val_accuracy: float
    best_epoch: int
    epochs: int  # trained
    hyperparameters: dict[str, Any]  # only those the search varied


@dataclass(frozen=True)
class EnsembleMetrics:
    """evaluate.ensemble_top_k: the ensemble of the k best trials (k chosen on validation) on the test set."""

    k: int  # members averaged
    trial_ids: list[str]  # the members, best validation accuracy first
    test_accuracy: float
    test_loss: float
    model: str = ""  # where ensemble.keras was exported (credentials redacted)
    # the next three: absent from the metrics of runs evaluated before k was chosen on validation; all measured in
    # float32 by evaluate, on the validation split
    val_accuracy: float | None = None  # the ensemble's
    single_val_accuracy: float | None = None  # the best trial's best checkpoint alone
    val_accuracy_by_k: list[float] = field(default_factory=list)  # k = 1, 2, ...: what chose k

    @property
    def preferred(self) -> bool:
        """Whether `predict` uses the ensemble: it did at least as well as the single best model on validation (where
        the two are equal, the average of several models is the one that varies less)."""
        return (self.val_accuracy is not None and self.single_val_accuracy is not None
                and self.val_accuracy >= self.single_val_accuracy)


@dataclass(frozen=True)
class RunMetrics:
    """What metrics.json holds: the winning trial, how its best checkpoint did on the test set, and every trial."""

    val_accuracy: float  # the best checkpoint's, on the validation split
    test_accuracy: float
    test_loss: float
    test_images: int
    best_trial_id: str
    best_epoch: int
    hyperparameters: dict[str, Any]  # the best trial's, every one of them
    trials: list[TrialSummary]
    per_class: list[ClassMetrics] = field(default_factory=list)
    confusion_matrix: list[list[int]] = field(default_factory=list)  # rows: true digit, columns: predicted digit
    checkpoint: str = ""  # the best checkpoint's location
    model: str = ""  # the exported model's location (credentials redacted)
    # the next three: absent from the metrics of runs evaluated before they existed
    stop_reason: str | None = None  # why the search ended before every trial finished
    ensemble: EnsembleMetrics | None = None
    top_trials: list[TopTrial] = field(default_factory=list)

    @property
    def failed_trials(self) -> dict[str, str | None]:
        """Trial id -> error of the trials that failed after their retries."""
        return {trial.trial_id: trial.error for trial in self.trials if trial.status == "ERROR"}

    def to_json(self) -> dict[str, Any]:
        record = asdict(self)
        record["trials"] = record.pop("trials")  # the long list last: the headline numbers read first
        return record

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> RunMetrics:
        """From metrics.json's content, already checked to have this shape (pipeline.run_files.read_metrics).

        Raises:
          TypeError, KeyError: it lacks something it needs.
        """
        ensemble = record.get("ensemble")
        return cls(
            val_accuracy=record["val_accuracy"],
            test_accuracy=record["test_accuracy"],
            test_loss=record["test_loss"],
            test_images=record["test_images"],
            best_trial_id=record["best_trial_id"],
            best_epoch=record["best_epoch"],
            hyperparameters=record["hyperparameters"],
            trials=[TrialSummary.from_json(trial) for trial in record["trials"]],
            per_class=[_known(ClassMetrics, entry) for entry in record.get("per_class", [])],
            confusion_matrix=record.get("confusion_matrix", []),
            checkpoint=record.get("checkpoint", ""),
            model=record.get("model", ""),
            stop_reason=record.get("stop_reason"),
            ensemble=_known(EnsembleMetrics, ensemble) if ensemble is not None else None,
            top_trials=[_known(TopTrial, entry) for entry in record.get("top_trials", [])],
        )


def _known(cls, record: dict[str, Any]):
    """`cls` from the fields of `record` it has (a field added later, or a name it no longer has, is skipped).

    Raises:
      TypeError: `record` lacks a field `cls` requires.
    """
    return cls(**{f.name: record[f.name] for f in fields(cls) if f.name in record})
