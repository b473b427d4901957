"""train: a Ray Tune experiment over the CNN's hyperparameters, ranked by validation accuracy."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import signal
import threading
from contextlib import contextmanager
from typing import Any, Sequence

from ray import tune
from ray.tune.stopper import CombinedStopper

from stages.common import storage
from stages.common.errors import BadInputError, StorageError, TrainingError
from stages.preprocess import LabeledImages
from stages.training.finished_checkpoints import slim_finished_checkpoints
from stages.training.halving import MIN_RESERVE_S, RESERVE_FRACTION
from stages.training.hyperparameters import Hyperparameters
from stages.training.preload import PreloadForEvaluation
from stages.training.progress import PREFIX, SearchProgress, format_seconds
from stages.training.search_algorithms import (
    STOP_REASON_FILE,
    EarlierTrial,
    EpochsDone,
    SearchStopper,
    earlier_trials_from,
    make_scheduler,
    make_searcher,
    read_stop_reason,
    seed_driver,
)
from stages.training.search_rounds import merge_outcomes, plan_rounds, read_rounds, round_settings, write_rounds
from stages.training.train_settings import TrainSettings, base_trial_problem, unrepeatable_because
from stages.training.trial import run_trial
from stages.training.trial_logs import CsvLog, JsonLog
from stages.training.tune_results import METRIC, MODE, TuneOutcome, one_line, summarize

log = logging.getLogger(__name__)

EXPERIMENT_NAME = "tune"  # the experiment's folder under the storage path
# Seconds between snapshots of the experiment's state (trial statuses, latest checkpoints, scheduler and searcher)
# in the run folder; a restored experiment starts from the last one. With Tune's default (at least 10 s) a crash of
# the driver would re-run the last epochs of trials that had finished. Object stores get fewer: each snapshot
# uploads every trial's small result files.
SNAPSHOT_SECONDS_LOCAL, SNAPSHOT_SECONDS_REMOTE = 0.5, 2.0
FULL_DISK_BYTES = 64 * 2**20  # less free space than a few checkpoints of the classic CNN


def train(
    train_data: LabeledImages | Any,
    validation_data: LabeledImages | Any,
    *,
    base: Hyperparameters,
    settings: TrainSettings,
    storage_path: str,
    experiment_name: str = EXPERIMENT_NAME,
    seed: int = 0,
    resume: bool = False,
    callbacks: Sequence[tune.Callback] = (),
    earlier: Sequence[EarlierTrial] = (),
    continued_from_s: float | None = None,
) -> TuneOutcome:
    """Runs the Tune experiment and picks the best checkpoint of all trials by validation accuracy.

    The searcher, scheduler and stopper come from stages.training.search_algorithms. A search that cannot be repeated
    exactly from `seed` (stages.training.train_settings.unrepeatable_because) is said in a warning first. A search
    ended early by settings.target_val_accuracy or settings.time_budget_s ends like a finished one: trials still
    running are stopped, the best checkpoint so far wins, and the outcome's stop_reason says why.

    Args:
      train_data, validation_data: the splits, or Ray ObjectRefs to them (then they are not put into the object
        store again: every trial reads the same copy).
      base: hyperparameters of every trial before the search space overrides some of them.
      settings: the experiment (searcher, scheduler, trials, resources, search space, when to stop).
      storage_path: Tune's storage_path (absolute path or URI); the experiment goes to {storage_path}/{name}.
      experiment_name: the experiment's folder name.
      seed: seeds the searcher, the scheduler's draws and each trial's initialisation and shuffling.
      resume: continue the experiment found at {storage_path}/{name} with Tune's restore, if there is one:
        finished and failed trials stay as they are, unfinished ones continue from their latest checkpoints, and
        the searcher continues from the state Tune saved with the experiment (a model-based one knows the trials
        so far, and suggests new ones).
        An experiment found there without `resume` is restored too: run folders are never reused, so it can only
        be this run's, left by an earlier attempt of the same train task (Ray retries a task whose worker died).
      callbacks: more Tune callbacks (the pipeline's experiment tracking); a restored experiment keeps those it
        began with.
      earlier: earlier runs' trials that seed the searcher (train.warm_start; make_searcher says how).
      continued_from_s: the time budget this run's finished search had, when it is resumed with a larger one: the
        search goes on in a new round for the time added (stages.training.search_rounds), and so does a search
        continued before.

    SIGTERM (the pipeline's driver stopping, or the system stopping the process) ends Tune's loop the way Ctrl-C ends
    it in a plain Tune script: the experiment's state is written one last time and the trials are stopped; the
    experiment is then unfinished, continued by a resumed run.

    Returns:
      The best trial's checkpoint and a summary of every trial.

    Raises:
      BadInputError: the base trial cannot open this search (stages.training.train_settings.base_trial_problem), or
        the budget is smaller than the search's rounds so far had.
      TrainingError: no trial produced a checkpoint, or SIGTERM stopped the experiment before it finished.
      StorageError: the storage path's disk is full.
    """
    experiment = storage.join(storage_path, experiment_name)
    rounds = plan_rounds(experiment, experiment_name, settings.time_budget_s, continued_from_s)
    arguments = dict(train_data=train_data, validation_data=validation_data, base=base, callbacks=callbacks)
    if not rounds:
        return _train_experiment(settings=settings, storage_path=storage_path, experiment_name=experiment_name,
                                 seed=seed, resume=resume, earlier=earlier, **arguments)
    outcomes = []
    for index, search_round in enumerate(rounds):
        path = experiment if index == 0 else storage.join(experiment, search_round.experiment)
        if search_round.finished:
            outcomes.append(_load_experiment_outcome(path))
            continue
        before = sum(r.budget_s for r in rounds[:index])
        _say(f"round {index + 1} of the search: {format_seconds(search_round.budget_s)} more (the time budget grew "
             f"from {format_seconds(before)}); {sum(len(o.trials) for o in outcomes)} trials so far")
        own = earlier_trials_from([trial for outcome in outcomes for trial in outcome.trials])
        outcomes.append(_train_experiment(
            # new settings from seed + round (the base trial trained in round 1); a model-based searcher starts from
            # every trial so far, which the random searcher would only train again
            settings=round_settings(settings, search_round, rounds[0].budget_s),
            storage_path=experiment, experiment_name=search_round.experiment, seed=seed + index, resume=True,
            earlier=() if settings.searcher == "random" else [*earlier, *own], **arguments,
        ))
        rounds[index] = dataclasses.replace(search_round, finished=True)
        write_rounds(experiment, rounds)
    return merge_outcomes(outcomes)


def _train_experiment(
    train_data: LabeledImages | Any,
    validation_data: LabeledImages | Any,
    *,
    base: Hyperparameters,
    settings: TrainSettings,
    storage_path: str,
    experiment_name: str,
    seed: int,
    resume: bool,
    callbacks: Sequence[tune.Callback],
    earlier: Sequence[EarlierTrial],
) -> TuneOutcome:
    """One Tune experiment (a search, or one round of it): train's arguments."""
    problem = base_trial_problem(settings, base)
    if problem is not None:
        raise BadInputError(f"train.{problem}")
    unrepeatable = unrepeatable_because(settings, concurrent_trials(settings))
    if unrepeatable is not None:  # the pipeline warned at its start already (pipeline.cluster_checks.check_search)
        log.info("train: %s", unrepeatable)
    seed_driver(seed)
    trainable = tune.with_parameters(
        run_trial,
        train_data=train_data,
        validation_data=validation_data,
        epochs=settings.epochs,
        cpus=settings.cpus_per_trial,
        seed=seed,
        mixed_precision=settings.mixed_precision,
        fixed_seed=settings.trial_seed,
    )
    trainable = tune.with_resources(trainable, {"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial})
    snapshot_seconds = SNAPSHOT_SECONDS_REMOTE if storage.is_uri(storage_path) else SNAPSHOT_SECONDS_LOCAL
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", str(snapshot_seconds))  # read by Tune's controller
    experiment = storage.join(storage_path, experiment_name)
    if tune.Tuner.can_restore(experiment):
        _check_owner(experiment)
        if resume:
            log.info("train: restoring the Tune experiment in %s", experiment)
        else:  # this task runs again after its worker died (Ray's retry): the experiment goes on, not anew
            log.warning("train: restoring the Tune experiment in %s, which an earlier attempt of this train task "
                        "left (its worker died)", experiment)
        # Tune restores the searcher (its state files in the experiment folder), the stopper (in the experiment
        # state) and the settings the experiment began with (tuner.pkl); the scheduler starts again from them.
        tuner = tune.Tuner.restore(
            experiment, trainable, resume_unfinished=True, resume_errored=False, restart_errored=False
        )
        return _finish(_summarize(_fit(tuner, storage_path), storage_path, experiment, experiment), settings)
    slots = concurrent_trials(settings)
    ending = _search_stopper(settings, experiment)
    stopper = CombinedStopper(EpochsDone(settings.epochs), ending) if ending else EpochsDone(settings.epochs)
    if settings.scheduler == "halving":
        _say(f"plan: {settings.halving_plan().describe(settings.epochs, settings.time_budget_s)}; {slots} at a time"
             + (f"; time budget {format_seconds(settings.time_budget_s)}" if settings.time_budget_s is not None
                else ""))
    tuner = tune.Tuner(
        trainable,
        param_space=settings.param_space(base),
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode=MODE,
            num_samples=settings.num_samples,
            scheduler=make_scheduler(settings, slots=slots, say=_say),
            search_alg=make_searcher(settings, base, seed, earlier),  # it limits the trials at once itself
            reuse_actors=settings.reuse_actors,
        ),
        run_config=tune.RunConfig(
            name=experiment_name,
            storage_path=storage_path,
            stop=stopper,
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=settings.checkpoints_to_keep,
                checkpoint_score_attribute=METRIC,
                checkpoint_score_order=MODE,
            ),
            failure_config=tune.FailureConfig(max_failures=settings.max_failures),
            sync_config=tune.SyncConfig(sync_period=snapshot_seconds),
            callbacks=[
                JsonLog(), CsvLog(),  # Tune's own loggers lose rows when a trial restarts (stages.training.trial_logs)
                # the console's lines (stages.training.progress)
                SearchProgress(settings.trial_count, settings.epochs, time_budget_s=_eta_budget(settings),
                               halving_rungs=len(settings.halving_plan().rungs) if settings.scheduler == "halving"
                               else 0),
                PreloadForEvaluation(),  # TensorFlow for the evaluate task, on the search's idle cores
                *([ending] if ending is not None else []),  # its on_checkpoint: when the search may end
                *callbacks,
            ],
            verbose=1,  # the trial table as it changes; per-trial result boxes would drown it
        ),
    )
    results = _fit(tuner, storage_path)
    return _finish(_summarize(results, storage_path, results.experiment_path, experiment), settings)


def _say(message: str) -> None:
    """A line of the search's own for the console (stages.training.progress)."""
    print(f"{PREFIX}{message}", flush=True)


def _eta_budget(settings: TrainSettings) -> float | None:
    """The seconds the search's ETA counts down against: halving fills its budget (less the evaluation's share)."""
    if settings.time_budget_s is None:
        return None
    if settings.scheduler == "halving":
        return settings.time_budget_s - max(MIN_RESERVE_S, RESERVE_FRACTION * settings.time_budget_s)
    return settings.time_budget_s


def _finish(outcome: TuneOutcome, settings: TrainSettings) -> TuneOutcome:
    """Every trial is done: their checkpoints shrink to what evaluation reads (stages.training.finished_checkpoints)."""
    if settings.slim_checkpoints:
        slim_finished_checkpoints(outcome.ranked)
    return outcome


def concurrent_trials(settings: TrainSettings) -> int:
    """How many trials can run at once: max_concurrent_trials, or as many as the cluster's CPUs and GPUs hold."""
    if settings.max_concurrent_trials:
        return settings.max_concurrent_trials
    import ray

    # before Ray starts, Tune would start a local one with this machine's CPUs
    resources = ray.cluster_resources() if ray.is_initialized() else {"CPU": float(os.cpu_count() or 1)}
    fits = [resources.get("CPU", 0.0) / settings.cpus_per_trial]
    if settings.gpus_per_trial > 0:
        fits.append(resources.get("GPU", 0.0) / settings.gpus_per_trial)
    return max(1, math.floor(min(fits)))


def _search_stopper(settings: TrainSettings, experiment: str) -> SearchStopper | None:
    """What ends the whole search early (a target accuracy, a time budget), if anything does."""
    if settings.target_val_accuracy is None and settings.time_budget_s is None:
        return None
    return SearchStopper(
        target_val_accuracy=settings.target_val_accuracy,
        time_budget_s=settings.time_budget_s,
        reason_file=storage.join(experiment, STOP_REASON_FILE),
    )


def _fit(tuner: tune.Tuner, storage_path: str) -> tune.ResultGrid:
    """tuner.fit(), telling a full disk apart from other failures (Tune then fails reading its own truncated files,
    or the trials fail writing checkpoints, whichever comes first), and an experiment SIGTERM stopped from one that
    finished."""
    with _sigterm_stops_tune() as stopped:
        try:
            results = tuner.fit()
        except Exception as error:
            _raise_if_disk_full(storage_path, error)
            raise
    if stopped.is_set():
        raise TrainingError(
            "SIGTERM stopped the Tune experiment before it finished; its state is saved: resume the run to go on"
        )
    return results


def _summarize(results: tune.ResultGrid, storage_path: str, experiment_path: str, experiment: str) -> TuneOutcome:
    """The outcome, with why the search ended early (`experiment`: the experiment folder as stages.common.storage
    names it; `experiment_path`: as Tune does)."""
    stop_reason = read_stop_reason(experiment)
    try:
        outcome = summarize(results, experiment_path=experiment_path)
    except TrainingError as error:  # every trial failed: because the disk is full? Or stopped before a checkpoint?
        _raise_if_disk_full(storage_path, error)
        if stop_reason is not None and stop_reason.startswith("time budget"):
            raise BadInputError(f"train.time_budget_s: {stop_reason.removeprefix('time budget of ').split(' s ')[0]}"
                                " s is too small for even one trial: none finished its first epoch in it") from error
        if stop_reason is not None:
            raise TrainingError(f"the search ended early ({stop_reason}): {error}") from error
        raise
    return dataclasses.replace(outcome, stop_reason=stop_reason)


def _raise_if_disk_full(storage_path: str, error: BaseException) -> None:
    if storage.is_uri(storage_path):
        return
    free = shutil.disk_usage(storage_path).free
    if free < FULL_DISK_BYTES:
        raise StorageError(
            f"the disk of {storage_path} is full ({free // 2**20} MiB free); Tune stopped with "
            f"{type(error).__name__}: {one_line(error)}"
        ) from error


@contextmanager
def _sigterm_stops_tune():
    """While Tune's loop runs in this thread, SIGTERM ends it as Tune's own stop signal does (SIGUSR1, which it
    handles like Ctrl-C: no new steps, the experiment state written once more, trials stopped). Yields an Event set
    when SIGTERM came. Outside the main thread (no signal handlers there) it does nothing.

    Before Tune's loop has set up its handler, SIGTERM interrupts like Ctrl-C (KeyboardInterrupt): there is no
    state to save yet. The handler in place before (a Ray worker's: exit) is put back afterwards.
    """
    stopped = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stopped
        return
    usr1_before = signal.getsignal(signal.SIGUSR1)

    def stop_tune(signum, frame):
        first = not stopped.is_set()
        stopped.set()
        tune_stop = signal.getsignal(signal.SIGUSR1)
        if callable(tune_stop) and tune_stop is not usr1_before:  # Tune's loop runs: let it end itself
            if first:
                log.warning("train: SIGTERM received: stopping the Tune experiment (its state is saved)")
                tune_stop(signal.SIGUSR1, frame)
            return
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop_tune)
    try:
        yield stopped
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def load_outcome(experiment_path: str) -> TuneOutcome:
    """The outcome of a finished search, read back from its folder (a run resumed after training): its rounds'
    together when it was continued (stages.training.search_rounds).

    Raises:
      TrainingError: a round never finished.
      DataError: the rounds' record is damaged.
    """
    rounds = read_rounds(experiment_path)
    if any(not search_round.finished for search_round in rounds):
        raise TrainingError(f"{experiment_path}: round {len(rounds)} of the search never finished")
    return merge_outcomes([_load_experiment_outcome(experiment_path), *[
        _load_experiment_outcome(storage.join(experiment_path, r.experiment)) for r in rounds[1:]]])


def _load_experiment_outcome(experiment_path: str) -> TuneOutcome:
    _check_owner(experiment_path)
    analysis = tune.ExperimentAnalysis(experiment_path, default_metric=METRIC, default_mode=MODE)
    outcome = summarize(tune.ResultGrid(analysis), experiment_path=experiment_path)
    return dataclasses.replace(outcome, stop_reason=read_stop_reason(experiment_path))


def _check_owner(experiment_path: str) -> None:
    """Tune's experiment state is pickled: only unpickle a local one that this user's runs wrote."""
    if storage.is_uri(experiment_path):
        return  # the bucket's access control decides who could write there
    state = os.path.join(experiment_path, "tuner.pkl")
    if os.path.exists(state) and os.stat(state).st_uid != os.getuid():
        raise BadInputError(f"{state} belongs to another user; not restoring an experiment from it")
