"""A run's folder: every artifact of one run lives under <run.root>/<run id>/.

What makes a folder a run: create_run_folder writes RUN_MARKER into it before anything else. Runs made before the
marker existed are recognised by what only this program writes together: a config.yaml beside a stages.json in the
format of pipeline.stage_records (they get the marker when resumed). `run --resume` refuses any other folder before
it touches anything there (pipeline.resumable): it rewrites config.yaml and fills the folder, which must never happen
to a user's folder.

This module owns the folder itself: its layout (RunFolder), creating, opening and locating it, the marker, the lock,
and removing a folder a refused run left empty. It imports no other module of the pipeline, so that every one can use
it. Reading the files in the folder, which may be damaged, is pipeline.run_files'.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from stages.common import storage
from stages.common.atomic import sweep_stale_parts
from stages.common.errors import BadInputError

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
RUN_MARKER = ".mnist-pipeline-run"
# on a run root every node shares: one copy of each split, which the runs' data/manifest.json files reference
SHARED_DATASETS = ".datasets"


@dataclass(frozen=True)
class RunFolder:
    """A run's location (an absolute local path, or a URI such as s3://bucket/runs/<id>) and where each of its
    artifacts lies in it (paths or URIs alike); a lock file, .lock, beside them (run_lock)."""

    location: str
    made_root: str | None = None  # the topmost folder of run.root that create_run_folder made (removed with the run)

    @property
    def run_id(self) -> str:
        return storage.name_of(self.location)

    def _in_folder(self, name: str) -> str:
        return storage.join(self.location, name)

    @property
    def marker_file(self) -> str:
        """Says "a run of mnist-pipeline"; written first."""
        return self._in_folder(RUN_MARKER)

    @property
    def config_file(self) -> str:
        """The resolved config of the run."""
        return self._in_folder("config.yaml")

    @property
    def log_file(self) -> str:
        """Everything the console showed, with the driver's records timestamped."""
        return self._in_folder("pipeline.log")

    @property
    def stages_file(self) -> str:
        """What each finished stage did (pipeline.stage_records)."""
        return self._in_folder("stages.json")

    @property
    def data_dir(self) -> str:
        """The manifest.json of the dataset's splits, which names the folder holding them (dataset.npz)."""
        return self._in_folder("data")

    @property
    def tune_dir(self) -> str:
        """The Tune experiment (trials, checkpoints, TensorBoard event files): the train task's storage path is the
        run folder and its experiment is named stages.train.EXPERIMENT_NAME, so it is here and nowhere else."""
        return self._in_folder("tune")

    @property
    def trials_file(self) -> str:
        """Every trial's hyperparameters and metrics, one row per epoch."""
        return self._in_folder("trials.csv")

    @property
    def metrics_file(self) -> str:
        """stages.evaluation.metrics.RunMetrics, as JSON."""
        return self._in_folder("metrics.json")

    @property
    def model_dir(self) -> str:
        """model.keras, hyperparameters.json (and ensemble.keras with evaluate.ensemble_top_k)."""
        return self._in_folder("model")

    @property
    def model_file(self) -> str:
        return self._in_folder("model/model.keras")

    @property
    def report_file(self) -> str:
        """Self-contained: the figures are embedded."""
        return self._in_folder("report.html")

    @property
    def figures_dir(self) -> str:
        """The report's figures as PNG files."""
        return self._in_folder("report")

    @property
    def summary_file(self) -> str:
        """The run at a glance (pipeline.summary)."""
        return self._in_folder("summary.json")


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
    missing = [folder for folder in [root_path, *root_path.parents] if not folder.exists()]
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
    run = RunFolder(str(folder), made_root=str(missing[-1]) if missing else None)
    try:
        _write_marker(run)
    except BaseException:
        remove_empty_run_folder(run)
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
    """Undoes create_run_folder for a run refused before it wrote anything, the run.root it made included."""
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
    if run.made_root is None:
        return
    for folder in Path(run.location).parents:  # the run.root folders it made, if nothing else went in since
        if not folder.is_relative_to(run.made_root):
            break
        try:
            folder.rmdir()
        except OSError:
            break
