"""Writing files so that a crash leaves either the old file or the complete new one, never half of one."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yields a temporary path beside `path` (same suffix, for writers that check it, like Keras).

    When the block finishes without error the temporary file is synced and renamed onto `path`; otherwise it
    is removed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".part{path.suffix}")
    os.close(handle)
    temp = Path(temp_name)
    try:
        yield temp
        with temp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


@contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """Like `atomic_path`, but yields the temporary file opened for binary writing."""
    with atomic_path(path) as temp, temp.open("wb") as f:
        yield f


def write_text_atomically(path: Path, text: str) -> None:
    with atomic_file(path) as f:
        f.write(text.encode())


def write_json(path: Path, data: object) -> None:
    """Writes `data` as indented JSON, atomically."""
    write_text_atomically(path, json.dumps(data, indent=2) + "\n")
