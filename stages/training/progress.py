"""How far the search is: one line per trial epoch and one per trial that ends, with an ETA.

The lines are printed by the train task; Ray brings them to the driver's console, where pipeline.console shows them
as they are (no terminal) or folds the epoch lines into one live line (a terminal). Their shape is fixed:

    [search] <trial> epoch <e>/<epochs>: val_accuracy <acc> | trials <n> done, <n> running[, <n> paused], <n> pending
        | epochs <trained>/<budget> | best <acc> (<trial>) | ETA <time>          (one line)
    [search] trial <trial> finished|stopped early|failed ...

The ETA divides the epochs still to train (the budget less what trials trained, and less what the scheduler took
from the trials it stopped) by the rate at which this attempt trained epochs so far: it gets better as the run goes.
"""

from __future__ import annotations

import re
import time

from ray.tune import Callback

from stages.training.train_settings import RUNGS_KEY
from stages.training.tune_results import METRIC

PREFIX = "[search] "
EPOCH_LINE = re.compile(
    r"\[search\] (?P<trial>\S+) epoch (?P<epoch>\d+)/(?P<epochs>\d+): (?P<metric>.*?) \| (?P<status>.*?)"
    r"(?: \| ETA (?P<eta>\S+))?"
)


class SearchProgress(Callback):
    """A Tune callback that prints the search's progress (see the module's docstring)."""

    def __init__(self, trials: int, epochs: int, printer=print, *, time_budget_s: float | None = None,
                 halving_rungs: int = 0) -> None:
        self._trials, self._epochs, self._print = trials, epochs, printer
        self._halving_rungs = halving_rungs  # successive halving's rungs before the last: a trial may stop at each
        self._time_budget_s = time_budget_s  # the ETA never runs past what is left of it
        self._started: float | None = None
        self._trained_here = 0  # epochs reported in this attempt (a restored experiment had others before)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_print": None}  # Tune pickles its callbacks with the experiment

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update({"_halving_rungs": 0, **state}, _print=print)

    def setup(self, **info) -> None:
        self._started, self._trained_here = time.monotonic(), 0

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if self._started is None:
            self.setup()
        self._trained_here += 1
        epoch = int(result.get("training_iteration", 0))
        self._print(
            f"{PREFIX}{trial.trial_id} epoch {epoch}/{self._planned(trial)}: {METRIC} {_metric(result.get(METRIC))} | "
            f"{self.status(trials, reporting=(trial, result))}",
            flush=True,
        )

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        epochs = _epochs_of(trial)
        best = _best(trial)
        planned, rungs = self._planned(trial), (getattr(trial, "config", None) or {}).get(RUNGS_KEY) or []
        if 0 < len(rungs) <= self._halving_rungs and planned < self._epochs and epochs >= planned:
            # successive halving did not promote it further
            how = (f"stopped at the first rung (epoch {epochs})" if len(rungs) == 1
                   else f"stopped at rung {len(rungs)} (epoch {epochs})")
        else:
            how = "finished" if epochs >= planned else f"stopped early after epoch {epochs}"
        self._print(f"{PREFIX}trial {trial.trial_id} {how}: best {METRIC} {_metric(best)}{_searched(trial)}",
                    flush=True)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._print(f"{PREFIX}trial {trial.trial_id} failed after epoch {_epochs_of(trial)} (its error is in "
                    f"pipeline.log){_searched(trial)}", flush=True)

    def status(self, trials, reporting=None) -> str:
        """trials done/running/pending, epochs trained of the budget, the best so far and the ETA. `reporting`: the
        (trial, result) being reported, which Tune has not added to the trial yet."""
        counts = {"done": 0, "running": 0, "paused": 0, "pending": 0}
        trained, budget = 0, 0
        scored = []
        for trial in trials:
            epochs, best = _epochs_of(trial), _best(trial)
            if reporting is not None and trial is reporting[0]:
                result = reporting[1]
                epochs = max(epochs, int(result.get("training_iteration", 0) or 0))
                if isinstance(result.get(METRIC), (int, float)):
                    best = max(best if best is not None else result[METRIC], result[METRIC])
            if best is not None:
                scored.append((best, trial.trial_id))
            trained += epochs
            if trial.status in ("TERMINATED", "ERROR"):
                counts["done"] += 1
                budget += epochs  # a stopped trial's remaining epochs leave the budget
            else:
                counts[{"RUNNING": "running", "PAUSED": "paused"}.get(trial.status, "pending")] += 1
                budget += max(self._planned(trial), epochs)
        unseen = max(0, self._trials - len(trials))  # a searcher suggests its trials one by one
        counts["pending"] += unseen
        budget += unseen * self._epochs
        best = max(scored, default=None)
        paused = f"{counts['paused']} paused, " if counts["paused"] else ""  # waiting at a rung (halving, hyperband)
        parts = [
            f"trials {counts['done']} done, {counts['running']} running, {paused}{counts['pending']} pending",
            f"epochs {trained}/{budget}",
            f"best {_metric(best[0])} ({best[1]})" if best else "best -",
        ]
        eta = self._eta(budget - trained)
        return " | ".join(parts) + (f" | ETA {format_seconds(eta)}" if eta is not None else "")

    def _planned(self, trial) -> int:
        """The epochs a trial is to train: its current rung's end with successive halving (a replay's last cycle may
        end after train.epochs, where it stops), else train.epochs."""
        rungs = (getattr(trial, "config", None) or {}).get(RUNGS_KEY)
        return min(int(rungs[-1]), self._epochs) if rungs else self._epochs

    def _eta(self, epochs_left: int) -> float | None:
        if self._started is None or not self._trained_here:
            return None
        elapsed = max(time.monotonic() - self._started, 1e-6)
        rate = self._trained_here / elapsed  # epochs per second, all slots
        if self._time_budget_s is None:
            return epochs_left / rate
        return max(0.0, min(epochs_left / rate, self._time_budget_s - elapsed))


def format_seconds(seconds: float) -> str:
    """12s, 3m05s, 1h02m."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def parse_seconds(text: str) -> float | None:
    """The inverse of format_seconds; None for anything else."""
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text or "")
    if not match or not any(match.groups()):
        return None
    hours, minutes, seconds = (int(group or 0) for group in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def _epochs_of(trial) -> int:
    return int((trial.last_result or {}).get("training_iteration", 0) or 0)


def _best(trial) -> float | None:
    try:
        value = trial.metric_analysis[METRIC]["max"]
    except (KeyError, TypeError, AttributeError):
        value = (trial.last_result or {}).get(METRIC)
    return float(value) if isinstance(value, (int, float)) else None


def _metric(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def _searched(trial) -> str:
    """The trial's sampled hyperparameters, as Tune names its folders: short, for the one line."""
    tag = getattr(trial, "experiment_tag", "") or ""
    _, _, values = tag.partition("_")
    return f" ({values.replace(',', ', ')})" if values else ""
