"""The dataset a run trained and tested on, found as the run does: through its data/manifest.json."""

import json
import os
from pathlib import Path


def dataset_file(run: Path) -> Path:
    """The dataset.npz that `run`'s manifest references (the run folder keeps no copy of its own): an absolute
    folder, or one relative to data/ (on a shared run root: ../../.datasets/<fingerprint>)."""
    data = run / "data"
    folder = json.loads((data / "manifest.json").read_text())["dataset_folder"]
    return Path(os.path.normpath(data / folder)) / "dataset.npz"
