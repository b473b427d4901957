"""What a finished run tells: summary.json, the console's closing summary, and the quality gate."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.run_folder import RunFolder
from stages.common.errors import QualityGateError
from stages.common.redact import redact
from stages.evaluation.metrics import EnsembleMetrics, RunMetrics, TopTrial

STAGES = ("download", "preprocess", "train", "evaluate")


@dataclass
class RunSummary:
    """A finished run: its metrics and each stage's time (pipeline.runner builds it; summary.json and the console's
    closing lines come from it)."""

    run_id: str
    folder: str
    metrics: RunMetrics
    stage_seconds: dict[str, float] = field(default_factory=dict)  # a skipped stage: the time it took earlier
    skipped: list[str] = field(default_factory=list)  # stages a resumed run found finished


def summary_record(summary: RunSummary) -> dict[str, Any]:
    """What summary.json holds: the run at a glance."""
    metrics = summary.metrics
    return {
        "run_id": summary.run_id,
        "val_accuracy": metrics.val_accuracy,
        "test_accuracy": metrics.test_accuracy,
        "best_trial_id": metrics.best_trial_id,
        "hyperparameters": metrics.hyperparameters,
        "top_trials": [asdict(trial) for trial in metrics.top_trials],
        "ensemble": asdict(metrics.ensemble) if metrics.ensemble else None,  # null: none
        "stop_reason": metrics.stop_reason,
        "stage_seconds": summary.stage_seconds,
        "trials": len(metrics.trials),
        "failed_trials": metrics.failed_trials,
    }


def check_quality_gate(min_test_accuracy: float | None, summary: RunSummary) -> None:
    """Raises QualityGateError when the test accuracy is below `evaluate.min_test_accuracy`."""
    accuracy = summary.metrics.test_accuracy
    if min_test_accuracy is not None and accuracy < min_test_accuracy:
        raise QualityGateError(
            f"test accuracy {accuracy:.4f} is below evaluate.min_test_accuracy={min_test_accuracy} "
            f"(artifacts kept in {redact(summary.folder)})"
        )


def format_summary(summary: RunSummary) -> str:
    """The lines the console ends a run with: best trial, top trials, hyperparameters, accuracies, times, where."""
    metrics = summary.metrics
    hyperparameters = ", ".join(f"{k}={_short(v)}" for k, v in metrics.hyperparameters.items())
    failed = [f"{trial_id} ({_clip(error)})" for trial_id, error in metrics.failed_trials.items()]
    times = ", ".join(
        f"{stage} {duration(summary.stage_seconds[stage])}" + (" (earlier)" if stage in summary.skipped else "")
        for stage in STAGES
    )
    nodes = sorted({node for trial in metrics.trials for node in trial.nodes})
    ensemble = metrics.ensemble
    lines = [
        f"run {summary.run_id} finished in {duration(sum(summary.stage_seconds.values()))}"
        + (" (resumed)" if summary.skipped else ""),
        f"  best trial:      {metrics.best_trial_id} (epoch {metrics.best_epoch}) "
        f"of {len(metrics.trials)} trials on {len(nodes)} node{'s' if len(nodes) != 1 else ''}"
        + (f"; failed after retries: {'; '.join(failed)}" if failed else ""),
        *_top_trials_table(metrics.top_trials, indent=" " * 19),
        *([f"  search stopped:  {metrics.stop_reason}"] if metrics.stop_reason else []),
        f"  hyperparameters: {hyperparameters}",
        f"  val accuracy:    {metrics.val_accuracy:.4f}",
        f"  test accuracy:   {metrics.test_accuracy:.4f} (loss {metrics.test_loss:.4f}, "
        f"{metrics.test_images} images)",
        *([f"  ensemble:        {ensemble_line(ensemble)}"] if ensemble else []),
        f"  trial nodes:     {', '.join(node[:12] for node in nodes)}",
        f"  stage times:     {times}",
        f"  report:          {redact(RunFolder(summary.folder).report_file)}",
        f"  artifacts:       {redact(summary.folder)}/ (metrics.json, trials.csv, model/model.keras, tune/, data/, "
        "config.yaml)",
    ]
    return "\n".join(lines)


def ensemble_line(ensemble: EnsembleMetrics) -> str:
    """The ensemble's test accuracy, how k was chosen, and which model `predict` uses."""
    line = f"test accuracy {ensemble.test_accuracy:.4f} (loss {ensemble.test_loss:.4f}), the {ensemble.k} best trials"
    if ensemble.val_accuracy is None or ensemble.single_val_accuracy is None:
        return line  # evaluated before k was chosen on validation
    return (f"{line}, k chosen on validation ({ensemble.val_accuracy:.4f} against {ensemble.single_val_accuracy:.4f} "
            f"alone): predict uses {'the ensemble' if ensemble.preferred else 'the single best model'}")


def _top_trials_table(top: list[TopTrial], indent: str) -> list[str]:
    """The best trials as aligned rows under a header: rank, trial, best validation accuracy, its epoch, epochs
    trained, the searched hyperparameters. Nothing for a single trial: the best trial's line says it all."""
    if len(top) < 2:
        return []
    names = list(dict.fromkeys(name for trial in top for name in trial.hyperparameters))
    rows = [["#", "trial", "val acc", "epoch", "epochs", *names]] + [
        [str(rank), trial.trial_id, f"{trial.best_val_accuracy:.4f}", str(trial.best_epoch),
         str(trial.epochs), *(_short(trial.hyperparameters.get(name)) for name in names)]
        for rank, trial in enumerate(top, start=1)
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    numbers = {0, 2, 3, 4}  # right-aligned
    table = [
        "  ".join(cell.rjust(width) if column in numbers else cell.ljust(width)
                  for column, (cell, width) in enumerate(zip(row, widths))).rstrip()
        for row in rows
    ]
    return [f"  top trials:      {table[0]}"] + [indent + line for line in table[1:]]


def _clip(text: str | None, limit: int = 100) -> str:
    text = (text or "unknown error").strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def duration(seconds: float) -> str:
    return f"{seconds:.1f}s" if seconds < 60 else f"{int(seconds // 60)}m{seconds % 60:02.0f}s"


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
