"""Runs the four stages in order on Ray, times them, records them for resuming, and writes the run's summary.

run_pipeline reads top to bottom: each stage is either taken from a resumed run's finished work (when that is whole)
or run as its Ray task (pipeline.tasks). _StageRunner holds what the stages share: the run, its records, their
times.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline.cluster_checks import fits
from pipeline.config import Config
from pipeline.run_files import (
    DamagedFile,
    check_exported_model,
    experiment_problem,
    read_metrics,
    set_aside_experiment,
)
from pipeline.run_folder import SHARED_DATASETS, RunFolder, adopt_run_folder
from pipeline.stage_records import StageRecords, changed_code, describe_changes, stage_inputs
from pipeline.summary import STAGES, RunSummary, duration, summary_record
from pipeline.task_failures import task_failure
from pipeline.tasks import (
    SplitRefs,
    download_task,
    evaluate_task,
    load_outcome_task,
    load_splits_task,
    preprocess_task,
    train_task,
)
from pipeline.warm_start import earlier_trials
from stages.common import storage
from stages.common.errors import BadInputError, DataError
from stages.common.redact import redact
from stages.evaluation.metrics import RunMetrics
from stages.preprocess import read_manifest
from stages.train import EXPERIMENT_NAME

if TYPE_CHECKING:
    from stages.training.tune_results import TuneOutcome

log = logging.getLogger(__name__)


def run_pipeline(config: Config, run: RunFolder, *, resume: bool = False, tracking=None,
                 training_over: Callable[[], None] | None = None) -> RunSummary:
    """download → preprocess → train → evaluate, each a Ray task; artifacts go to `run`.

    Each finished stage is recorded in the run's stages.json. With `resume`, a stage recorded as finished with the
    inputs it has now is skipped if its outputs are whole, and runs again if they are missing or damaged (data/,
    metrics.json, model/model.keras, the Tune experiment); an interrupted Tune experiment is restored. A damaged
    experiment is moved aside (tune.damaged-<time>/), never deleted, and train starts anew.

    With `tracking` (pipeline.tracking), every trial gets a child run of its parent run on the MLflow server.
    `training_over` is called once the train stage is done or skipped (the console ends its live line).

    Raises:
      PipelineError: a stage failed in a way worth one line.
      BadInputError: resuming would discard training done with other inputs, or a damaged experiment on an object
        store is in the way.
    """
    runner = _StageRunner(config, run, resume, tracking)
    if resume:
        adopt_run_folder(run)
    metrics = runner.earlier_evaluation()
    if metrics is None:
        splits = runner.earlier_splits()
        if splits is None:
            splits = runner.preprocess(runner.download())
        outcome = runner.earlier_training()
        if outcome is None:
            outcome = runner.train(splits)
        if training_over is not None:
            training_over()
        metrics = runner.evaluate(outcome, splits)
    summary = RunSummary(run.run_id, run.location, metrics, {name: runner.seconds[name] for name in STAGES},
                         runner.skipped)
    storage.write_json(run.summary_file, summary_record(summary))
    return summary


class _StageRunner:
    """The stages of one run as Ray tasks, with what they share: the run folder, the records of finished stages (and,
    resuming, which of them can be skipped), each stage's time, the log level the tasks use."""

    def __init__(self, config: Config, run: RunFolder, resume: bool, tracking) -> None:
        self.config, self.run, self.resume, self.tracking = config, run, resume, tracking
        self.level = logging.getLogger().getEffectiveLevel()
        self.inputs = stage_inputs(config)
        self.records = StageRecords.load(run.location) if resume else StageRecords(run.location)
        self.seconds: dict[str, float] = {}  # a skipped stage: the time it took when it ran
        self.skipped: list[str] = []
        self._running: str | None = None  # the stage the driver waits for (named in failures that have no task)
        self._expected_content: str | None = None  # the split a resumed run trained on, where it must be remade

    # ---- each stage: taken from the finished work of a resumed run, or run ----------------------------------------

    def earlier_evaluation(self) -> RunMetrics | None:
        """A resumed run's metrics when train and evaluate finished and metrics.json and the model are whole: then
        every stage is skipped. None otherwise, said when they are damaged (evaluate runs again)."""
        if self._finished("train") is None or self._finished("evaluate") is None:
            return None
        try:
            metrics = read_metrics(self.run)
            check_exported_model(self.run)
        except DamagedFile as damage:
            log.warning("stage evaluate: %s; running it again", damage)
            return None
        for name in STAGES:
            self._skip(name)
        if not storage.exists(self.run.tune_dir) or experiment_problem(self.run):
            # the run's product is whole: training again for the trials' records alone would cost far more
            log.warning("run %s: its Tune experiment (tune/) is missing or damaged; its model and metrics are whole, "
                        "so nothing runs again", self.run.run_id)
        return metrics

    def earlier_splits(self) -> SplitRefs | None:
        """A resumed run's splits, read back from its data/ (download and preprocess skipped); None when preprocess
        never finished or what it wrote is damaged (said)."""
        if self._finished("preprocess") is None:
            return None
        refs = self._task(load_splits_task, "preprocess").remote(self.run.data_dir, self.level)
        try:
            self._get(refs[3])
        except DataError as error:
            log.warning("stage preprocess: %s; running it again", error)
            # computed again, the split must be the one the run's trials trained on
            self._expected_content = (read_manifest(self.run.data_dir) or {}).get("content_sha256")
            return None
        self._skip("download")
        self._skip("preprocess")
        return SplitRefs(train=refs[0], validation=refs[1], test=refs[2])

    def download(self) -> ray.ObjectRef:
        """The raw files, in Ray's object store: runs whenever preprocess must, since no disk is shared with the
        node running preprocess (or a resumed driver). A node whose cache holds the files verifies and reads them."""
        with self._timed("download") as outputs:
            raw_ref, where_ref = self._task(download_task, "download").remote(self.config.data, self.level)
            outputs.update(self._get(where_ref))
        return raw_ref

    def preprocess(self, raw: ray.ObjectRef) -> SplitRefs:
        with self._timed("preprocess") as outputs:
            shared = self.config.run.shared_filesystem or storage.is_uri(self.config.run.root)
            refs = self._task(preprocess_task, "preprocess").remote(
                raw, self.config.data, self.config.run.seed, self.run.data_dir,
                storage.join(storage.parent_of(self.run.location), SHARED_DATASETS) if shared else None, self.level,
                expected_content=self._expected_content,
            )
            manifest = self._get(refs[3])
            outputs.update(dataset_fingerprint=manifest["fingerprint"], node=manifest["node"])
        return SplitRefs(train=refs[0], validation=refs[1], test=refs[2])

    def earlier_training(self) -> TuneOutcome | None:
        """A resumed run's finished train stage, read back from its experiment; None when train never finished, or
        its experiment is missing or damaged (then set aside: train runs again)."""
        if self._finished("train") is None:
            return None
        experiment = storage.join(self.run.location, EXPERIMENT_NAME)
        try:
            outcome = self._get(load_outcome_task.remote(experiment, self.level))
        except DataError as damage:
            log.warning("stage train: its Tune experiment cannot be read back (%s); training again", damage)
            self._set_aside_experiment(str(damage))
            return None
        self._skip("train")
        return outcome

    def train(self, splits: SplitRefs) -> TuneOutcome:
        if self.resume:
            problem = experiment_problem(self.run)
            if problem is not None:  # Tune's restore would fail on it (what this misses fails in one line too: _get)
                log.warning("stage train: the Tune experiment cannot be restored (%s); training anew", problem)
                self._set_aside_experiment(problem)
        tracking = (self.tracking.target, self.tracking.uri) if self.tracking is not None else None
        earlier = earlier_trials(self.config.train.warm_start, self.config.run.root)
        if earlier:
            log.info("train: warm start from %d trials of %s", len(earlier), ", ".join(self.config.train.warm_start))
        continued_from_s, searched_s = self._budget_grown_from(), 0.0
        if continued_from_s is not None:
            searched_s = self.records.started("train").seconds or 0.0
            log.info("train: the search finished (time budget %s, %s taken); it goes on for the %s added",
                     duration(continued_from_s), duration(searched_s),
                     duration(self.config.train.time_budget_s - continued_from_s))
        with self._timed("train", earlier_s=searched_s) as outputs:
            # Tune's driver loop stays on the pipeline driver's node: losing a worker node must not take the
            # experiment with it (trials on that node are retried elsewhere from their checkpoints).
            beside_driver = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
            outcome = self._get(train_task.options(scheduling_strategy=beside_driver).remote(
                splits, self.config.model, self.config.train, self.config.run.seed, self.run.location, self.resume,
                self.level, tracking, earlier, continued_from_s,
            ))
            outputs["best_trial_id"] = outcome.best_trial_id
        return outcome

    def evaluate(self, outcome: TuneOutcome, splits: SplitRefs) -> RunMetrics:
        with self._timed("evaluate") as outputs:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
            cpus = _evaluate_cpus({"GPU": gpus, **self.config.ray.stage_resources.get("evaluate", {})})
            metrics = self._get(self._task(evaluate_task, "evaluate", num_gpus=gpus, num_cpus=cpus).remote(
                outcome, splits.validation, splits.test, self.config.evaluate, self.run.location, dict(self.seconds),
                self.config.train, self.level,
            ))
            outputs["test_accuracy"] = metrics.test_accuracy
        return metrics

    def _budget_grown_from(self) -> float | None:
        """The time budget a resumed run's finished search had, when it is resumed with a larger one (the only change
        check_resume lets through for a finished train stage); else None."""
        record = self.records.started("train") if self.resume else None
        if record is None or record.finished is None:
            return None
        return budget_growth(record.settings, self.inputs["train"].settings)

    # ---- what the stages share -------------------------------------------------------------------------------------

    def _finished(self, stage: str):
        """The record of `stage` finished with the inputs it has now, when resuming; else None."""
        return self.records.finished(stage, self.inputs[stage]) if self.resume else None

    def _skip(self, stage: str) -> None:
        record = self._finished(stage)
        log.info("stage %s: finished earlier (%s), skipped", stage, record.finished if record else "unrecorded")
        self.seconds[stage] = (record.seconds if record else None) or 0.0
        self.skipped.append(stage)

    @contextmanager
    def _timed(self, stage: str, earlier_s: float = 0.0) -> Iterator[dict[str, Any]]:
        """Times a stage and records it in stages.json: begun on entry, finished (with the outputs the block put
        into the yielded dict) when the block completes. `earlier_s`: what the stage took before (a search continued
        in a new round: its time is the rounds' together)."""
        log.info("stage %s: started", stage)
        self._running = stage
        self.records.begin(stage, self.inputs[stage])
        started = time.perf_counter()
        outputs: dict[str, Any] = {}
        yield outputs
        self.seconds[stage] = round(time.perf_counter() - started + earlier_s, 2)
        self.records.finish(stage, self.inputs[stage], self.seconds[stage], outputs)
        log.info("stage %s: done in %s%s", stage, duration(self.seconds[stage] - earlier_s),
                 f" ({duration(self.seconds[stage])} with the rounds before)" if earlier_s else "")

    def _task(self, task, stage: str, **options):
        """The stage's task with the custom resources `ray.stage_resources` gives it (and any other options)."""
        resources = self.config.ray.stage_resources.get(stage)
        return task.options(**options, **({"resources": dict(resources)} if resources else {}))

    def _set_aside_experiment(self, why: str) -> None:
        moved = set_aside_experiment(self.run, why)  # kept, never deleted: it may hold hours of training
        if moved:
            log.warning("stage train: the damaged Tune experiment is kept in %s", redact(moved))

    def _get(self, ref):
        """ray.get, a failed task's error turned into the one line the driver would give (pipeline.task_failures):
        a stage's PipelineError as itself, anything else named with its stage, never a RayTaskError's worker
        traceback."""
        try:
            return ray.get(ref)
        except ray.exceptions.RayError as error:
            function = getattr(error, "function_name", None) or ""
            stage = _TASK_STAGES.get(function.rsplit(".", 1)[-1], self._running or "a stage")
            failure = task_failure(stage, error)
            if failure is error:
                raise
            raise failure from (None if failure is getattr(error, "cause", None) else error)


# the stage each task belongs to, for naming it when it fails
_TASK_STAGES = {
    "download_task": "download", "preprocess_task": "preprocess", "load_splits_task": "preprocess",
    "train_task": "train", "load_outcome_task": "train", "evaluate_task": "evaluate",
}


def _evaluate_cpus(demand: dict[str, float], most: int = 8, wait_s: float = 3.0) -> int:
    """The CPUs the evaluate task takes: the trials are done, so as many as the largest node that can run it has
    (TensorFlow predicts on that many threads), at most `most`: 10,000 images gain little from more; but never more
    than are free once the trials' actors are gone (waited for up to `wait_s`): CPUs something else holds (another
    job, an actor a killed train task left behind) would leave the task pending forever. One where no node that is
    up can run it (an autoscaler will add one)."""
    offers = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    wanted = int(max(1, min(most, max((offer.get("CPU", 0) for offer in offers if fits(demand, offer)), default=1))))
    deadline = time.monotonic() + wait_s
    while (free := int(ray.available_resources().get("CPU", 0))) < wanted and time.monotonic() < deadline:
        time.sleep(0.1)
    return max(1, min(wanted, free))


def check_resume(config: Config, run: RunFolder) -> None:
    """Refuses, before anything starts, a resume whose settings would throw the run's training away; says when
    the code changed since (finished work is kept, the rest runs with the new code).

    Raises:
      BadInputError: a setting the Tune experiment (or a stage before it) ran with differs now.
    """
    records, inputs = StageRecords.load(run.location), stage_inputs(config)
    train = records.started("train")
    if train is not None:
        # a finished search resumed with a larger time budget goes on searching (stages.training.search_rounds)
        grown = train.finished is not None and budget_growth(train.settings, inputs["train"].settings) is not None
        changes = describe_changes(records, inputs, upto="preprocess" if grown else "train")
        if changes:
            raise BadInputError(
                f"cannot resume run {run.run_id}: its Tune experiment was started with other settings "
                f"({'; '.join(changes)}); resume without those changes, or start a new run"
            )
    code = changed_code(records, inputs)
    if code:
        log.warning(
            "run %s: the code of the %s stage%s changed since it ran; finished trials and checkpoints are kept, "
            "what is left runs with the new code", run.run_id, ", ".join(code), "s" if len(code) > 1 else "",
        )


BUDGET_KEY = "train.time_budget_s"


def budget_growth(recorded: dict[str, Any], current: dict[str, Any]) -> float | None:
    """The recorded train settings' time budget when the current settings differ from them only by a larger one;
    else None."""
    old, new = recorded.get(BUDGET_KEY), current.get(BUDGET_KEY)
    others_equal = {k: v for k, v in recorded.items() if k != BUDGET_KEY} == \
        {k: v for k, v in current.items() if k != BUDGET_KEY}
    if others_equal and isinstance(old, (int, float)) and isinstance(new, (int, float)) and new > old:
        return float(old)
    return None
