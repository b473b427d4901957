"""A run's folder: every artifact of one run lives under <run.root>/<run id>/."""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from stages import storage
from stages.errors import BadInputError


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
    "data_dir": "data",  # dataset.npz and manifest.json
    "model_dir": "model",  # model.keras and hyperparameters.json
    "metrics_file": "metrics.json",
    "summary_file": "summary.json",
}  # and pipeline.log (the driver's log), tune/ (the Tune experiment: trials, checkpoints, TensorBoard event files)


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
        return RunFolder(location)  # object stores have no folders to create
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
        raise BadInputError(f"run {run_id!r} exists already in {root_path}; choose another run.id") from None
    except OSError as error:
        raise BadInputError(f"cannot create the run folder {folder}: {error.strerror}") from None
    return RunFolder(str(folder))


def remove_empty_run_folder(run: RunFolder) -> None:
    """Undoes create_run_folder for a run refused before it wrote anything."""
    if not storage.is_uri(run.location):
        Path(run.location).rmdir()
