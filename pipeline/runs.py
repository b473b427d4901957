"""`mnist-pipeline runs`: the runs under a run root, newest last, with how far each got and how well it did."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.run_folder import RunFolder
from pipeline.stage_records import StageRecords
from stages import storage
from stages.errors import DataError

STAGES = ("download", "preprocess", "train", "evaluate")


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    status: str  # finished, or where it stopped: "stopped in train"
    val_accuracy: float | None
    test_accuracy: float | None
    trials: int | None
    seconds: float | None


def list_runs(root: str) -> list[RunInfo]:
    """Every folder under `root` that holds a run (a config.yaml), sorted by id (ids start with their start time)."""
    return [describe_run(root, run_id) for run_id in sorted(_run_ids(root))]


def describe_run(root: str, run_id: str) -> RunInfo:
    run = RunFolder(storage.join(root, run_id))
    try:
        summary = json.loads(storage.read_bytes(run.summary_file))
    except (OSError, ValueError):
        summary = None
    try:
        records = StageRecords.load(run.location)
    except DataError:
        records = StageRecords(run.location)
    begun = [stage for stage in STAGES if records.started(stage) is not None]
    if summary and all(records.started(stage) and records.started(stage).finished for stage in STAGES):
        return RunInfo(run_id, "finished", summary.get("val_accuracy"), summary.get("test_accuracy"),
                       summary.get("trials"), sum(summary.get("stage_seconds", {}).values()))
    status = f"stopped in {begun[-1]}" if begun else "stopped before download"
    return RunInfo(run_id, status, None, None, None, None)


def format_runs(runs: list[RunInfo], root: str) -> str:
    if not runs:
        exists = storage.exists(root) if storage.is_uri(root) else Path(root).expanduser().is_dir()
        return f"no runs in {root}" + ("" if exists else " (no such folder)")
    header = f"{'RUN':<28} {'STATUS':<26} {'VAL ACC':>8} {'TEST ACC':>9} {'TRIALS':>6} {'TIME':>8}"
    lines = [header]
    for run in runs:
        lines.append(
            f"{run.run_id:<28} {run.status:<26} {_percent(run.val_accuracy):>8} {_percent(run.test_accuracy):>9} "
            f"{run.trials if run.trials is not None else '':>6} {_minutes(run.seconds):>8}"
        )
    lines.append(f"{len(runs)} run{'s' if len(runs) != 1 else ''} in {root}; resume a stopped one with "
                 "`mnist-pipeline run --resume RUN`")
    return "\n".join(lines)


def _run_ids(root: str) -> list[str]:
    if not storage.is_uri(root):
        folder = Path(root).expanduser()
        if not folder.is_dir():
            return []
        return [path.name for path in folder.iterdir() if Path(RunFolder(str(path)).config_file).is_file()]
    import pyarrow.fs

    filesystem, path = pyarrow.fs.FileSystem.from_uri(root)
    entries = filesystem.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    folders = [entry.base_name for entry in entries if entry.type == pyarrow.fs.FileType.Directory]
    return [name for name in folders if storage.exists(RunFolder(storage.join(root, name)).config_file)]


def _percent(value: float | None) -> str:
    return f"{value:.2%}" if value is not None else "–"


def _minutes(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    return f"{seconds:.0f}s" if seconds < 60 else f"{int(seconds // 60)}m{seconds % 60:02.0f}s"
