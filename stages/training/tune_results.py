"""What a Tune experiment found: every trial's summary and history, ranked by validation accuracy."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from typing import Any

from pandas.api.types import is_bool_dtype, is_numeric_dtype
from ray import tune
from ray.tune.result import AUTO_RESULT_KEYS

from stages.common.errors import TrainingError
from stages.evaluation.metrics import TopTrial, TrialSummary
from stages.training.train_settings import RUNGS_KEY
from stages.training.trial import to_python

METRIC, MODE = "val_accuracy", "max"
TOP_TRIALS = 5  # trials in the summary's and the report's ranking
# what run_trial reports each epoch, in the order trials.csv shows it; other numbers a trial reports follow them
EPOCH_METRICS = (
    "val_accuracy", "val_loss", "train_accuracy", "train_loss", "images_per_second", "node_id", "dtype_policy"
)
# what Tune adds to every result (times, ids, host, its own bookkeeping): not the trial's metrics
_TUNE_KEYS = {*AUTO_RESULT_KEYS, "done", "trial_id", "experiment_tag", "should_checkpoint", "epoch"}


@dataclass(frozen=True)
class RankedCheckpoint:
    """A trial's best checkpoint: the epoch with its highest validation accuracy."""

    trial_id: str
    val_accuracy: float
    epoch: int
    checkpoint: tune.Checkpoint  # a folder holding model.keras and state.json
    location: str  # the same, as a path or URI for people


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
    # every trial's best checkpoint, best validation accuracy first; errored trials are never among them
    ranked: list[RankedCheckpoint] = field(default_factory=list)
    # one row per trial per epoch (an epoch trained again after a crash: its last result), for trials.csv
    history: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_ranked(
        cls, *, ranked: list[RankedCheckpoint], trials: list[TrialSummary], history: list[dict[str, Any]],
        experiment_path: str, stop_reason: str | None = None,
    ) -> TuneOutcome:
        """The outcome whose winner is the first of `ranked` (which must not be empty)."""
        winner = ranked[0]
        return cls(
            best_trial_id=winner.trial_id,
            best_hyperparameters=next(t.hyperparameters for t in trials if t.trial_id == winner.trial_id),
            best_val_accuracy=winner.val_accuracy,
            best_epoch=winner.epoch,
            best_checkpoint=winner.checkpoint,
            best_checkpoint_location=winner.location,
            experiment_path=experiment_path,
            trials=trials,
            stop_reason=stop_reason,
            ranked=ranked,
            history=history,
        )

    def top_trials(self, limit: int = TOP_TRIALS) -> list[TopTrial]:
        """The `limit` best trials by validation accuracy: id, best validation accuracy, its epoch, epochs trained,
        and the hyperparameters the search varied."""
        trials = {trial.trial_id: trial for trial in self.trials}
        searched = searched_hyperparameters([trial.hyperparameters for trial in self.trials])
        return [
            TopTrial(
                trial_id=entry.trial_id,
                best_val_accuracy=entry.val_accuracy,
                best_epoch=entry.epoch,
                epochs=trials[entry.trial_id].epochs,
                hyperparameters={name: trials[entry.trial_id].hyperparameters.get(name) for name in searched},
            )
            for entry in self.ranked[:limit]
        ]


def summarize(results: tune.ResultGrid, *, experiment_path: str) -> TuneOutcome:
    """Ranks trials by the validation accuracy of their best checkpoints; errored trials are listed but never chosen.

    Raises:
      TrainingError: no trial finished with a checkpoint.
    """
    trials, ranked, history = [], [], []
    for result in results:
        per_epoch = _last_result_per_epoch(result.metrics_dataframe)
        trial = _trial_summary(result, per_epoch)
        trials.append(trial)
        if per_epoch is None:
            continue
        history.extend(_history_rows(trial, per_epoch))
        best = None if result.error else _best_checkpoint(result, per_epoch)
        if best is not None:
            val_accuracy, epoch, checkpoint = best
            ranked.append(RankedCheckpoint(trial.trial_id, val_accuracy, epoch, checkpoint, _location(checkpoint)))
    if not ranked:
        reasons = "; ".join(f"{t.trial_id}: {t.error}" for t in trials if t.error) or "no trial reported a checkpoint"
        raise TrainingError(f"no trial finished with a usable checkpoint ({reasons})")
    ranked.sort(key=lambda entry: (-entry.val_accuracy, entry.trial_id))  # of equal ones, the first trial started
    history.sort(key=lambda row: (row["trial_id"], row["epoch"]))  # Tune lists trials in no fixed order
    return TuneOutcome.from_ranked(ranked=ranked, trials=trials, history=history, experiment_path=experiment_path)


def _trial_summary(result: tune.Result, per_epoch) -> TrialSummary:
    has_history = per_epoch is not None
    return TrialSummary(
        trial_id=(result.metrics or {}).get("trial_id") or result.path.rsplit("/", 1)[-1],
        status="ERROR" if result.error else "TERMINATED",
        hyperparameters={k: to_python(v) for k, v in (result.config or {}).items() if k != RUNGS_KEY},
        epochs=int(per_epoch["epoch"].max()) if has_history else 0,
        best_val_accuracy=float(per_epoch[METRIC].max()) if has_history else None,
        nodes=sorted(per_epoch["node_id"].dropna().unique().tolist()) if has_history and "node_id" in per_epoch
        else [],
        error=one_line(result.error) if result.error else None,
        val_accuracy_by_epoch=per_epoch[METRIC].astype(float).tolist() if has_history else [],
        rungs=[int(end) for end in (result.config or {}).get(RUNGS_KEY) or []],
        trial_seed=int(per_epoch["trial_seed"].iloc[-1]) if has_history and "trial_seed" in per_epoch else None,
    )


def _last_result_per_epoch(results):
    """A trial's results, one per epoch in epoch order: of an epoch trained again after a crash, its last result.
    None when the trial reported no epoch."""
    if results is None or METRIC not in results or "epoch" not in results:
        return None
    results = results.dropna(subset=["epoch", METRIC])
    if results.empty:
        return None
    return results.groupby("epoch", sort=True).tail(1).sort_values("epoch", kind="stable").reset_index(drop=True)


def _best_checkpoint(result: tune.Result, per_epoch) -> tuple[float, int, tune.Checkpoint] | None:
    """(validation accuracy, epoch, checkpoint) of the trial's best checkpoint, or None when it kept none.

    Only a checkpoint whose metrics are its epoch's last result counts: a checkpoint of an epoch that was trained
    again after a crash holds the model of the later attempt (it was written to the same folder), not of the
    result it was first reported with.
    """
    last = dict(zip(per_epoch["epoch"].astype(int), per_epoch[METRIC].astype(float)))
    candidates = [
        (float(metrics[METRIC]), int(metrics["epoch"]), checkpoint)
        for checkpoint, metrics in result.best_checkpoints or []
        if metrics.get(METRIC) is not None and metrics.get("epoch") is not None
        and math.isclose(last.get(int(metrics["epoch"]), math.nan), float(metrics[METRIC]), rel_tol=1e-9)
    ]
    # the highest accuracy; of equal ones, the earliest epoch
    return max(candidates, key=lambda candidate: (candidate[0], -candidate[1]), default=None)


def _history_rows(trial: TrialSummary, per_epoch) -> list[dict[str, Any]]:
    """trials.csv's rows of one trial: its id, status, epoch, hyperparameters and every number it reported."""
    others = sorted(
        name for name in per_epoch.columns
        if name not in _TUNE_KEYS and name not in EPOCH_METRICS and not name.startswith("config/")
        and is_numeric_dtype(per_epoch[name]) and not is_bool_dtype(per_epoch[name])
    )
    columns = [name for name in EPOCH_METRICS if name in per_epoch] + others
    return [  # records, not iterrows: a row of only numbers would come as floats (trial_seed 7.0)
        {
            "trial_id": trial.trial_id,
            "status": trial.status,
            "epoch": int(epoch),
            **trial.hyperparameters,
            **{name: _plain(value) for name, value in metrics.items()},
        }
        for epoch, metrics in zip(per_epoch["epoch"], per_epoch[columns].to_dict("records"))
    ]


def _plain(value: Any) -> Any:
    """A pandas cell as a Python value for CSV and JSON: a missing value (NaN) is None."""
    value = to_python(value)
    return None if isinstance(value, float) and math.isnan(value) else value


def history_csv(rows: list[dict[str, Any]]) -> bytes:
    """trials.csv: one row per trial per epoch; columns in the order the rows first name them, an empty cell where a
    trial has no such value."""
    columns = list(dict.fromkeys(name for row in rows for name in row)) or ["trial_id", "status", "epoch"]
    text = io.StringIO()
    writer = csv.DictWriter(text, columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue().encode()


def searched_hyperparameters(hyperparameters: list[dict[str, Any]]) -> list[str]:
    """The hyperparameters whose values differ between trials (the ones the search explored), in their order."""
    names = list(dict.fromkeys(name for trial in hyperparameters for name in trial))
    return [name for name in names if len({repr(trial.get(name)) for trial in hyperparameters}) > 1]


def _location(checkpoint: tune.Checkpoint) -> str:
    scheme = checkpoint.filesystem.type_name
    return checkpoint.path if scheme == "local" else f"{scheme}://{checkpoint.path}"


def one_line(error: BaseException) -> str:
    """The last line of an error's message (a trial's error carries its worker's traceback before it)."""
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__
