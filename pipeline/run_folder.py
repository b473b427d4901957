"""A run's folder: every artifact of one run lives under <run.root>/<run id>/."""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from stages.errors import BadInputError


@dataclass(frozen=True)
class RunFolder:
    path: Path

    @property
    def run_id(self) -> str:
        return self.path.name

    config_file = property(lambda self: self.path / "config.yaml")  # the resolved config of the run
    data_dir = property(lambda self: self.path / "data")  # dataset.npz and manifest.json
    tune_dir = property(lambda self: self.path / "tune")  # the Tune experiment: trials, checkpoints, event files
    model_dir = property(lambda self: self.path / "model")  # model.keras and hyperparameters.json
    metrics_file = property(lambda self: self.path / "metrics.json")
    summary_file = property(lambda self: self.path / "summary.json")
    log_file = property(lambda self: self.path / "pipeline.log")


def new_run_id() -> str:
    """Sortable by start time, unique across runs started in the same second."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def create_run_folder(root: str, run_id: str | None) -> RunFolder:
    """Creates <root>/<run_id>/, refusing to reuse one that exists or a root that cannot be written.

    Raises:
      BadInputError: the folder exists already, or the root is not a writable folder.
    """
    if "://" in root:
        raise BadInputError(f"run.root={root!r}: remote storage is not supported yet; use a local folder")
    root_path = Path(root).expanduser().resolve()
    try:
        root_path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise BadInputError(f"run.root={root!r}: {root_path} is not a folder") from None
    except OSError as error:
        raise BadInputError(f"run.root={root!r}: cannot create {root_path}: {error.strerror}") from None
    if not os.access(root_path, os.W_OK | os.X_OK):
        raise BadInputError(f"run.root={root!r}: {root_path} is not writable")
    folder = root_path / (run_id or new_run_id())
    try:
        folder.mkdir()
    except FileExistsError:
        raise BadInputError(f"run {folder.name!r} exists already in {root_path}; choose another run.id") from None
    except OSError as error:
        raise BadInputError(f"cannot create the run folder {folder}: {error.strerror}") from None
    return RunFolder(folder)
