"""Loads what evaluation needs while the search's last trials run, on a core the search leaves idle.

The evaluate task usually runs in the Ray worker that ran the train task (Ray hands an idle worker of the job to the
next task), and its first seconds go to importing TensorFlow (~4-6 s) and matplotlib (~1 s). Imported by the train
task once no trial waits for a slot, they cost nothing: a slot is idle from then on. Where the evaluate task lands in
another worker or on another node, the import was a few wasted CPU-seconds on the train task's node.
"""

from __future__ import annotations

import importlib
import logging
import threading

from ray.tune import Callback

log = logging.getLogger(__name__)

MODULES = ("tensorflow", "matplotlib.pyplot")  # what stages.evaluate and stages.evaluation.report import first
_thread: threading.Thread | None = None  # the import in this process, once begun


class PreloadForEvaluation(Callback):
    """A Tune callback: once a trial ends and no other waits to start, imports MODULES on a daemon thread (once)."""

    def __init__(self) -> None:
        self._started = False

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._maybe_start(trials)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._maybe_start(trials)

    def _maybe_start(self, trials) -> None:
        if self._started or any(other.status == "PENDING" for other in trials):
            return
        self._started = True
        global _thread
        _thread = threading.Thread(target=_import_modules, name="preload-for-evaluation", daemon=True)
        _thread.start()


def preloading() -> threading.Thread | None:
    """The thread importing MODULES in this process; None until a callback started it."""
    return _thread


def _import_modules() -> None:
    import matplotlib

    matplotlib.use("Agg")  # as stages.evaluation.report does: no display, and set before pyplot is imported
    for name in MODULES:
        try:
            importlib.import_module(name)
        except Exception as error:  # noqa: BLE001 - the evaluate task imports it again and says what is wrong
            log.debug("preloading %s failed: %s", name, error)
