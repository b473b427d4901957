"""What the driver says when a stage's task fails: one line naming the stage, never Ray's wrapper, process ids or
colour codes (the whole-CLI case is in test_hostile_startup.py; these are the kinds of failure Ray hands back)."""

import errno

import pytest
import ray

from pipeline.task_failures import task_failure
from stages.common.errors import DataError, PipelineError, StorageError


def task_error(cause: BaseException, function: str = "evaluate_task") -> ray.exceptions.RayTaskError:
    """The error ray.get raises for a task that raised `cause` (its text holds the worker's traceback)."""
    traceback = f"\x1b[36mray::{function}()\x1b[39m (pid=4242, ip=10.0.0.1)\nTraceback (most recent call last):\n..."
    return ray.exceptions.RayTaskError(function, traceback, cause)


@pytest.mark.parametrize(
    "error, kind, line",
    [
        (task_error(DataError("dataset.npz: bad header")), DataError, "dataset.npz: bad header"),
        (task_error(OSError(errno.ENOSPC, "No space left on device", "/runs/r/metrics.json")), StorageError,
         "stage evaluate: the disk is full (writing /runs/r/metrics.json); free space"),
        (task_error(PermissionError(errno.EACCES, "Permission denied", "/runs/r")), StorageError,
         "stage evaluate: cannot write /runs/r: Permission denied; check the folder's permissions"),
        (task_error(MemoryError()), PipelineError, "stage evaluate: its process ran out of memory"),
        (ray.exceptions.OutOfMemoryError("Task was killed due to the node running low on memory.\nMemory..."),
         PipelineError, "stage evaluate: its process ran out of memory"),
        (ray.exceptions.WorkerCrashedError(), PipelineError, "stage evaluate: The worker died unexpectedly"),
        (task_error(ValueError("shapes (3,) and (4,) not aligned\nmore")), PipelineError,
         "stage evaluate failed: ValueError: shapes (3,) and (4,) not aligned (traceback in pipeline.log"),
    ],
)
def test_a_failed_task_is_one_line_naming_its_stage(error, kind, line):
    failure = task_failure("evaluate", error)
    assert isinstance(failure, kind)
    text = str(failure)
    assert text.startswith(line) or line in text, text
    assert "\n" not in text and "\x1b" not in text and "pid=" not in text and "RayTaskError" not in text


def test_credentials_in_a_failing_path_are_masked():
    error = task_error(OSError(errno.EIO, "Input/output error", "s3://bucket/runs?secret_key=hunter2"))
    assert "hunter2" not in str(task_failure("train", error))


def test_every_setting_a_failure_names_exists():
    """The hints name settings to change: each must be one a config can set."""
    import re

    from pipeline.config import Config, dotted, to_plain

    settings = set(dotted(to_plain(Config())))
    errors = [task_error(MemoryError()), ray.exceptions.OutOfMemoryError("low on memory"),
              task_error(OSError(errno.ENOSPC, "No space left on device", "/runs/r/metrics.json")),
              task_error(PermissionError(errno.EACCES, "Permission denied", "/runs/r")),
              ray.exceptions.WorkerCrashedError()]
    setting = re.compile(r"\b(?:data|model|train|evaluate|run|ray)\.[a-z_]+")
    named = {name for error in errors for name in setting.findall(str(task_failure("train", error)))}
    assert "model.batch_size" in named and named <= settings, sorted(named - settings)
