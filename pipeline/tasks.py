"""The stages as Ray tasks: the one place where stage functions meet Ray.

Each task sets up logging in its worker, calls its stage, and writes the stage's artifacts into the run folder.
Large arrays travel as ObjectRefs: preprocess returns each split as its own object, the train task hands the refs
to Tune untouched, so every trial reads the one copy in the object store.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import ray

from pipeline.config import DataSection, EvaluateSection
from stages.common.redact import redact
from stages.evaluation.metrics import RunMetrics
from stages.training.hyperparameters import Hyperparameters
from stages.training.train_settings import TrainSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SplitRefs:
    """ObjectRefs to the splits. Wrapped so that Ray passes the refs themselves instead of resolving them."""

    train: ray.ObjectRef
    validation: ray.ObjectRef
    test: ray.ObjectRef


def _worker_logging(level: int) -> None:
    logging.basicConfig(level=level, format="%(message)s", force=True)


def _download_bar(name: str, total_bytes: int | None):
    """A progress bar that Ray draws on the driver's console (Ray's tqdm), whichever node downloads."""
    from ray.experimental import tqdm_ray

    return tqdm_ray.tqdm(desc=name, total=total_bytes, unit="B")


@ray.remote(num_cpus=1, num_returns=2)
def download_task(data: DataSection, log_level: int):
    """Returns the files' contents (for preprocess, which may run on another node: nodes share no disk) and where
    they are cached on this node (for the run's records)."""
    from stages.download import download

    _worker_logging(log_level)
    files = download(
        data.mirrors, Path(data.cache_dir).expanduser(), retries=data.retries, timeout_s=data.timeout_s,
        deadline_s=data.deadline_s, progress=_download_bar,
    )
    where = {"node": ray.get_runtime_context().get_node_id(), "files": {k: str(v) for k, v in asdict(files).items()}}
    return files.read(), where


@ray.remote(num_cpus=1, num_returns=4)
def preprocess_task(raw, data: DataSection, seed: int, data_dir: str, shared_datasets: str | None, log_level: int,
                    expected_content: str | None = None):
    """The split, computed or taken from this node's cache. The run folder keeps no copy of its own: its manifest
    references the copy in this node's cache or, on a run root that every node shares, the one copy of this split
    under `shared_datasets` (<run.root>/.datasets). `expected_content`: the content_sha256 of the split a resumed
    run trained on, whose copy was gone; a split computed again must be that one."""
    from stages.common import storage
    from stages.common.errors import DataError
    from stages.dataset.dataset_cache import cached_folder, cached_preprocess
    from stages.preprocess import content_sha256, load_verified_splits, save_reference, save_splits

    _worker_logging(log_level)
    cache_dir = Path(data.cache_dir).expanduser()  # this node's own cache
    splits, info, _ = cached_preprocess(
        raw,
        cache_dir,
        validation_size=data.validation_size,
        seed=seed,
        max_train_images=data.max_train_images,
        max_test_images=data.max_test_images,
    )
    info = {**info, "content_sha256": content_sha256(splits)}
    if expected_content is not None and info["content_sha256"] != expected_content:
        raise DataError(
            f"{redact(data_dir)}: the split computed again (content {info['content_sha256'][:12]}) is not the one "
            f"this run trained on ({expected_content[:12]}); start a new run"
        )
    if shared_datasets is None:
        folder = reference = str(cached_folder(cache_dir, info["fingerprint"]).resolve())
    else:  # <run.root>/.datasets/<fingerprint>, named from data/ without the root's URI and its query
        folder = storage.join(shared_datasets, info["fingerprint"])
        reference = f"../../{storage.name_of(shared_datasets)}/{info['fingerprint']}"
        if load_verified_splits(folder, follow=False) is None:
            save_splits(splits, info, folder)
    info = save_reference(info, data_dir, reference)
    log.info(
        "dataset: %d train, %d validation, %d test images in %s",
        len(splits.train), len(splits.validation), len(splits.test), redact(folder),
    )
    return splits.train, splits.validation, splits.test, {**info, "node": ray.get_runtime_context().get_node_id()}


@ray.remote(num_cpus=1, num_returns=4)
def load_splits_task(data_dir: str, log_level: int):
    """The splits a finished preprocess stage wrote into the run folder (a resumed run)."""
    from stages.common.errors import DataError
    from stages.preprocess import load_verified_splits, referenced_folder

    _worker_logging(log_level)
    try:
        loaded = load_verified_splits(data_dir)
    except Exception as error:  # arrays that match the manifest's checksum yet not its format: both rewritten
        raise DataError(f"{redact(data_dir)}: the dataset cannot be read ({type(error).__name__})") from None
    if loaded is None:
        if folder := referenced_folder(data_dir):
            raise DataError(f"the dataset {redact(data_dir)} references in {redact(folder)} is gone or changed")
        raise DataError(f"{redact(data_dir)} holds no complete dataset matching its manifest")
    splits, info = loaded
    return splits.train, splits.validation, splits.test, info


# The train task only drives Tune; the trials it starts reserve the CPUs and GPUs. Ray runs it again when its worker
# dies (killed, out of memory): the new attempt restores the Tune experiment the dead one left in the run folder, so
# finished trials stay finished and unfinished ones go on from their checkpoints. SIGTERM makes it end Tune's loop
# cleanly (stages.train), which is how a stopping driver stops it.
@ray.remote(num_cpus=0, max_retries=3)
def train_task(
    splits: SplitRefs,
    model: Hyperparameters,
    settings: TrainSettings,
    seed: int,
    storage_path: str,
    resume: bool,
    log_level: int,
    tracking=None,
    earlier=(),
    continued_from_s=None,
):
    """`tracking`: (pipeline.tracking.TrackingTarget, the server's URI): a child run per trial; `earlier`: the trials
    of train.warm_start's runs (pipeline.warm_start); `continued_from_s`: the budget of the finished search a larger
    one continues (stages.train.train)."""
    from stages.train import train

    _worker_logging(log_level)
    callbacks = []
    if tracking is not None:
        import os

        from pipeline.trial_runs import TrialRuns

        target, os.environ["MLFLOW_TRACKING_URI"] = tracking  # read there: never pickled into the experiment
        callbacks.append(TrialRuns(target))
    return train(
        splits.train,
        splits.validation,
        base=model,
        settings=settings,
        storage_path=storage_path,
        seed=seed,
        resume=resume,
        callbacks=callbacks,
        earlier=earlier,
        continued_from_s=continued_from_s,
    )


@ray.remote(num_cpus=0)
def load_outcome_task(experiment_path: str, log_level: int):
    """The outcome of a finished train stage, read back from its Tune experiment (a resumed run).

    Raises:
      DataError: the experiment is missing or damaged (a state file cut short, a trial's results unreadable, the best
        checkpoint gone); the runner then trains again.
    """
    from stages.common.errors import DataError, PipelineError, TrainingError
    from stages.train import load_outcome

    _worker_logging(log_level)
    where = redact(experiment_path)
    try:
        outcome = load_outcome(experiment_path)
    except TrainingError as error:  # no trial has a usable checkpoint now, though one had when the stage finished
        raise DataError(f"{where}: {error}") from None
    except PipelineError:
        raise
    except Exception as error:  # what Tune raises reading its files: FileNotFoundError, JSONDecodeError, ValueError
        text = str(error).strip().splitlines()
        raise DataError(f"{where}: {type(error).__name__}: {text[0] if text else 'unreadable'}") from None
    unread = [trial.trial_id for trial in outcome.trials if trial.status == "TERMINATED" and not trial.epochs]
    if unread:  # Tune skips a trial whose result.json it cannot parse: the best one might be among them
        raise DataError(f"{where}: the results of trial {unread[0]} cannot be read (its result.json)")
    if not _has_model(outcome.best_checkpoint):
        raise DataError(f"{redact(outcome.best_checkpoint_location)}: the best checkpoint is gone")
    return outcome


def _has_model(checkpoint) -> bool:
    """Whether the checkpoint folder (local or in an object store) still holds its model."""
    import pyarrow.fs

    from stages.evaluate import EXPORTED_MODEL

    info = checkpoint.filesystem.get_file_info(f"{checkpoint.path.rstrip('/')}/{EXPORTED_MODEL}")
    return info.type == pyarrow.fs.FileType.File


def _importance(metrics: RunMetrics, train: TrainSettings) -> dict[str, float]:
    """The searched hyperparameters' importance for the report; none (said in the log) where it cannot be had."""
    from stages.evaluation.importance import hyperparameter_importance

    try:
        return hyperparameter_importance(metrics.trials, train.search_space)
    except Exception as error:  # the report goes on without it
        log.warning("report: no hyperparameter importance (%s: %s)", type(error).__name__, error)
        return {}


def _not_retracing(record: logging.LogRecord) -> bool:
    return "triggered tf.function retracing" not in record.getMessage()


@ray.remote(num_cpus=1)
def evaluate_task(
    outcome, validation, test, settings: EvaluateSection, run_location: str, stage_seconds: dict,
    train: TrainSettings, log_level: int,
) -> RunMetrics:
    """Scores the best checkpoint (and the top-k ensemble, if asked for), exports the model(s), writes trials.csv,
    metrics.json and the report into the run folder."""
    import time

    from pipeline.run_folder import RunFolder
    from stages.common import storage
    from stages.evaluate import evaluate, export_model, run_metrics
    from stages.evaluation.ensemble import top_k_ensemble
    from stages.evaluation.report import ReportInputs, write_report
    from stages.training.trial import configure_tensorflow
    from stages.training.tune_results import history_csv

    started = time.perf_counter()
    _worker_logging(log_level)
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)  # the runner gives it a node's worth
    configure_tensorflow(cpus)
    # each model evaluate loads (the best, the ensemble's members) traces its own predict function once, by design
    logging.getLogger("tensorflow").addFilter(_not_retracing)  # the same function: added once per worker
    log.info("evaluate: TensorFlow on %d threads", max(1, int(cpus)))
    run = RunFolder(run_location)
    storage.write_bytes(run.trials_file, history_csv(outcome.history))
    with outcome.best_checkpoint.as_directory() as checkpoint_folder:  # a download when the run is remote
        model, evaluation, probabilities = evaluate(Path(checkpoint_folder), test, batch_size=settings.batch_size)
    exported = export_model(model, outcome.best_hyperparameters, run.model_dir)
    # beside the single best model, whose numbers stay the headline ones
    ensemble = top_k_ensemble(
        outcome.ranked, settings.ensemble_top_k, validation, test, batch_size=settings.batch_size,
        model_dir=run.model_dir,
    )
    metrics = run_metrics(outcome, evaluation, redact(exported), ensemble)
    storage.write_json(run.metrics_file, metrics.to_json())
    timings = {**stage_seconds, "evaluate": round(time.perf_counter() - started, 2)}
    write_report(
        ReportInputs(run.run_id, metrics, timings, train.epochs, test.images, test.labels, probabilities,
                     importance=_importance(metrics, train), time_budget_s=train.time_budget_s),
        run.report_file, run.figures_dir,
    )
    log.info("report: %s", redact(run.report_file))
    return metrics
