"""Writing files so that a crash leaves either the old file or the complete new one, never half of one."""

from __future__ import annotations

import errno
import os
import re
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

from stages.common.errors import StorageError


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yields a temporary path beside `path` (same suffix, for writers that check it, like Keras).

    When the block finishes without error the temporary file is synced and renamed onto `path`; otherwise it
    is removed.
    """
    owner = f"{socket.gethostname()}.{os.getpid()}"  # lets a later run tell a crashed writer's leftovers apart
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp_name = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.stem}.{owner}.", suffix=f".part{path.suffix}"
        )
    except OSError as error:
        raise StorageError(f"cannot write {path}: {error.strerror or error}") from error
    os.close(handle)
    temp = Path(temp_name)
    try:
        yield temp
        with temp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(temp, path)
    except OSError as error:
        if error.errno not in _STORAGE_ERRORS:
            raise
        raise StorageError(f"cannot write {path}: {error.strerror}") from error
    finally:
        temp.unlink(missing_ok=True)


# Failures of the storage itself, as opposed to a writer's own bugs (a missing source file, say)
_STORAGE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG}


def sweep_stale_parts(folder: Path, *, recursive: bool = False) -> list[Path]:
    """Removes the temporary files of writers on this host that died before renaming them (kill -9, power loss),
    in `folder` (and the folders below it, if `recursive`).

    Files of live writers, and of writers on other hosts sharing the folder, are left alone. Returns what was removed.
    """
    host = socket.gethostname()
    removed = []
    for part in folder.glob("**/.*.part*" if recursive else ".*.part*"):
        match = re.match(rf"^\.(.+)\.{re.escape(host)}\.(\d+)\.[^.]+\.part", part.name)
        if match and not _alive(int(match.group(2))):
            part.unlink(missing_ok=True)
            removed.append(part)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """Like `atomic_path`, but yields the temporary file opened for binary writing."""
    with atomic_path(path) as temp, temp.open("wb") as f:
        yield f

