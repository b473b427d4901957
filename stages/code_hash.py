"""The version of a piece of code that matters for caching: the bytes of the modules that implement it."""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path


def code_hash(*module_names: str) -> str:
    """sha256 over the source files of the named modules (read from disk: `inspect.getsource` fails for modules
    that Ray's runtime environments unpack)."""
    digest = hashlib.sha256()
    for name in module_names:
        digest.update(name.encode() + b"\0" + Path(importlib.import_module(name).__file__).read_bytes())
    return digest.hexdigest()
