"""Once a search has finished, its checkpoints shrink to what evaluation and the ensemble read.

While trials run, every checkpoint holds the model with its optimizer state (Adam keeps two slots per weight: a
checkpoint is three times the weights), and Tune keeps each trial's best and latest: what a retry, a resume or PBT's
exploit starts from. A finished search needs none of that. Evaluate, the ensemble and `predict` read each trial's best
model, without its optimizer. So when Tune returns with every trial done, the train stage deletes every other
checkpoint of each ranked trial and rewrites its best one without the optimizer state.

Trials that failed (not ranked) keep their checkpoints as they are, for whoever looks into why. The files are handled
through the checkpoint's own pyarrow filesystem: the same code for a local run root and an object store.
"""

from __future__ import annotations

import logging
import posixpath
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs

from stages.training.trial import CHECKPOINT_MODEL
from stages.training.tune_results import RankedCheckpoint

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint_"  # Tune's checkpoint folders in a trial's folder
WEIGHTS_FILE = "model.weights.h5"  # in a Keras 3 archive
OPTIMIZER_GROUP = "optimizer"  # in its weights: optimizer/vars holds the variables


@dataclass(frozen=True)
class Slimmed:
    """What slimming freed."""

    checkpoints_deleted: int
    bytes_before: int
    bytes_after: int


def slim_finished_checkpoints(ranked: list[RankedCheckpoint]) -> Slimmed:
    """Keeps, of each ranked trial, only its best checkpoint, rewritten without optimizer state.

    Idempotent: a checkpoint already without optimizer state is left as it is, so a train task that Ray runs again
    after this (its worker died) finds what it left.
    """
    deleted = before = after = 0
    for entry in ranked:
        filesystem, best = entry.checkpoint.filesystem, entry.checkpoint.path.rstrip("/")
        trial_folder = posixpath.dirname(best)
        for info in filesystem.get_file_info(pyarrow.fs.FileSelector(trial_folder)):
            name = posixpath.basename(info.path.rstrip("/"))
            if info.type == pyarrow.fs.FileType.Directory and name.startswith(CHECKPOINT_PREFIX):
                if posixpath.normpath(info.path) != posixpath.normpath(best):
                    before += _folder_bytes(filesystem, info.path)
                    filesystem.delete_dir(info.path)
                    deleted += 1
        model_file = posixpath.join(best, CHECKPOINT_MODEL)
        before += filesystem.get_file_info(model_file).size
        _drop_optimizer_state(filesystem, model_file)
        after += filesystem.get_file_info(model_file).size
    log.info(
        "train: kept each trial's best checkpoint without optimizer state (%d others deleted): %.1f MB -> %.1f MB",
        deleted, before / 1e6, after / 1e6,
    )
    return Slimmed(deleted, before, after)


def _drop_optimizer_state(filesystem: pyarrow.fs.FileSystem, model_file: str) -> None:
    """Rewrites the Keras archive at `model_file` without the optimizer's variables; a reader sees the old file or the
    new one.

    Done on the archive itself (a zip of config.json, metadata.json and model.weights.h5, whose HDF5 groups are
    `layers`, `vars` and `optimizer`), not by loading the model into Keras: no TensorFlow to import in the train
    task, and nothing but the optimizer's group changes. Keras loads such an archive like any other with
    compile=False, as evaluate, the ensemble and predict do.
    """
    import h5py

    with tempfile.TemporaryDirectory(prefix="mnist-pipeline-slim-") as folder:
        original, weights, slim = Path(folder, "original.keras"), Path(folder, WEIGHTS_FILE), Path(folder, "slim.keras")
        with filesystem.open_input_stream(model_file) as source:
            original.write_bytes(source.read())
        if not _holds_optimizer_state(original):
            return  # slimmed before
        with zipfile.ZipFile(original) as archive, zipfile.ZipFile(slim, "w") as out:
            with archive.open(WEIGHTS_FILE) as saved, h5py.File(saved, "r") as source, h5py.File(weights, "w") as kept:
                for key, value in source.attrs.items():
                    kept.attrs[key] = value
                for name in source:
                    if name != OPTIMIZER_GROUP:
                        source.copy(source[name], kept, name)
            for entry in archive.infolist():  # in the archive's order; weights replaced
                if entry.filename == WEIGHTS_FILE:
                    out.write(weights, WEIGHTS_FILE)
                else:
                    out.writestr(entry, archive.read(entry))
        partial = model_file + ".slim-part"
        with filesystem.open_output_stream(partial) as out_stream:
            out_stream.write(slim.read_bytes())
        filesystem.move(partial, model_file)  # a rename on a local disk


def _holds_optimizer_state(model_file: Path) -> bool:
    """Whether a Keras archive holds optimizer variables (Keras 3 keeps them under optimizer/vars in its weights)."""
    import h5py

    with zipfile.ZipFile(model_file) as archive, archive.open(WEIGHTS_FILE) as weights:
        with h5py.File(weights, "r") as store:
            group = store.get(f"{OPTIMIZER_GROUP}/vars")
            return group is not None and len(group) > 0


def _folder_bytes(filesystem: pyarrow.fs.FileSystem, folder: str) -> int:
    infos = filesystem.get_file_info(pyarrow.fs.FileSelector(folder, recursive=True))
    return sum(info.size or 0 for info in infos if info.type == pyarrow.fs.FileType.File)
