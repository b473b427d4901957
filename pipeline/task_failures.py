"""A stage task that failed, said in one line like the driver's own errors: what failed, on which file, what to do.

Ray hands the driver a task's failure as a RayTaskError whose text holds the worker's traceback, its process id and
colour codes; a worker that died (killed, out of memory) arrives as another RayError. The traceback stays in the
run's pipeline.log (and in the error's cause, shown with --debug); the console gets the line made here.
"""

from __future__ import annotations

import errno

import ray

from stages.common.errors import PipelineError, StorageError
from stages.common.redact import redact

_WRITE_REFUSED = (errno.EACCES, errno.EPERM, errno.EROFS)
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def task_failure(stage: str, error: BaseException) -> BaseException:
    """The error to raise on the driver for a failure of `stage`'s task: a PipelineError (one line) for what a user
    can act on, the error itself for what is not a failure of the task (a stop, say)."""
    cause = error.cause if isinstance(error, ray.exceptions.RayTaskError) else error
    if isinstance(cause, (PipelineError, KeyboardInterrupt)):
        return cause
    if isinstance(error, ray.exceptions.OutOfMemoryError) or isinstance(cause, MemoryError):
        return PipelineError(
            f"stage {stage}: its process ran out of memory; give Ray's nodes more memory or ask for less "
            "(smaller model.batch_size, evaluate.batch_size or data.max_train_images); `run --resume` continues"
        )
    if isinstance(cause, OSError):
        return _os_failure(stage, cause)
    if isinstance(error, ray.exceptions.RayError) and not isinstance(error, ray.exceptions.RayTaskError):
        # a worker or node that died, an object lost with its node: Ray's own one-line description comes first
        return PipelineError(
            f"stage {stage}: {first_line(error)} (details in pipeline.log); `run --resume` continues the run"
        )
    return PipelineError(
        f"stage {stage} failed: {type(cause).__name__}: {first_line(cause)} "
        "(traceback in pipeline.log; rerun with --debug to see it here)"
    )


def _os_failure(stage: str, error: OSError) -> PipelineError:
    where = redact(str(error.filename)) if error.filename else None
    if error.errno in _DISK_FULL:
        return StorageError(f"stage {stage}: the disk is full{f' (writing {where})' if where else ''}; free space "
                            "or move run.root / data.cache_dir, then `run --resume`")
    if error.errno in _WRITE_REFUSED:
        return StorageError(f"stage {stage}: cannot write {where or 'a file'}: {error.strerror}; check the folder's "
                            "permissions, or point run.root / data.cache_dir elsewhere")
    reason = error.strerror or first_line(error) or type(error).__name__
    return StorageError(f"stage {stage}: {reason}{f': {where}' if where else ''}")


def first_line(error: BaseException) -> str:
    """The first line of an error's text, credentials masked and clipped: what a one-line message may quote."""
    text = redact(str(error)).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__
