"""Where artifacts live: a local folder, or a URI (s3://, gs://, ...) through pyarrow's filesystems, as Tune does.

A location is a string. Local paths are written atomically (temporary name, then rename); object stores are
written through pyarrow output streams, which make an object appear only once it is complete.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from stages.common.atomic import atomic_file
from stages.common.errors import StorageError
from stages.common.redact import redact


def is_uri(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


def join(location: str, *parts: str) -> str:
    """`location`/`parts`; a URI's query (e.g. ?endpoint_override=...) stays at the end."""
    if not is_uri(location):
        return str(Path(location, *parts))
    base, question, query = location.partition("?")
    return "/".join([base.rstrip("/"), *parts]) + question + query


def name_of(location: str) -> str:
    return location.partition("?")[0].rstrip("/").rsplit("/", 1)[-1]


def parent_of(location: str) -> str:
    """The folder holding `location`; a URI keeps its query."""
    if not is_uri(location):
        return str(Path(location).parent)
    base, question, query = location.partition("?")
    return base.rstrip("/").rsplit("/", 1)[0] + question + query


def _filesystem(location: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(location)


def exists(location: str) -> bool:
    if not is_uri(location):
        return Path(location).exists()
    import pyarrow.fs

    filesystem, path = _filesystem(location)
    return filesystem.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def write_bytes(location: str, data: bytes) -> None:
    """Writes a whole file; a reader sees the old content or the new, never a part."""
    if is_uri(location):
        filesystem, path = _filesystem(location)
        try:
            with filesystem.open_output_stream(path) as out:
                out.write(data)
        except OSError as error:
            raise StorageError(f"cannot write {redact(location)}: {error}") from error
        return
    with atomic_file(Path(location)) as out:
        out.write(data)


def write_json(location: str, data: object) -> None:
    write_bytes(location, (json.dumps(data, indent=2) + "\n").encode())


def read_bytes(location: str) -> bytes:
    if is_uri(location):
        filesystem, path = _filesystem(location)
        with filesystem.open_input_stream(path) as source:
            return source.read()
    return Path(location).read_bytes()


@contextmanager
def local_folder_for(location: str) -> Iterator[Path]:
    """A local folder whose files end up in `location`: the folder itself when local, else uploaded at the end."""
    if not is_uri(location):
        Path(location).mkdir(parents=True, exist_ok=True)
        yield Path(location)
        return
    import pyarrow.fs

    staging = Path(tempfile.mkdtemp(prefix="mnist-pipeline-upload-"))
    try:
        yield staging
        filesystem, path = _filesystem(location)
        pyarrow.fs.copy_files(str(staging), path, destination_filesystem=filesystem)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def local_copy(location: str) -> Iterator[Path]:
    """A local path holding the file at `location`: the file itself when local, else a temporary download."""
    if not is_uri(location):
        yield Path(location)
        return
    with tempfile.TemporaryDirectory(prefix="mnist-pipeline-") as folder:
        copy = Path(folder, name_of(location))
        copy.write_bytes(read_bytes(location))
        yield copy
