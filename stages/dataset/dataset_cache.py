"""Reusing a verified dataset: a run whose source files, split settings and preprocessing code are those of an
earlier run takes that run's split instead of computing it again.

Cached splits live in <cache_dir>/datasets/<fingerprint>/ beside the downloads, written like any run's data/ folder
(dataset first, manifest last with the dataset's sha256), and are used only if the checksum still matches.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from stages import preprocess
from stages.common.code_hash import code_hash
from stages.dataset import idx
from stages.download import RawData

log = logging.getLogger(__name__)


def fingerprint(raw: RawData, **settings) -> str:
    """Identifies a split: the source files' checksums, the split settings, and the code that computes it."""
    identity = {"sources": raw.sha256, "settings": settings, "code": code_hash(preprocess.__name__, idx.__name__)}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def cached_folder(cache_dir: Path, key: str) -> Path:
    """Where the split with fingerprint `key` is cached under `cache_dir`."""
    return cache_dir / "datasets" / key


def cached_preprocess(raw: RawData, cache_dir: Path, **settings) -> tuple[preprocess.Splits, dict, bool]:
    """`preprocess.preprocess(raw, **settings)`, or the verified split an earlier run made with the same inputs.

    Returns:
      (splits, manifest, whether the split came from the cache).
    """
    key = fingerprint(raw, **settings)
    folder = cached_folder(cache_dir, key)
    cached = preprocess.load_verified_splits(str(folder))
    if cached is None or cached[1].get("fingerprint") != key:
        if (folder / "manifest.json").exists():
            log.warning("dataset: the cached split in %s does not verify; computing it again", folder)
        cached = None
    if cached is not None:
        log.info("dataset: reusing the verified split %s (same source files, split settings and code)", key[:12])
        return (*cached, True)
    splits = preprocess.preprocess(raw, **settings)
    info = {
        **preprocess.manifest(splits, raw, validation_size=settings["validation_size"], seed=settings["seed"]),
        "fingerprint": key,
    }
    return splits, preprocess.save_splits(splits, info, str(folder)), False
