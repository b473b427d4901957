"""A run's folder: every artifact of one run lives under <run.root>/<run id>/.

What makes a folder a run: create_run_folder writes RUN_MARKER into it before anything else. Runs made before the
marker existed are recognised by what only this program writes together: a config.yaml beside a stages.json in the
format of pipeline.stage_records (they get the marker when resumed). `run --resume` refuses any other folder before
it touches anything there: it rewrites config.yaml and fills the folder, which must never happen to a user's folder.
"""

from __future__ import annotations

import grp
import json
import logging
import math
import os
import pickletools
import pwd
import re
import secrets
import socket
import stat
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from stages import storage
from stages.atomic import sweep_stale_parts
from stages.errors import BadInputError, DataError
from stages.redact import redact

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
RUN_MARKER = ".mnist-pipeline-run"
MAX_RECORD_BYTES = 16 * 2**20  # stages.json, summary.json, metrics.json are KiBs: more is not ours
MAX_CONFIG_BYTES = 2**20  # config.yaml: what pipeline.config reads at most
MAX_STATE_BYTES = 256 * 2**20  # Tune's experiment state grows with the trials; far below this for any real search


@dataclass(frozen=True)
class RunFolder:
    """A run's location: an absolute local path, or a URI such as s3://bucket/runs/<id>."""

    location: str

    @property
    def run_id(self) -> str:
        return storage.name_of(self.location)

    def __getattr__(self, name: str) -> str:
        if name in _ARTIFACTS:
            return storage.join(self.location, _ARTIFACTS[name])
        raise AttributeError(name)


_ARTIFACTS = {
    "config_file": "config.yaml",  # the resolved config of the run
    "log_file": "pipeline.log",  # everything the console showed, with the driver's records timestamped
    "stages_file": "stages.json",  # what each finished stage did (pipeline.stage_records)
    "data_dir": "data",  # dataset.npz and manifest.json
    "model_dir": "model",  # model.keras and hyperparameters.json
    "model_file": "model/model.keras",
    "metrics_file": "metrics.json",
    "summary_file": "summary.json",
    "report_file": "report.html",  # self-contained: figures embedded
    "figures_dir": "report",  # the report's figures as PNG files
    "marker_file": RUN_MARKER,  # says "a run of mnist-pipeline"; written first
    # the Tune experiment (trials, checkpoints, TensorBoard event files): train_task's storage path is the run
    # folder and its experiment is named stages.train.EXPERIMENT_NAME, so it is here and nowhere else
    "tune_dir": "tune",
}  # and .lock (run_lock)


class DamagedFile(DataError):
    """A file of a run that is there but cannot be what this program wrote (truncated, garbled, wrong shape)."""

    def __init__(self, location: str, what: str):
        super().__init__(f"{redact(location)}: {what}")
        self.location, self.what = location, what


def new_run_id() -> str:
    """Sortable by start time, unique across runs started in the same second."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def create_run_folder(root: str, run_id: str | None) -> RunFolder:
    """Creates <root>/<run_id>/, refusing to reuse one that exists or a local root that cannot be written.

    Raises:
      BadInputError: the run exists already, or the local root is not a writable folder.
    """
    run_id = run_id or new_run_id()
    if storage.is_uri(root):
        location = storage.join(root, run_id)
        if storage.exists(location):
            raise BadInputError(f"run {run_id!r} exists already in {root}; choose another run.id")
        run = RunFolder(location)  # object stores have no folders to create: the marker makes it
        _write_marker(run)
        return run
    root_path = Path(root).expanduser().resolve()
    try:
        root_path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise BadInputError(f"run.root={root!r}: {root_path} is not a folder") from None
    except OSError as error:
        raise BadInputError(f"run.root={root!r}: cannot create {root_path}: {error.strerror}") from None
    if not os.access(root_path, os.W_OK | os.X_OK):
        raise BadInputError(f"run.root={root!r}: {root_path} is not writable")
    folder = root_path / run_id
    try:
        folder.mkdir()
    except FileExistsError:
        if not _never_began(folder):
            raise BadInputError(f"run {run_id!r} exists already in {root_path}; choose another run.id") from None
        log.info("run %s: reusing its folder, left by a start that was killed before the run began", run_id)
    except OSError as error:
        raise BadInputError(f"cannot create the run folder {folder}: {error.strerror}") from None
    run = RunFolder(str(folder))
    try:
        _write_marker(run)
    except BaseException:
        folder.rmdir()
        raise
    return run


def _never_began(folder: Path) -> bool:
    """Whether `folder` is what a start of ours killed before its run began (kill -9 while Ray started) left: only
    the marker and an unheld lock. Such a folder must not block its run id for ever; anything else is kept."""
    try:
        names = {entry.name for entry in folder.iterdir()}
    except OSError:
        return False
    if not names <= {RUN_MARKER, LOCK_FILE} or RUN_MARKER not in names:
        return False
    if LOCK_FILE not in names:
        return True
    import fcntl

    try:
        with open(folder / LOCK_FILE, "rb") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when closed
    except OSError:
        return False  # held: that start is still going
    return True


def adopt_run_folder(run: RunFolder) -> None:
    """Marks a run made before the marker existed, once it is really resumed (check_resumable recognised it)."""
    if not storage.exists(run.marker_file):
        _write_marker(run)


def _write_marker(run: RunFolder) -> None:
    """What tells this run's folder from any other folder (see the module's docstring)."""
    created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    storage.write_json(run.marker_file, {"program": "mnist-pipeline", "run_id": run.run_id, "created": created})


def names_a_folder(run: str) -> bool:
    """Whether the user named a run by its folder or URI (anything with a '/', '.', '..', '~...'), not by its id."""
    return storage.is_uri(run) or "/" in run or run in (".", "..") or run.startswith("~")


def locate_run(run: str, root: str | None) -> RunFolder:
    """A run named by the user: its folder or URI (see names_a_folder), else its id under `root` (which only a run
    named by its id needs)."""
    if storage.is_uri(run):
        return RunFolder(run)
    if names_a_folder(run):
        return RunFolder(str(Path(run).expanduser().resolve()))
    if root is None:
        raise ValueError(f"run {run!r} is named by its id: its run.root is needed")
    return RunFolder(storage.join(root if storage.is_uri(root) else str(Path(root).expanduser().resolve()), run))


def open_run_folder(root: str, run_id: str) -> RunFolder:
    """The folder of an earlier run, to resume it; temporary files its killed writers left on this host are removed."""
    location = storage.join(root, run_id) if storage.is_uri(root) else str(Path(root, run_id))
    run = RunFolder(location)
    if not storage.is_uri(location):
        stale = sweep_stale_parts(Path(location), recursive=True)
        if stale:
            log.info("run %s: removed %d temporary file(s) left by killed writers", run_id, len(stale))
    return run


@contextmanager
def run_lock(run: RunFolder) -> Iterator[None]:
    """Holds the run folder's lock while this driver lives, so that a second driver on the same run (a resume
    started while the run still goes on) is refused. The OS drops the lock when the process dies, kill -9 included.

    Object stores have no locks: a run on s3:// or gs:// is not protected this way.

    Raises:
      BadInputError: another process holds the lock.
    """
    if storage.is_uri(run.location):
        yield
        return
    import fcntl

    path = Path(run.location, LOCK_FILE)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise BadInputError(f"run {run.run_id} is in progress ({holder}); wait for it or stop it first") from None
        except OSError as error:  # a shared filesystem without locks (some NFS mounts): run, but say so
            log.warning("run %s: its folder cannot be locked (%s); do not resume it twice at once",
                        run.run_id, error.strerror)
            yield
            return
        handle.truncate(0)
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def remove_empty_run_folder(run: RunFolder) -> None:
    """Undoes create_run_folder for a run refused before it wrote anything."""
    if storage.is_uri(run.location):
        import pyarrow.fs

        filesystem, path = pyarrow.fs.FileSystem.from_uri(run.location)
        filesystem.delete_file(f"{path}/{RUN_MARKER}")
        # pyarrow keeps an emptied "folder" as a marker object of its own: gone too, unless something else is there
        if not filesystem.get_file_info(pyarrow.fs.FileSelector(path, recursive=True, allow_not_found=True)):
            filesystem.delete_dir(path)
        return
    Path(run.marker_file).unlink(missing_ok=True)
    Path(run.location, LOCK_FILE).unlink(missing_ok=True)
    Path(run.location).rmdir()


# --- reading a run's files, which may be damaged -------------------------------------------------------------------


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
            raise DamagedFile(location, f"unreadable ({_reason(error)})") from None
    else:
        if not _local_file(location):
            return None
        try:
            with open(location, "rb") as file:
                data = file.read(limit + 1)
        except OSError as error:
            raise DamagedFile(location, _reason(error)) from None
    if len(data) > limit:
        raise DamagedFile(location, f"larger than {limit >> 20} MiB: not what a run writes there")
    return data


def _local_file(location: str) -> bool:
    """Whether a regular file is at the local path `location` (False: nothing there).

    Raises:
      DamagedFile: something else is there, or its folder cannot be read.
    """
    try:
        mode = os.stat(location).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as error:
        raise DamagedFile(location, _reason(error)) from None
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


def _reason(error: OSError) -> str:
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


def read_metrics(run: RunFolder) -> dict:
    """The run's metrics.json, checked to have every field the summary shows.

    Raises:
      DamagedFile: missing, unreadable, or not the metrics evaluate writes.
    """
    metrics = read_json_object(run.metrics_file)
    if metrics is None:
        raise DamagedFile(run.metrics_file, "missing")
    problem = shape_problem(metrics, _METRICS_FIELDS)
    for index, trial in enumerate(metrics["trials"] if problem is None else []):
        trial_problem = shape_problem(trial, _TRIAL_FIELDS) if isinstance(trial, dict) else "not an object"
        if trial_problem:
            problem = f"trials[{index}]: {trial_problem}"
            break
    if problem:
        raise DamagedFile(run.metrics_file, problem)
    return metrics


_KERAS_PARTS = {"config.json", "model.weights.h5"}  # what keras.saving writes into every .keras archive


def check_exported_model(run: RunFolder) -> None:
    """Makes sure model/model.keras is a complete Keras archive (every member's checksum verified) without loading
    it: TensorFlow is not imported in the driver for this.

    Raises:
      DamagedFile: missing, truncated, garbled.
    """
    location = run.model_file
    try:
        present = storage.exists(location) if storage.is_uri(location) else _local_file(location)
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
        raise DamagedFile(location, f"unreadable ({_reason(error)})") from None
    if missing:
        raise DamagedFile(location, f"not a Keras model archive (no {sorted(missing)[0]})")
    if corrupt:
        raise DamagedFile(location, f"garbled ({corrupt} fails its checksum)")


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
            raise DamagedFile(location, _reason(error)) from None
    import pyarrow.fs

    filesystem, path = pyarrow.fs.FileSystem.from_uri(location)
    try:
        entries = filesystem.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    except OSError as error:
        raise DamagedFile(location, f"unreadable ({_reason(error)})") from None
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


# --- what `run --resume` accepts -----------------------------------------------------------------------------------


def check_resumable(run: RunFolder) -> None:
    """Refuses, before anything is written, a folder `run --resume` must not touch: one that is not a run of this
    program, one whose records are damaged, one whose Tune state someone else could have written.

    Raises:
      BadInputError: one line naming the folder or file, and what to do.
    """
    where = redact(run.location)
    try:
        has_config = storage.exists(run.config_file) if storage.is_uri(run.location) else _local_file(run.config_file)
    except DamagedFile as damage:
        if _has_marker(run):
            raise BadInputError(f"cannot resume: {damage}") from None
        raise BadInputError(f"{where} is not a run of mnist-pipeline (config.yaml there: {damage.what}); not "
                            "resuming it, nothing there was changed") from None
    if not has_config:
        raise BadInputError(f"no run to resume at {where} (no config.yaml there)")
    records_damage = _records_damage(run)
    if not _has_marker(run):
        if records_damage is not None or not storage.exists(run.stages_file):
            found = f"its stages.json is damaged ({records_damage.what})" if records_damage else "no stages.json"
            raise BadInputError(
                f"{where} is not a run of mnist-pipeline (no {RUN_MARKER} file, {found}); not resuming it, "
                "nothing there was changed"
            )
    check_private(run)
    if records_damage is not None:
        # Refused rather than read as "no records": every stage would run again, and nothing would stop a --set
        # that changes the training settings from being applied to the restored Tune experiment (check_resume
        # compares against these records). Deleting the file is the user's informed choice.
        raise BadInputError(
            f"cannot resume: {records_damage}; it records which stages finished: delete it to run every stage "
            "again (a Tune experiment in tune/ is then restored, not trained anew)"
        )
    _check_config_file(run)


def _has_marker(run: RunFolder) -> bool:
    if storage.is_uri(run.marker_file):
        return storage.exists(run.marker_file)
    try:
        return _local_file(run.marker_file)
    except DamagedFile:
        return False


def _records_damage(run: RunFolder) -> DamagedFile | None:
    from pipeline.stage_records import StageRecords  # it imports this module

    try:
        StageRecords.load(run.location)
    except DamagedFile as damage:
        return damage
    return None


def _check_config_file(run: RunFolder) -> None:
    try:
        check_run_config(run)
    except DamagedFile as damage:
        raise BadInputError(f"cannot resume: {damage}") from None


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
    missing = [section for section in Config.model_fields if section not in config]
    if missing:
        raise DamagedFile(run.config_file, f"no {missing[0]!r} section (cut short?)")
    return True


# --- who may have written the run's Tune state ---------------------------------------------------------------------


def check_private(run: RunFolder) -> None:
    """Refuses a local run folder, or anything in its tune/ folder, that another user owns or could write.

    Tune restores an experiment by unpickling its state (tuner.pkl, and cloudpickle inside experiment_state-*.json):
    whoever can write there can run code as the user who resumes. Object stores are left to their access control.
    A symbolic link in tune/ is refused too: the experiment is restored from the run folder named, nowhere else.

    Raises:
      BadInputError: one line naming the path, why, and the command that fixes it.
    """
    if storage.is_uri(run.location):
        return
    folder = Path(run.location)
    _refuse_if_unsafe(folder, folder)
    tune = Path(run.tune_dir)
    if not os.path.lexists(tune):
        return
    _refuse_if_unsafe(tune, folder)

    def unreadable(error: OSError) -> None:
        raise BadInputError(f"cannot resume {folder}: {error.filename}: {_reason(error)}")

    for parent, folders, files in os.walk(tune, onerror=unreadable):
        for name in folders + files:
            _refuse_if_unsafe(Path(parent, name), folder)


def _refuse_if_unsafe(path: Path, run_folder: Path) -> None:
    try:
        status = os.lstat(path)
    except OSError as error:
        raise BadInputError(f"cannot resume {run_folder}: {path}: {_reason(error)}") from None
    me = os.geteuid()
    if stat.S_ISLNK(status.st_mode):
        problem, fix = "is a symbolic link", f"replace {path} by what it points to"
    elif status.st_uid != me:
        problem = f"belongs to {_user_name(status.st_uid)}, not to you ({_user_name(me)})"
        fix = f"chown -R {_user_name(me)} {run_folder}"
    elif status.st_mode & stat.S_IWOTH:
        problem, fix = "is writable by every user", f"chmod -R go-w {run_folder}"
    elif status.st_mode & stat.S_IWGRP and not _private_group(status.st_gid, me):
        problem, fix = f"is writable by group {_group_name(status.st_gid)}", f"chmod -R go-w {run_folder}"
    else:
        return
    raise BadInputError(
        f"not resuming {run_folder}: {path} {problem}, and Tune restores its experiment with pickle (whoever can "
        f"write there can run code as you); if you trust its contents: {fix}"
    )


def _private_group(gid: int, uid: int) -> bool:
    """Whether `gid` is the user's own group (the user-private-group scheme: same name, no other members), whose
    write permission umask 002 gives every file and which gives nobody else access."""
    try:
        user, group = pwd.getpwuid(uid), grp.getgrgid(gid)
    except KeyError:
        return False
    return user.pw_gid == gid and group.gr_name == user.pw_name and set(group.gr_mem) <= {user.pw_name}


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return f"gid {gid}"
