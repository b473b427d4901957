"""How a Tune experiment searches, built from TrainSettings: the searcher that suggests each trial's hyperparameters,
the scheduler that stops, pauses or perturbs trials, and the stopper that ends the whole search early.

Seeds: the random searcher samples from `seed`; Optuna's TPE sampler, HyperOpt and BOHB's ConfigSpace are seeded
with it; BOHB's model (hpbandster) and PBT's perturbations draw from NumPy's and Python's global generators, which
`seed_driver` seeds in the process running Tune. ASHA, HyperBand and FIFO draw nothing.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from ray import tune
from ray.tune.schedulers import (
    ASHAScheduler,
    FIFOScheduler,
    HyperBandForBOHB,
    HyperBandScheduler,
    PopulationBasedTraining,
    TrialScheduler,
)
from ray.tune.search import ConcurrencyLimiter, SearchAlgorithm, Searcher
from ray.tune.search.basic_variant import BasicVariantGenerator

from stages.common import storage
from stages.evaluation.metrics import TrialSummary
from stages.training.hyperparameters import Hyperparameters
from stages.training.train_settings import Distribution, TrainSettings
from stages.training.tune_results import METRIC

log = logging.getLogger(__name__)

# Schedulers count epochs, which every result reports and which go on from a checkpoint's epoch when a trial resumes
# (after a pause, a PBT exploit, a retry); Tune's training_iteration counts the trial's reports instead.
TIME_ATTR = "epoch"
STOP_REASON_FILE = "stop_reason.json"  # in the experiment folder: why the search ended early, for a later resume
MAX_REASON = 500  # characters of a stop reason read back
# Tune registers the checkpoint a trial reports in a second exchange with the trial, after the result; ending the
# search in between loses it (Tune drops the exchange). A search ends once no result came for this long.
QUIET_S = 1.0


def seed_driver(seed: int) -> None:
    """Seeds the global generators that Tune's PBT (Python's `random`, and NumPy's when it resamples) and BOHB's
    model (NumPy's) draw from, in the process that runs Tune's loop. Trials run in their own processes."""
    random.seed(seed)
    np.random.seed(seed)


def make_searcher(
    settings: TrainSettings, base: Hyperparameters, seed: int, earlier: Sequence[EarlierTrial] = ()
) -> SearchAlgorithm | Searcher:
    """The searcher, limited to settings.max_concurrent_trials trials at once when that is set.

    The base trial (settings.include_base_trial) is the searcher's first point: the whole `model` section for the
    random searcher; for the model-based ones, the base's values of the searched hyperparameters (the others are the
    same constants in every trial).

    `earlier` (train.warm_start: earlier runs' trials) seeds the search: the random searcher tries the best of them
    first, after the base trial (as many as the search has finalists, or a third of its trials); Optuna takes every
    one of them within the search space as evaluated already (its TPE model starts from their results) instead of
    the base trial.
    """
    limit = settings.max_concurrent_trials
    searched = list(settings.search_space)
    if settings.searcher == "random":
        points = [base.model_dump()] if settings.include_base_trial else []
        best_first = sorted(earlier, key=lambda trial: -trial.val_accuracy)
        for trial in best_first[: max(1, min(settings.finalists, settings.trial_count // 3))]:
            point = {**base.model_dump(), **{name: trial.hyperparameters[name] for name in searched
                                            if name in trial.hyperparameters}}
            if point not in points:
                points.append(point)
        # the limit goes to the generator itself: Tune ignores TuneConfig.max_concurrent_trials (with a warning) once
        # a search algorithm is passed
        return BasicVariantGenerator(
            points_to_evaluate=points or None,
            max_concurrent=limit or 0,
            random_state=seed,
        )
    points = [{name: getattr(base, name) for name in settings.search_space}] if settings.include_base_trial else None
    searcher: Searcher
    if settings.searcher == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        known = [trial for trial in earlier if _within(trial.hyperparameters, settings.search_space)]
        if known:  # TPE, seeded, its model starting from the earlier results (they are not trained again)
            searcher = OptunaSearch(
                points_to_evaluate=[{name: trial.hyperparameters[name] for name in searched} for trial in known],
                # the rewards at the first rung, like those of the new search's trials stopped there (most of them)
                evaluated_rewards=[trial.first_rung_accuracy for trial in known],
                seed=seed,
            )
        else:
            searcher = OptunaSearch(points_to_evaluate=points, seed=seed)  # TPE, seeded
    elif settings.searcher == "hyperopt":
        from ray.tune.search.hyperopt import HyperOptSearch

        searcher = HyperOptSearch(points_to_evaluate=points, random_state_seed=seed)
    else:
        from stages.training.bohb_search import BOHBSearch  # imports ConfigSpace and hpbandster: seconds

        searcher = BOHBSearch(points_to_evaluate=points, seed=seed)
    # BOHB takes the limit itself (ConcurrencyLimiter hands it over): it counts running trials only, so that trials
    # HyperBand paused at a rung do not keep the others of their bracket from starting
    return ConcurrencyLimiter(searcher, max_concurrent=limit) if limit else searcher


@dataclass(frozen=True)
class EarlierTrial:
    """A trial of an earlier run (train.warm_start): its hyperparameters, its best validation accuracy, and its
    validation accuracy at the epoch every trial of its run reached (the first rung), where trials compare alike."""

    hyperparameters: dict[str, Any]
    val_accuracy: float
    first_rung_accuracy: float


def earlier_trials_from(trials: Sequence[TrialSummary]) -> list[EarlierTrial]:
    """The trials of a search (a run's metrics, or the rounds of this one) that finished with a validation accuracy,
    as EarlierTrials: their first-rung accuracy is at the epoch all of them reached."""
    finished = [trial for trial in trials
                if trial.status == "TERMINATED" and trial.best_val_accuracy is not None and trial.val_accuracy_by_epoch]
    if not finished:
        return []
    epoch = min(len(trial.val_accuracy_by_epoch) for trial in finished)
    return [EarlierTrial(dict(trial.hyperparameters), float(trial.best_val_accuracy),
                         float(trial.val_accuracy_by_epoch[epoch - 1])) for trial in finished]


def _within(hyperparameters: dict[str, Any], space: dict[str, Distribution]) -> bool:
    """Whether every searched hyperparameter has a value the search space could have given it."""
    for name, spec in space.items():
        value = hyperparameters.get(name)
        if value is None:
            return False
        if spec.kind in ("choice", "grid"):
            if not any(type(value) is type(choice) and value == choice for choice in spec.args):
                return False
        elif spec.kind == "randint":
            if not (type(value) is int and spec.args[0] <= value < spec.args[1]):
                return False
        elif not (isinstance(value, (int, float)) and spec.args[0] <= value <= spec.args[1]):
            return False
    return True


def make_scheduler(settings: TrainSettings, *, slots: int = 1, say=log.info) -> TrialScheduler:
    """The trial scheduler: its grace period, reduction factor and interval count epochs. `slots`: the trials that can
    run at once (halving plans its last rung with it); `say`: where halving tells its decisions."""
    epochs = settings.epochs
    if settings.scheduler == "halving":
        from stages.training.halving import SuccessiveHalving

        return SuccessiveHalving(
            plan=settings.halving_plan(), max_epochs=epochs, slots=slots, time_budget_s=settings.time_budget_s,
            say=say,
        )
    if settings.scheduler == "fifo":
        return FIFOScheduler()
    if settings.scheduler == "asha":
        return ASHAScheduler(
            time_attr=TIME_ATTR,
            max_t=epochs,
            grace_period=min(settings.grace_period, epochs),
            reduction_factor=settings.reduction_factor,
        )
    if settings.scheduler == "hyperband":  # synchronous: a rung is decided once every trial of its bracket reached it
        return HyperBandScheduler(time_attr=TIME_ATTR, max_t=epochs, reduction_factor=settings.reduction_factor)
    if settings.scheduler == "bohb":
        return HyperBandForBOHB(time_attr=TIME_ATTR, max_t=epochs, reduction_factor=settings.reduction_factor)
    space = {name: spec for name, spec in settings.search_space.items() if spec.is_mutable()}
    return PopulationBasedTraining(
        time_attr=TIME_ATTR,
        perturbation_interval=settings.pbt_interval,
        hyperparam_mutations={name: _mutation(spec) for name, spec in space.items()},
        custom_explore_fn=KeepInSpace(space),
        # synchronous: every trial reaches the interval before the weakest copy the strongest, so which trials
        # exploit which depends on their results only, not on which reported first
        synch=True,
    )


def _mutation(spec: Distribution) -> Any:
    """What PBT perturbs a hyperparameter within: the values of a choice or grid (a perturbation moves to a
    neighbour), or the distribution (a perturbation multiplies by 0.8 or 1.2, a resample draws anew)."""
    return list(spec.args) if spec.kind in ("choice", "grid") else spec.to_tune()


class KeepInSpace:
    """PBT's custom_explore_fn: a value that a perturbation took out of its search_space range (x1.2 at the upper
    bound, say) goes back to the bound, so every trial's hyperparameters stay in the space (which was checked against
    what Hyperparameters accepts). A class rather than a closure: Tune pickles it with the experiment."""

    def __init__(self, space: dict[str, Distribution]) -> None:
        self.bounds: dict[str, tuple[Any, Any]] = {}
        for name, spec in space.items():
            if spec.kind == "randint":
                self.bounds[name] = (spec.args[0], spec.args[1] - 1)
            elif spec.kind in ("uniform", "loguniform"):
                self.bounds[name] = (float(spec.args[0]), float(spec.args[1]))

    def __call__(self, config: dict) -> dict:
        for name, (low, high) in self.bounds.items():
            if name in config:
                config[name] = min(max(config[name], low), high)
        return config


class EpochsDone(tune.Stopper):
    """Ends each trial at its last epoch, as its own loop does, but in the driver: PBT would otherwise exploit a
    trial that just finished (its last epoch a multiple of pbt_interval), restart it from another trial's final
    checkpoint with nothing left to train, and leave it with a config its results do not belong to."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def __call__(self, trial_id: str, result: dict) -> bool:
        return result.get("epoch", 0) >= self.epochs

    def stop_all(self) -> bool:
        return False


class SearchStopper(tune.Stopper, tune.Callback):
    """Ends the whole search when a trial reports val_accuracy at or above the target, or when the time budget is
    spent (counted from the search's start in this attempt). Why it stopped is kept here, and written to
    `reason_file` for whoever reads the experiment later.

    From then on, a trial that reports is stopped there, its checkpoint kept (the one that reached the target first
    of all). Once Tune has registered that checkpoint (this is also the experiment's callback: on_checkpoint), or
    once no result has come for QUIET_S, Tune stops every trial still running or waiting (their checkpoints so far
    stay) and asks the searcher for no more: on a fast machine a trial's epoch takes less than QUIET_S, and waiting
    for quiet let trials that started after the target train an epoch.

    Tune saves the stopper with the experiment's state and a restored experiment uses that copy: a search that ended
    stays ended, and a restored budget starts counting anew.
    """

    def __init__(self, *, target_val_accuracy: float | None, time_budget_s: float | None, reason_file: str) -> None:
        self.target_val_accuracy = target_val_accuracy
        self.time_budget_s = time_budget_s
        self.reason_file = reason_file
        self.reason: str | None = None
        self._started: float | None = None
        self._last_result: float | None = None
        self._reaching_trial: str | None = None  # whose result reached the target, until its checkpoint is Tune's
        self._checkpoint_kept = False

    def __call__(self, trial_id: str, result: dict) -> bool:
        self._last_result = time.monotonic()
        if self.reason is None and self.target_val_accuracy is not None:
            reached = result.get(METRIC)
            if isinstance(reached, (int, float)) and reached >= self.target_val_accuracy:
                self._reaching_trial = trial_id
                self._stop(f"target {METRIC} {self.target_val_accuracy:g} reached by trial {trial_id} at epoch "
                           f"{result.get('epoch')} ({METRIC} {reached:.4f})")
        return self.reason is not None

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info) -> None:
        if self._reaching_trial is not None and trial.trial_id == self._reaching_trial:
            self._checkpoint_kept = True  # registered with the result that reached the target

    def stop_all(self) -> bool:
        now = time.monotonic()
        if self._started is None:  # Tune's loop asks before its first step: the search starts now
            self._started = now
        if self.reason is None and self.time_budget_s is not None and now - self._started >= self.time_budget_s:
            self._stop(f"time budget of {self.time_budget_s:g} s spent")
        return self.reason is not None and (
            self._checkpoint_kept or self._last_result is None or now - self._last_result >= QUIET_S
        )

    def _stop(self, reason: str) -> None:
        self.reason = reason
        log.warning("train: ending the search: %s", reason)
        try:
            storage.write_json(self.reason_file, {"reason": reason})
        except Exception as error:  # the search still ends; only a later resume would not know why
            log.warning("train: cannot record why the search ended in %s: %s", self.reason_file, error)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._started = self._last_result = None  # monotonic times of another process


def read_stop_reason(experiment_path: str) -> str | None:
    """Why the experiment's search ended early, as SearchStopper recorded it; None when it did not (or it cannot be
    read: the reason is for people, nothing depends on it)."""
    location = storage.join(experiment_path, STOP_REASON_FILE)
    try:
        if not storage.exists(location):
            return None
        reason = json.loads(storage.read_bytes(location))["reason"]
    except Exception as error:
        log.warning("train: cannot read why the search ended from %s: %s", location, error)
        return None
    return reason[:MAX_REASON] if isinstance(reason, str) else None
