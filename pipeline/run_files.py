"""Reading a run's files, which may be damaged, and judging what a run produced.

After a crash, a full disk or a user's edit, a run's folder can hold anything: a file cut short or garbled, JSON of
another shape, a folder or a FIFO where a file belongs, a file too large to be ours. Everything here reads such files
as data, up to a size limit, and turns whatever is wrong into a DamagedFile that names the file and the problem in one
line: the JSON records (stages.json, summary.json, metrics.json) checked for the shape this program writes,
config.yaml for every section, model/model.keras for a whole Keras archive, and Tune's experiment state for one that
Tune can restore (its pickles parsed, never loaded); a damaged experiment is set aside, never deleted.
"""

from __future__ import annotations

import json
import math
import os
import pickletools
import re
import stat
import time
import zipfile
from pathlib import Path
from typing import Any, Callable

from pipeline.bounded_yaml import MAX_CONFIG_BYTES  # config.yaml: what a config file may hold
from pipeline.run_folder import RunFolder
from stages.common import storage
from stages.common.errors import BadInputError, DataError
from stages.common.redact import redact
from stages.evaluation.metrics import RunMetrics

MAX_RECORD_BYTES = 16 * 2**20  # stages.json, summary.json, metrics.json are KiBs: more is not ours
MAX_STATE_BYTES = 256 * 2**20  # Tune's experiment state grows with the trials; far below this for any real search


class DamagedFile(DataError):
    """A file of a run that is there but cannot be what this program wrote (truncated, garbled, wrong shape)."""

    def __init__(self, location: str, what: str):
        super().__init__(f"{redact(location)}: {what}")
        self.location, self.what = location, what


def read_run_file(location: str, limit: int = MAX_RECORD_BYTES) -> bytes | None:
    """The bytes of one of a run's files; None when it does not exist.

    Raises:
      DamagedFile: it is a folder or not a regular file (a FIFO would block the reader), larger than `limit`, or
        cannot be read (permission denied).
    """
    if storage.is_uri(location):
        try:
            if not storage.exists(location):
                return None
            data = storage.read_bytes(location)
        except OSError as error:
            raise DamagedFile(location, f"unreadable ({describe_os_error(error)})") from None
    else:
        if not local_file_exists(location):
            return None
        try:
            with open(location, "rb") as file:
                data = file.read(limit + 1)
        except OSError as error:
            raise DamagedFile(location, describe_os_error(error)) from None
    if len(data) > limit:
        raise DamagedFile(location, f"larger than {limit >> 20} MiB: not what a run writes there")
    return data


def local_file_exists(location: str) -> bool:
    """Whether a regular file is at the local path `location` (False: nothing there).

    Raises:
      DamagedFile: something else is there, or its folder cannot be read.
    """
    try:
        mode = os.stat(location).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as error:
        raise DamagedFile(location, describe_os_error(error)) from None
    if stat.S_ISDIR(mode):
        raise DamagedFile(location, "a folder, not a file")
    if not stat.S_ISREG(mode):
        raise DamagedFile(location, "not a regular file")
    return True


def parse_json(location: str, data: bytes) -> Any:
    """The JSON value in `data`, read from `location`.

    Raises:
      DamagedFile: it is not JSON text.
    """
    try:
        return json.loads(data)
    except UnicodeDecodeError:
        raise DamagedFile(location, "not text (binary data)") from None
    except json.JSONDecodeError as error:
        raise DamagedFile(
            location, f"not valid JSON ({error.msg.lower()}; line {error.lineno}, column {error.colno})"
        ) from None
    except (ValueError, RecursionError):
        raise DamagedFile(location, "not valid JSON") from None


def read_json_object(location: str, limit: int = MAX_RECORD_BYTES) -> dict | None:
    """The JSON object in one of a run's files; None when the file does not exist.

    Raises:
      DamagedFile: unreadable, not JSON, or JSON of another shape (a list, a number, ...).
    """
    data = read_run_file(location, limit)
    if data is None:
        return None
    value = parse_json(location, data)
    if not isinstance(value, dict):
        raise DamagedFile(location, f"a JSON {kind_of(value)}, not an object")
    return value


def kind_of(value: Any) -> str:
    """A value's JSON kind, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "list" if isinstance(value, list) else "object" if isinstance(value, dict) else type(value).__name__


def describe_os_error(error: OSError) -> str:
    """How `error` reads in a one-line message: "permission denied", "no such file or directory", ..."""
    if isinstance(error, PermissionError):
        return "permission denied"
    return (error.strerror or str(error) or type(error).__name__).lower()


# A field's check and how a message names what it should be
Check = tuple[Callable[[Any], bool], str]
NUMBER: Check = (
    lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), "a number"
)
INTEGER: Check = (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer")
TEXT: Check = (lambda v: isinstance(v, str), "a string")
OPTIONAL_TEXT: Check = (lambda v: v is None or isinstance(v, str), "a string or null")
MAPPING: Check = (lambda v: isinstance(v, dict), "an object")
OPTIONAL_MAPPING: Check = (lambda v: v is None or isinstance(v, dict), "an object or null")
LIST: Check = (lambda v: isinstance(v, list), "a list")
TEXT_LIST: Check = (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings")


def shape_problem(value: dict, fields: dict[str, Check], *, exact: bool = False) -> str | None:
    """What is wrong with the fields of `value` ("no 'x'", "'x' should be a number, got a string"), or None."""
    for name, (ok, should_be) in fields.items():
        if name not in value:
            return f"no {name!r}"
        if not ok(value[name]):
            return f"{name!r} should be {should_be}, got {_a(kind_of(value[name]))}"
    extra = [name for name in value if name not in fields] if exact else []
    return f"unexpected field {extra[0]!r}" if extra else None


def _a(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


# What the summary, the quality gate and `runs` read from metrics.json (it holds more: per-class scores, ...)
_METRICS_FIELDS = {
    "val_accuracy": NUMBER, "test_accuracy": NUMBER, "test_loss": NUMBER, "test_images": INTEGER,
    "best_trial_id": TEXT, "best_epoch": INTEGER, "hyperparameters": MAPPING, "trials": LIST,
}
_TRIAL_FIELDS = {"trial_id": TEXT, "status": TEXT, "nodes": TEXT_LIST, "error": OPTIONAL_TEXT}
# The summary shows these too; runs evaluated before they existed lack them
_TOP_TRIAL_FIELDS = {
    "trial_id": TEXT, "best_val_accuracy": NUMBER, "best_epoch": INTEGER, "epochs": INTEGER, "hyperparameters": MAPPING,
}
_ENSEMBLE_FIELDS = {"k": INTEGER, "trial_ids": TEXT_LIST, "test_accuracy": NUMBER, "test_loss": NUMBER}


def read_metrics(run: RunFolder) -> RunMetrics:
    """The run's metrics.json, checked to have every field the summary shows.

    Raises:
      DamagedFile: missing, unreadable, or not the metrics evaluate writes.
    """
    metrics = read_json_object(run.metrics_file)
    if metrics is None:
        raise DamagedFile(run.metrics_file, "missing")
    problem = shape_problem(metrics, _METRICS_FIELDS) or _list_problem(metrics, "trials", _TRIAL_FIELDS)
    problem = problem or _optional_problem(metrics)
    if problem:
        raise DamagedFile(run.metrics_file, problem)
    try:
        return RunMetrics.from_json(metrics)
    except (KeyError, TypeError) as error:  # in a part the summary does not show (per_class, ...)
        raise DamagedFile(run.metrics_file, f"not the metrics evaluate writes ({type(error).__name__}: {error})") \
            from None


def _list_problem(record: dict, name: str, fields: dict[str, Check]) -> str | None:
    """What is wrong with the first bad object in the list `record[name]`, or None."""
    for index, item in enumerate(record[name]):
        item_problem = shape_problem(item, fields) if isinstance(item, dict) else "not an object"
        if item_problem:
            return f"{name}[{index}]: {item_problem}"
    return None


def _optional_problem(metrics: dict) -> str | None:
    """What is wrong with the optional fields of metrics.json that are there (top_trials, ensemble, stop_reason)."""
    present = {name: check for name, check in
               {"top_trials": LIST, "ensemble": OPTIONAL_MAPPING, "stop_reason": OPTIONAL_TEXT}.items()
               if name in metrics}
    problem = shape_problem(metrics, present)
    if problem is None and "top_trials" in metrics:
        problem = _list_problem(metrics, "top_trials", _TOP_TRIAL_FIELDS)
    if problem is None and metrics.get("ensemble") is not None:
        ensemble_problem = shape_problem(metrics["ensemble"], _ENSEMBLE_FIELDS)
        problem = f"ensemble: {ensemble_problem}" if ensemble_problem else None
    return problem


_KERAS_PARTS = {"config.json", "model.weights.h5"}  # what keras.saving writes into every .keras archive


def check_exported_model(run: RunFolder) -> None:
    """Makes sure model/model.keras is a complete Keras archive (every member's checksum verified) without loading
    it: TensorFlow is not imported in the driver for this.

    Raises:
      DamagedFile: missing, truncated, garbled.
    """
    location = run.model_file
    try:
        present = storage.exists(location) if storage.is_uri(location) else local_file_exists(location)
        if not present:
            raise DamagedFile(location, "missing")
        with storage.local_copy(location) as path, zipfile.ZipFile(path) as archive:
            missing = _KERAS_PARTS - set(archive.namelist())
            corrupt = None if missing else archive.testzip()
    except zipfile.BadZipFile:
        raise DamagedFile(location, "not a Keras model archive (truncated or garbled)") from None
    except EOFError:
        raise DamagedFile(location, "not a Keras model archive (truncated)") from None
    except OSError as error:
        raise DamagedFile(location, f"unreadable ({describe_os_error(error)})") from None
    if missing:
        raise DamagedFile(location, f"not a Keras model archive (no {sorted(missing)[0]})")
    if corrupt:
        raise DamagedFile(location, f"garbled ({corrupt} fails its checksum)")


# sections added to the config after runs were saved without them: such a run's config takes their defaults
LATER_SECTIONS = ("tracking",)


def check_run_config(run: RunFolder) -> bool:
    """Whether the run has a config.yaml, made sure it is a whole one: a run saves its whole resolved config, every
    section, so one that lacks a section was cut short, and reading it would quietly put defaults in its place.
    Wrong values are left to pipeline.config, which names the key.

    Raises:
      DamagedFile: unreadable, not YAML, not a mapping, or a section missing.
    """
    import yaml

    from pipeline.config import Config

    data = read_run_file(run.config_file, MAX_CONFIG_BYTES)
    if data is None:
        return False
    try:
        config = yaml.safe_load(data)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise DamagedFile(run.config_file, f"not valid YAML ({error.problem}{where})") from None
    except yaml.YAMLError:  # a reader error: bytes that are no text
        raise DamagedFile(run.config_file, "not text (binary data)") from None
    if not isinstance(config, dict):
        raise DamagedFile(run.config_file, f"{_a(kind_of(config))}, not a mapping of sections")
    missing = [section for section in Config.model_fields if section not in config and section not in LATER_SECTIONS]
    if missing:
        raise DamagedFile(run.config_file, f"no {missing[0]!r} section (cut short?)")
    return True


def experiment_problem(run: RunFolder) -> str | None:
    """What keeps Tune from restoring the run's experiment (a state file missing, truncated or garbled), or None:
    restorable, or nothing to restore (no tuner.pkl: Tune starts the experiment anew). The files are read as data:
    a pickle is parsed, never loaded."""
    tune = run.tune_dir
    try:
        names = names_in(tune)
        if "tuner.pkl" not in names:
            return None
        if not any(name.startswith("experiment_state-") for name in names):
            return f"{redact(tune)}: no experiment_state-*.json beside tuner.pkl"
        for name in _newest_state_files(names):
            problem = _state_file_problem(storage.join(tune, name))
            if problem:
                return problem
    except DamagedFile as damage:
        return str(damage)
    return None


_STAMP = re.compile(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d")  # in the names of Tune's state files


def _newest_state_files(names: list[str]) -> list[str]:
    """Of each kind of Tune state file (tuner.pkl, experiment_state-<time>.json, basic-variant-state-<time>.json,
    ...), the newest: the one a restore reads."""
    newest = {}
    for name in sorted(names):  # the time in a name sorts like the time itself
        if name.endswith((".pkl", ".json")) and not name.startswith("."):
            newest[_STAMP.sub("*", name)] = name
    return list(newest.values())


def _state_file_problem(location: str) -> str | None:
    """What is wrong with one of Tune's state files, which are pickles or JSON whatever their names say."""
    data = read_run_file(location, MAX_STATE_BYTES) or b""
    if data[:1] == b"\x80":  # the PROTO opcode that starts every pickle Tune writes
        return None if _complete_pickle(data) else f"{redact(location)}: truncated or garbled"
    state = parse_json(location, data)
    if storage.name_of(location).startswith("experiment_state-"):
        problem = shape_problem(state, {"trial_data": LIST, "runner_data": MAPPING}) if isinstance(state, dict) \
            else f"a JSON {kind_of(state)}, not an object"
        if problem:
            return f"{redact(location)}: {problem}"
    return None


def names_in(location: str) -> list[str]:
    """The names of the entries directly in a folder; none when it does not exist."""
    if not storage.is_uri(location):
        try:
            return os.listdir(location)
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as error:
            raise DamagedFile(location, describe_os_error(error)) from None
    import pyarrow.fs

    filesystem, path = pyarrow.fs.FileSystem.from_uri(location)
    try:
        entries = filesystem.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    except OSError as error:
        raise DamagedFile(location, f"unreadable ({describe_os_error(error)})") from None
    return [entry.base_name for entry in entries]


def _complete_pickle(data: bytes) -> bool:
    """Whether `data` is a whole pickle, judged by parsing its opcodes (nothing is executed)."""
    try:
        return any(opcode.name == "STOP" for opcode, _, _ in pickletools.genops(data))
    except Exception:  # genops raises ValueError, but whatever garbage raises means the same
        return False


def set_aside_experiment(run: RunFolder, why: str) -> str | None:
    """Moves the run's damaged Tune experiment out of Tune's way, so that train starts anew; the training it holds is
    kept (tune.damaged-<time>/), never deleted. Returns where it went; None when there was none.

    Raises:
      BadInputError: it is on an object store, which cannot rename a folder: the user decides.
    """
    tune = run.tune_dir
    if not storage.exists(tune):
        return None
    if storage.is_uri(tune):
        raise BadInputError(
            f"{redact(tune)} cannot be restored ({why}); an object store cannot move it aside: delete it (or move "
            "it away) and resume again to train this run anew"
        )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, attempt = Path(run.location, f"tune.damaged-{stamp}"), 1
    while target.exists():
        attempt += 1
        target = Path(run.location, f"tune.damaged-{stamp}-{attempt}")
    os.rename(tune, target)
    return str(target)
