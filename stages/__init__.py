"""The four stages, one module each, as plain functions with typed inputs and outputs:

    download.py     MNIST from mirrors, verified              stages.download.download
    preprocess.py   IDX parsed, validated, split              stages.preprocess.preprocess
    train.py        the Ray Tune search over the CNN          stages.train.train
    evaluate.py     the best checkpoint on the test set       stages.evaluate.evaluate

Their parts are in the subpackages: dataset/ (the IDX format, one bounded attempt at one mirror, the per-node cache),
training/ (the model, one trial, the search's settings and algorithms, Tune's results), evaluation/ (the run's
metrics, the top-k ensemble, the report), and common/ (errors, atomic writes, local and object-store paths,
redaction), which the pipeline uses too.

Nothing here starts Ray or reads the config file; `pipeline/` does, and hands each stage its own settings.
"""

import importlib
import importlib.abc
import importlib.util
import sys

# Where each part lived before it moved into a subpackage. Tune restores an experiment by unpickling it, and a pickle
# names classes and functions by module: a run started before the move (stages.trial.run_trial, ...) must resume.
_MOVED = {
    **dict.fromkeys(("atomic", "errors", "redact", "storage", "code_hash"), "common"),
    **dict.fromkeys(("idx", "mirror_attempt", "dataset_cache"), "dataset"),
    **dict.fromkeys(("hyperparameters", "model", "trial", "train_settings", "search_algorithms", "bohb_search",
                     "finished_checkpoints", "tune_results", "progress", "preload", "trial_logs"), "training"),
    **dict.fromkeys(("ensemble", "report"), "evaluation"),
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports `stages.<old name>` as the module it moved to (the same module object, under both names)."""

    def __init__(self) -> None:
        self._specs = {}  # old name -> the moved module's own spec, which the import system overwrites

    def find_spec(self, name, path=None, target=None):
        package, _, module = name.rpartition(".")
        return importlib.util.spec_from_loader(name, self) if package == __name__ and module in _MOVED else None

    def create_module(self, spec):
        name = spec.name.rpartition(".")[2]
        module = importlib.import_module(f"{__name__}.{_MOVED[name]}.{name}")
        self._specs[spec.name] = module.__spec__
        return module

    def exec_module(self, module) -> None:  # imported already, by create_module: only its spec is put back
        module.__spec__ = self._specs.pop(module.__spec__.name)


if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModules())
