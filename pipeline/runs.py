"""`mnist-pipeline runs`: the runs under a run root, newest last, with how far each got and how well it did; with
two or more runs named, those runs side by side (`compare_runs`): results, time, and the settings they differ in.

A damaged run (a file of it unreadable, truncated or of another shape) is listed as "damaged (<file>: <what>)":
one bad folder never hides the others, and never stops the listing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.bounded_yaml import MAX_CONFIG_BYTES
from pipeline.config import dotted
from pipeline.run_files import (
    INTEGER,
    MAPPING,
    NUMBER,
    DamagedFile,
    check_run_config,
    names_in,
    read_json_object,
    read_run_file,
    shape_problem,
)
from pipeline.run_folder import RUN_MARKER, RunFolder, locate_run
from pipeline.stage_records import StageRecords
from stages.common import storage
from stages.common.errors import BadInputError

STAGES = ("download", "preprocess", "train", "evaluate")
_RUN_FILES = {RUN_MARKER, "config.yaml", "stages.json"}  # any of them: a run, or what is left of one
_SUMMARY_FIELDS = {"val_accuracy": NUMBER, "test_accuracy": NUMBER, "trials": INTEGER, "stage_seconds": MAPPING}
_MAX_WHAT = 60  # characters of a damage's description in the table
_MAX_CELL = 30  # characters of a value in the side-by-side table
_NOT_COMPARED = ("run.id", "run.root")  # where a run is, not how it ran


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    status: str  # finished, where it stopped ("stopped in train"), or "damaged (<file>: <what>)"
    val_accuracy: float | None
    test_accuracy: float | None
    trials: int | None
    seconds: float | None
    best_trial_id: str | None = None


def list_runs(root: str) -> list[RunInfo]:
    """Every folder under `root` that holds a run, sorted by id (ids start with their start time).

    Raises:
      BadInputError: `root` itself cannot be listed.
    """
    return [describe_run(root, run_id) for run_id in sorted(_run_ids(root))]


def describe_run(root: str, run_id: str) -> RunInfo:
    run = RunFolder(storage.join(root, run_id))
    if not storage.is_uri(run.location) and not os.access(run.location, os.R_OK | os.X_OK):
        return _damaged(run_id, "folder", "permission denied")
    try:
        return _describe(run)
    except DamagedFile as damage:
        return _damaged(run_id, _relative(run, damage.location), damage.what)
    except OSError as error:  # an object store that fails a request, a file that vanished while read
        return _damaged(run_id, "folder", f"unreadable ({error})")


def _describe(run: RunFolder) -> RunInfo:
    has_config = check_run_config(run)
    records = StageRecords.load(run.location)
    begun = [stage for stage in STAGES if records.started(stage) is not None]
    if begun and not has_config:
        raise DamagedFile(run.config_file, "missing")
    if not all(records.started(stage) and records.started(stage).finished for stage in STAGES):
        return RunInfo(run.run_id, f"stopped in {begun[-1]}" if begun else "stopped before download",
                       None, None, None, None)
    summary = _read_summary(run)
    for artifact in (run.metrics_file, run.model_file):  # what a finished run is for; their insides: `run --resume`
        if not storage.exists(artifact):
            raise DamagedFile(artifact, "missing")
    best = summary.get("best_trial_id")
    return RunInfo(run.run_id, "finished", summary["val_accuracy"], summary["test_accuracy"], summary["trials"],
                   sum(summary["stage_seconds"].values()), best if isinstance(best, str) else None)


def _read_summary(run: RunFolder) -> dict:
    summary = read_json_object(run.summary_file)
    if summary is None:
        raise DamagedFile(run.summary_file, "missing")
    problem = shape_problem(summary, _SUMMARY_FIELDS)
    if problem is None and not all(NUMBER[0](seconds) for seconds in summary["stage_seconds"].values()):
        problem = "'stage_seconds' should hold numbers"
    if problem:
        raise DamagedFile(run.summary_file, problem)
    return summary


def _damaged(run_id: str, file: str, what: str) -> RunInfo:
    what = what if len(what) <= _MAX_WHAT else what[: _MAX_WHAT - 1] + "…"
    return RunInfo(run_id, f"damaged ({file}: {what})", None, None, None, None)


def _relative(run: RunFolder, location: str) -> str:
    """`location` as a path inside the run folder ("model/model.keras"); a URI's query is left out."""
    base, path = run.location.partition("?")[0].rstrip("/"), location.partition("?")[0]
    return path[len(base) + 1:] if path.startswith(base + "/") else storage.name_of(location)


def format_runs(runs: list[RunInfo], root: str) -> str:
    if not runs:
        if storage.is_uri(root):
            return f"no runs in {root}" + ("" if storage.exists(root) else " (nothing there)")
        folder = Path(root).expanduser()
        return f"no runs in {root}" + ("" if folder.is_dir() else " (a file, not a folder)" if folder.exists()
                                       else " (no such folder)")
    width = max(26, *(len(run.status) for run in runs))
    header = f"{'RUN':<28} {'STATUS':<{width}} {'VAL ACC':>8} {'TEST ACC':>9} {'TRIALS':>6} {'TIME':>8}"
    lines = [header]
    for run in runs:
        lines.append(
            f"{run.run_id:<28} {run.status:<{width}} {_percent(run.val_accuracy):>8} "
            f"{_percent(run.test_accuracy):>9} {run.trials if run.trials is not None else '':>6} "
            f"{_minutes(run.seconds):>8}"
        )
    damaged = sum(run.status.startswith("damaged") for run in runs)
    lines.append(f"{len(runs)} run{'s' if len(runs) != 1 else ''} in {root}"
                 + (f" ({damaged} damaged)" if damaged else "")
                 + "; resume a stopped or damaged one with `mnist-pipeline run --resume RUN`")
    return "\n".join(lines)


def compare_runs(names: list[str], root: str) -> str:
    """Two or more runs (ids under `root`, folders or URIs) side by side: status, accuracies, best trial, trials and
    time, then every setting whose value differs between them (a run without a readable config.yaml says so).

    Raises:
      BadInputError: fewer than two runs, or one that is not there.
    """
    if len(names) < 2:
        raise BadInputError("runs: name two or more runs to compare, or none to list every run")
    runs = [locate_run(name, root) for name in names]
    for name, run in zip(names, runs):
        if not storage.exists(run.location):
            raise BadInputError(f"runs: no run {name!r} ({run.location} does not exist)")
    infos = [describe_run(storage.parent_of(run.location), run.run_id) for run in runs]
    rows = [
        ("status", [info.status for info in infos]),
        ("val accuracy", [_percent(info.val_accuracy) for info in infos]),
        ("test accuracy", [_percent(info.test_accuracy) for info in infos]),
        ("best trial", [info.best_trial_id or "–" for info in infos]),
        ("trials", [str(info.trials) if info.trials is not None else "–" for info in infos]),
        ("time", [_minutes(info.seconds) for info in infos]),
    ]
    settings = [_settings_of(run) for run in runs]
    keys = sorted({key for values in settings if values is not None for key in values} - set(_NOT_COMPARED))
    differing = [
        (key, [("(no config)" if values is None else _cell(values.get(key, "–"))) for values in settings])
        for key in keys
        if len({repr(values.get(key, "–")) if values is not None else None for values in settings}) > 1
    ]
    lines = _columns([("", [info.run_id for info in infos]), *rows, *differing])  # one set of column widths
    lines.insert(1 + len(rows), "settings that differ:" if differing else "settings: the same in every run")
    return "\n".join(lines)


def _settings_of(run: RunFolder) -> dict | None:
    """The run's config.yaml as dotted keys ("train.epochs"); None when it is missing or unreadable."""
    import yaml

    try:
        data = read_run_file(run.config_file, MAX_CONFIG_BYTES)
        config = yaml.safe_load(data) if data is not None else None
    except (DamagedFile, yaml.YAMLError, OSError):
        return None
    return dotted(config) if isinstance(config, dict) else None


def _cell(value) -> str:
    text = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    text = " ".join(text.split())  # one line, whatever a value holds
    return text if len(text) <= _MAX_CELL else text[: _MAX_CELL - 1] + "…"


def _columns(rows: list[tuple[str, list[str]]]) -> list[str]:
    label = max(len(name) for name, _ in rows) + 2
    widths = [max(len(values[column]) for _, values in rows) for column in range(len(rows[0][1]))]
    return [
        (f"{name:<{label}}" + "  ".join(value.ljust(width) for value, width in zip(values, widths))).rstrip()
        for name, values in rows
    ]


def _run_ids(root: str) -> list[str]:
    """The folders under `root` that hold a run's files, or that cannot be read (listed as damaged, not hidden)."""
    if not storage.is_uri(root):
        return _local_run_ids(Path(root).expanduser(), root)
    import pyarrow.fs

    filesystem, path = pyarrow.fs.FileSystem.from_uri(root)
    try:
        entries = filesystem.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    except OSError as error:
        raise BadInputError(f"run.root={root!r}: cannot list it ({error})") from None
    ids = []
    for entry in entries:
        if entry.type == pyarrow.fs.FileType.Directory:
            try:
                names = set(names_in(storage.join(root, entry.base_name)))
            except DamagedFile:
                names = _RUN_FILES
            if names & _RUN_FILES:
                ids.append(entry.base_name)
    return ids


def _local_run_ids(folder: Path, root: str) -> list[str]:
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as error:
        raise BadInputError(f"run.root={root!r}: cannot list {folder}: {error.strerror}") from None
    ids = []
    for entry in entries:
        try:
            if not entry.is_dir():
                continue
            names = set(os.listdir(entry.path))
        except OSError:
            names = _RUN_FILES  # unreadable: maybe a run; shown as damaged rather than left out
        if names & _RUN_FILES:
            ids.append(entry.name)
    return ids


def _percent(value: float | None) -> str:
    return f"{value:.2%}" if value is not None else "–"


def _minutes(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    return f"{seconds:.0f}s" if seconds < 60 else f"{int(seconds // 60)}m{seconds % 60:02.0f}s"
