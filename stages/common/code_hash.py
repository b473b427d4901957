"""The version of a piece of code that matters for caching: the bytes of the modules that implement it."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import pkgutil
from pathlib import Path

log = logging.getLogger(__name__)


def code_hash(*module_names: str) -> str:
    """sha256 over the source of the named modules; a package stands for every module in it, so that a module added
    to it later counts without anyone listing it.

    The source is read from the module's file, else from its loader; where neither has it (seen in Ray Jobs, whose
    working-dir packages can vanish from under a running driver), the installed package version stands in.
    """
    digest = hashlib.sha256()
    for name in module_names:
        for module in modules_of(name):
            digest.update(module.encode() + b"\0" + _source_of(module))
    return digest.hexdigest()


def modules_of(name: str) -> list[str]:
    """The module `name`, or for a package, the package and every module inside it (subpackages too), sorted."""
    spec = importlib.util.find_spec(name)
    locations = spec.submodule_search_locations if spec is not None else None
    if not locations:
        return [name]
    inside = [f"{name}.{module.name}" for module in pkgutil.iter_modules(locations)]
    return [name, *sorted(module for child in inside for module in modules_of(child))]


def _source_of(name: str) -> bytes:
    """The module's source, found without importing it (importing stages.training.model would load TensorFlow)."""
    spec = importlib.util.find_spec(name)
    try:
        return Path(spec.origin).read_bytes()
    except (AttributeError, OSError, TypeError):
        pass
    try:
        source = spec.loader.get_source(name)
        if source is not None:
            return source.encode()
    except (AttributeError, ImportError, OSError):
        pass
    try:
        version = importlib.metadata.version("mnist-pipeline")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    log.debug("no source for %s; using the package version %s as its code version", name, version)
    return f"version {version}".encode()
