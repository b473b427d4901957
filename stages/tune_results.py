"""What a Tune experiment found: every trial's summary and history, ranked by validation accuracy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ray import tune

from stages.errors import TrainingError
from stages.trial import to_python

METRIC, MODE = "val_accuracy", "max"


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


@dataclass(frozen=True)
class TuneOutcome:
    """The experiment's result: where the winning checkpoint is and how every trial did."""

    best_trial_id: str
    best_hyperparameters: dict[str, Any]
    best_val_accuracy: float
    best_epoch: int
    best_checkpoint: tune.Checkpoint  # a folder holding model.keras and state.json
    best_checkpoint_location: str  # the same, as a path or URI for people
    experiment_path: str
    trials: list[TrialSummary] = field(default_factory=list)
    stop_reason: str | None = None  # why the search ended before every trial finished (goal reached, time budget)


def summarize(results: tune.ResultGrid, *, experiment_path: str) -> TuneOutcome:
    """Ranks trials by their best validation accuracy; errored trials are listed but never chosen."""
    trials, candidates = [], []
    for result in results:
        history = result.metrics_dataframe
        has_history = history is not None and METRIC in history
        best = float(history[METRIC].max()) if has_history else None
        trial_id = (result.metrics or {}).get("trial_id") or result.path.rsplit("/", 1)[-1]
        trials.append(
            TrialSummary(
                trial_id=trial_id,
                status="ERROR" if result.error else "TERMINATED",
                hyperparameters={k: to_python(v) for k, v in (result.config or {}).items()},
                epochs=int(history["epoch"].max()) if has_history else 0,
                best_val_accuracy=best,
                nodes=sorted(history["node_id"].dropna().unique().tolist()) if has_history else [],
                error=_one_line(result.error) if result.error else None,
                # an epoch trained again after a crash appears twice: its last result counts
                val_accuracy_by_epoch=history.groupby("epoch")[METRIC].last().astype(float).tolist()
                if has_history else [],
            )
        )
        checkpoint = result.get_best_checkpoint(METRIC, MODE) if best is not None and not result.error else None
        if checkpoint is not None:
            candidates.append((best, trials[-1], checkpoint, history))
    if not candidates:
        reasons = "; ".join(f"{t.trial_id}: {t.error}" for t in trials if t.error) or "no trial reported a checkpoint"
        raise TrainingError(f"no trial finished with a usable checkpoint ({reasons})")
    best, trial, checkpoint, history = max(candidates, key=lambda candidate: candidate[0])
    best_epoch = int(history.loc[history[METRIC].idxmax(), "epoch"])
    return TuneOutcome(
        best_trial_id=trial.trial_id,
        best_hyperparameters=trial.hyperparameters,
        best_val_accuracy=best,
        best_epoch=best_epoch,
        best_checkpoint=checkpoint,
        best_checkpoint_location=_location(checkpoint),
        experiment_path=experiment_path,
        trials=trials,
    )


def _location(checkpoint: tune.Checkpoint) -> str:
    scheme = checkpoint.filesystem.type_name
    return checkpoint.path if scheme == "local" else f"{scheme}://{checkpoint.path}"


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__
