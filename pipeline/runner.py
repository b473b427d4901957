"""Runs the four stages in order on Ray, times them, and writes the run's summary."""

from __future__ import annotations

import logging
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline.config import Config
from pipeline.local_ray import adopt_orphans, descendants, end_processes
from pipeline.ray_startup import RayTarget, explain_start_failure, ray_target
from pipeline.run_files import (
    DamagedFile,
    check_exported_model,
    experiment_problem,
    read_metrics,
    set_aside_experiment,
)
from pipeline.run_folder import RunFolder, adopt_run_folder
from pipeline.stage_records import StageInputs, StageRecords, changed_code, describe_changes, stage_inputs
from pipeline.task_failures import first_line, task_failure
from pipeline.tasks import (
    SplitRefs,
    download_task,
    evaluate_task,
    load_outcome_task,
    load_splits_task,
    preprocess_task,
    train_task,
)
from stages import storage
from stages.errors import BadInputError, DataError, QualityGateError
from stages.redact import redact
from stages.train import EXPERIMENT_NAME

log = logging.getLogger(__name__)

STAGES = ("download", "preprocess", "train", "evaluate")


@dataclass
class RunSummary:
    run_id: str
    folder: str
    metrics: dict[str, Any]
    stage_seconds: dict[str, float] = field(default_factory=dict)  # a skipped stage: the time it took earlier
    skipped: list[str] = field(default_factory=list)  # stages a resumed run found finished


@contextmanager
def ray_session(config: Config) -> Iterator[str | None]:
    """Starts a local Ray for the run (no address) or joins a cluster; yields the dashboard URL, if any.

    A Ray this function started is shut down afterwards, and its processes (workers included, which otherwise
    notice their raylet's end in their own time) are gone when this returns; a cluster it joined is left running.
    """
    # Like ray.init(): RAY_ADDRESS (set by `ray job submit` and our `ray submit` entry point) joins that cluster
    target = ray_target(config.ray.address)
    address = target.address
    if address is None:
        adopt_orphans()
    try:  # ray.init too: stopped while Ray starts (SIGTERM), what it started is shut down as well
        if address is None:
            context = _start_local(config)
        else:
            context = _join(target)
        url = context.dashboard_url
        yield f"http://{url}" if url else None
    finally:
        local_ray = descendants() if address is None else []
        ray.shutdown()
        _close_progress_bars()
        if address is None:  # and what the raylet's end left orphaned (adopted: see adopt_orphans)
            end_processes(local_ray + descendants())


def _start_local(config: Config):
    """ray.init of a Ray of our own; one that cannot write what it needs (an unwritable home) is said as such.

    Raises:
      BadInputError: naming the file Ray could not write and the variable that places it.
    """
    try:
        return ray.init(
            address="local",  # a Ray of our own, never one that happens to run on this machine
            num_cpus=config.ray.num_cpus,
            num_gpus=config.ray.num_gpus,
            include_dashboard=config.ray.include_dashboard,
            dashboard_host=config.ray.dashboard_host,
            dashboard_port=_free_port_from(config.ray.dashboard_host, config.ray.dashboard_port, say=bool(
                config.ray.include_dashboard)),
            logging_level=logging.WARNING,
        )
    except OSError as error:
        if isinstance(error, ConnectionError):
            raise
        raise explain_start_failure(error) from None


def _join(target: RayTarget):
    """ray.init(address), with the cluster's token when one is at hand (as `ray.init("auto")` does for any address),
    and a refusal for want of the right token said as such.

    Raises:
      BadInputError: no cluster there, or it requires a token this process does not have (or has another).
    """
    address = target.address
    if "RAY_AUTH_MODE" not in os.environ:
        try:  # Ray's own rule for `address="auto"`: a token in RAY_AUTH_TOKEN(_PATH) or ~/.ray/auth_token turns it on
            from ray._private.authentication.authentication_token_setup import (
                maybe_enable_token_auth_if_token_available,
            )

            maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
        except ImportError:  # a Ray without token authentication
            pass
    try:
        return ray.init(address=address, logging_level=logging.WARNING)
    except ConnectionError as error:
        if not _about_authentication(error):
            raise BadInputError(f"{target.source}={redact(address)}: {first_line(error)}") from None
        mode = os.environ.get("RAY_AUTH_MODE", "unset")
        raise BadInputError(
            f"the Ray cluster at {address} refused this client's authentication token (RAY_AUTH_MODE={mode}): "
            "give the cluster's token in RAY_AUTH_TOKEN, a file named by RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token, "
            "with RAY_AUTH_MODE=token"
        ) from None


def _about_authentication(error: BaseException) -> bool:
    """Whether a failure to join came from the cluster refusing this client's token (somewhere in its causes)."""
    while error is not None:
        if type(error).__name__ == "AuthenticationError" or "token-auth" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _close_progress_bars() -> None:
    """Ray draws the tasks' progress bars on this console; a bar whose closing message never arrived (a download
    that failed as the run ended) would print itself again at exit, after the run's last line."""
    try:
        import tqdm
    except ImportError:
        return
    for bar in list(getattr(tqdm.tqdm, "_instances", [])):
        bar.close()


def _free_port_from(host: str, port: int, attempts: int = 50, *, say: bool = True) -> int:
    """The first port from `port` on that is free: Ray refuses to start when the dashboard's port is taken (even
    with the dashboard off: its API server takes the port); `say`: tell the user of another port."""
    for candidate in range(port, min(port + attempts, 65536)):
        with socket.socket() as probe:
            try:
                probe.bind((host, candidate))
            except OSError:
                continue
        if candidate != port and say:
            log.warning("dashboard port %d is in use; using %d", port, candidate)
        return candidate
    return port


def check_cluster(config: Config) -> None:
    """Refuses what this cluster can never do, before any stage runs.

    A trial or stage task needs all its resources on one node: asking for more than any node has, or could have
    once the autoscaler adds the node types it knows, would leave it pending forever. A run folder on a disk that
    only one node sees would break the first time a trial on another node checkpoints.

    Raises:
      BadInputError: naming the setting that cannot be met and what the nodes offer.
    """
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    groups = _autoscaler_node_groups()
    offers = nodes + [resources for resources, _ in groups]
    trial = {"CPU": config.train.cpus_per_trial, "GPU": config.train.gpus_per_trial}
    if not any(_fits(trial, offer) for offer in offers):
        raise BadInputError(
            f"train.cpus_per_trial={trial['CPU']:g} with train.gpus_per_trial={trial['GPU']:g}: no node "
            f"{'has or can get' if groups else 'has'} {_describe(trial)} together (a trial runs on one node; "
            f"the nodes offer {_describe_offers(offers, trial)})"
        )
    for stage, resources in config.ray.stage_resources.items():
        demand = {"CPU": 1.0, **resources}
        if not any(_fits(demand, offer) for offer in offers):
            raise BadInputError(
                f"ray.stage_resources.{stage}={dict(resources)}: no node offers {_describe(demand)} together "
                f"(the nodes offer {_describe_offers(offers, demand)})"
            )
    possible_nodes = max(len(nodes), sum(count if count >= 0 else 2 for _, count in groups))
    shared = config.run.shared_filesystem or storage.is_uri(config.run.root)
    if possible_nodes > 1 and not shared:
        raise BadInputError(
            f"run.root={config.run.root!r} is a local folder but the cluster has (or may grow to) {possible_nodes} "
            "nodes: use an s3:// or gs:// run.root, or a folder every node mounts at the same path (NFS) with "
            "run.shared_filesystem=true"
        )


def check_search(config: Config) -> None:
    """Says at the start, before any stage runs, when the search cannot be repeated exactly from the same seed, and
    why (with the cluster's resources known: they decide how many trials run at once)."""
    from stages.train import concurrent_trials
    from stages.train_settings import unrepeatable_because

    unrepeatable = unrepeatable_because(config.train, concurrent_trials(config.train))
    if unrepeatable is not None:
        log.warning("%s", unrepeatable)


def _fits(demand: dict[str, float], offer: dict[str, float]) -> bool:
    return all(amount <= offer.get(resource, 0) for resource, amount in demand.items() if amount > 0)


def _describe(resources: dict[str, float]) -> str:
    return " and ".join(f"{amount:g} {name}" for name, amount in resources.items() if amount > 0) or "nothing"


def _describe_offers(offers: list[dict[str, float]], demand: dict[str, float], limit: int = 6) -> str:
    """Each distinct node's amounts of what `demand` names, e.g. '8 CPU and 0 GPU; 4 CPU and 1 GPU'."""
    distinct = list(dict.fromkeys(
        " and ".join(f"{offer.get(name, 0):g} {name}" for name, amount in demand.items() if amount > 0)
        for offer in offers
    ))
    return "; ".join(distinct[:limit]) + ("; ..." if len(distinct) > limit else "") if distinct else "no nodes"


def _autoscaler_node_groups() -> list[tuple[dict[str, float], int]]:
    """(resources of one node, most nodes) of every node type the autoscaler may start; empty without one."""
    try:
        from ray._private.state import state  # Ray keeps the autoscaler's node types here (no public API yet)

        cluster_config = state.get_cluster_config()
    except Exception:  # an older or newer Ray without it: judge by the nodes that exist
        return []
    if cluster_config is None:
        return []
    return [(dict(group.resources), group.max_count) for group in cluster_config.node_group_configs]


def run_pipeline(config: Config, run: RunFolder, *, resume: bool = False, tracking=None) -> RunSummary:
    """download → preprocess → train → evaluate, each a Ray task; artifacts go to `run`.

    Each finished stage is recorded in the run's stages.json. With `resume`, a stage recorded as finished with the
    inputs it has now is skipped if its outputs are whole, and runs again if they are missing or damaged (data/,
    metrics.json, model/model.keras, the Tune experiment); an interrupted Tune experiment is restored. A damaged
    experiment is moved aside (tune.damaged-<time>/), never deleted, and train starts anew.

    With `tracking` (pipeline.tracking), every trial gets a child run of its parent run on the MLflow server.

    Raises:
      PipelineError: a stage failed in a way worth one line.
      BadInputError: resuming would discard training done with other inputs, or a damaged experiment on an object
        store is in the way.
    """
    level = logging.getLogger().getEffectiveLevel()
    inputs = stage_inputs(config)
    records = StageRecords.load(run.location) if resume else StageRecords(run.location)
    if resume:
        adopt_run_folder(run)
    seconds: dict[str, float] = {}
    skipped: list[str] = []

    def record_of(stage: str):
        return records.finished(stage, inputs[stage]) if resume else None

    def skip(stage: str) -> None:
        record = record_of(stage)
        log.info("stage %s: finished earlier (%s), skipped", stage, record.finished if record else "unrecorded")
        seconds[stage] = (record.seconds if record else None) or 0.0
        skipped.append(stage)

    def stage(name: str):
        return _stage(name, seconds, records, inputs[name])

    def download() -> ray.ObjectRef:
        # Runs whenever preprocess must: what it hands over lives in Ray's object store, not on a disk that the
        # node running preprocess (or a resumed driver) could read. A node whose cache holds the files verifies
        # them and reads them, without downloading.
        with stage("download") as outputs:
            raw_ref, where_ref = with_resources(download_task, "download").remote(config.data, level)
            outputs.update(_get(where_ref))
        return raw_ref

    def preprocess() -> list[ray.ObjectRef]:
        if record_of("preprocess") is not None:
            refs = with_resources(load_splits_task, "preprocess").remote(run.data_dir, level)
            try:
                _get(refs[3])
                skip("download"), skip("preprocess")
                return refs
            except DataError as error:
                log.warning("stage preprocess: %s; running it again", error)
        raw = download()
        with stage("preprocess") as outputs:
            refs = with_resources(preprocess_task, "preprocess").remote(
                raw, config.data, config.run.seed, run.data_dir, level
            )
            manifest = _get(refs[3])
            outputs.update(dataset_fingerprint=manifest["fingerprint"], node=manifest["node"])
        return refs

    def with_resources(task, stage_name: str, **options):
        """The stage's task with the custom resources `ray.stage_resources` gives it (and any other options)."""
        resources = config.ray.stage_resources.get(stage_name)
        return task.options(**options, **({"resources": dict(resources)} if resources else {}))

    def intact_evaluation() -> dict | None:
        """metrics.json, if it and the exported model are whole; None (said) when evaluate must run again."""
        try:
            metrics = read_metrics(run)
            check_exported_model(run)
        except DamagedFile as damage:
            log.warning("stage evaluate: %s; running it again", damage)
            return None
        return metrics

    def set_aside(why: str) -> None:
        moved = set_aside_experiment(run, why)  # kept, never deleted: it may hold hours of training
        if moved:
            log.warning("stage train: the damaged Tune experiment is kept in %s", redact(moved))

    def finished_training():
        """The finished train stage's outcome, read back from its experiment; None when that is missing or
        damaged: then it is set aside and train runs again."""
        try:
            return _get(load_outcome_task.remote(storage.join(run.location, EXPERIMENT_NAME), level))
        except DataError as damage:
            log.warning("stage train: its Tune experiment cannot be read back (%s); training again", damage)
            set_aside(str(damage))
            return None

    def train(train_ref, validation_ref, test_ref):
        if resume:
            problem = experiment_problem(run)
            if problem is not None:  # Tune's restore would fail on it (what this misses fails in one line too: _get)
                log.warning("stage train: the Tune experiment cannot be restored (%s); training anew", problem)
                set_aside(problem)
        with stage("train") as outputs:
            splits = SplitRefs(train=train_ref, validation=validation_ref, test=test_ref)
            # Tune's driver loop stays on the pipeline driver's node: losing a worker node must not take the
            # experiment with it (trials on that node are retried elsewhere from their checkpoints).
            beside_driver = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
            outcome = _get(
                train_task.options(scheduling_strategy=beside_driver).remote(
                    splits, config.model, config.train, config.run.seed, run.location, resume, level,
                    (tracking.target, tracking.uri) if tracking is not None else None,
                )
            )
            outputs["best_trial_id"] = outcome.best_trial_id
        return outcome

    trained = record_of("train") is not None
    metrics = intact_evaluation() if trained and record_of("evaluate") is not None else None
    if metrics is not None:
        for name in STAGES:
            skip(name)
        if not storage.exists(run.tune_dir) or experiment_problem(run):
            # the run's product is whole: training again for the trials' records alone would cost far more
            log.warning("run %s: its Tune experiment (tune/) is missing or damaged; its model and metrics are whole, "
                        "so nothing runs again", run.run_id)
    else:
        train_ref, validation_ref, test_ref, _ = preprocess()
        outcome = finished_training() if trained else None
        if outcome is not None:
            skip("train")
        else:
            outcome = train(train_ref, validation_ref, test_ref)
        with stage("evaluate") as outputs:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
            cpus = _evaluate_cpus({"GPU": gpus, **config.ray.stage_resources.get("evaluate", {})})
            metrics = _get(
                with_resources(evaluate_task, "evaluate", num_gpus=gpus, num_cpus=cpus).remote(
                    outcome, test_ref, config.evaluate, run.location, dict(seconds), config.train.epochs, level
                )
            )
            outputs["test_accuracy"] = metrics["test_accuracy"]
    summary = RunSummary(run.run_id, run.location, metrics, {name: seconds[name] for name in STAGES}, skipped)
    storage.write_json(run.summary_file, summary_record(summary))
    return summary


def _evaluate_cpus(demand: dict[str, float], most: int = 8, wait_s: float = 3.0) -> int:
    """The CPUs the evaluate task takes: the trials are done, so as many as the largest node that can run it has
    (TensorFlow predicts on that many threads), at most `most`: 10,000 images gain little from more; but never more
    than are free once the trials' actors are gone (waited for up to `wait_s`): CPUs something else holds (another
    job, an actor a killed train task left behind) would leave the task pending forever. One where no node that is
    up can run it (an autoscaler will add one)."""
    offers = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    wanted = int(max(1, min(most, max((offer.get("CPU", 0) for offer in offers if _fits(demand, offer)), default=1))))
    deadline = time.monotonic() + wait_s
    while (free := int(ray.available_resources().get("CPU", 0))) < wanted and time.monotonic() < deadline:
        time.sleep(0.1)
    return max(1, min(wanted, free))


def summary_record(summary: RunSummary) -> dict[str, Any]:
    """What summary.json holds: the run at a glance."""
    metrics = summary.metrics
    return {
        "run_id": summary.run_id,
        "val_accuracy": metrics["val_accuracy"],
        "test_accuracy": metrics["test_accuracy"],
        "best_trial_id": metrics["best_trial_id"],
        "hyperparameters": metrics["hyperparameters"],
        # the next three are absent from the metrics of runs evaluated before they existed
        "top_trials": metrics.get("top_trials", []),
        "ensemble": metrics.get("ensemble"),  # k, trial_ids, test_accuracy, test_loss, model; null: none
        "stop_reason": metrics.get("stop_reason"),
        "stage_seconds": summary.stage_seconds,
        "trials": len(metrics["trials"]),
        "failed_trials": {t["trial_id"]: t["error"] for t in metrics["trials"] if t["status"] == "ERROR"},
    }


def check_resume(config: Config, run: RunFolder) -> None:
    """Refuses, before anything starts, a resume whose settings would throw the run's training away; says when
    the code changed since (finished work is kept, the rest runs with the new code).

    Raises:
      BadInputError: a setting the Tune experiment (or a stage before it) ran with differs now.
    """
    records, inputs = StageRecords.load(run.location), stage_inputs(config)
    if records.started("train") is not None:
        changes = describe_changes(records, inputs, upto="train")
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


def check_quality_gate(config: Config, summary: RunSummary) -> None:
    """Raises QualityGateError when the test accuracy is below `evaluate.min_test_accuracy`."""
    gate = config.evaluate.min_test_accuracy
    accuracy = summary.metrics["test_accuracy"]
    if gate is not None and accuracy < gate:
        raise QualityGateError(
            f"test accuracy {accuracy:.4f} is below evaluate.min_test_accuracy={gate} "
            f"(artifacts kept in {redact(summary.folder)})"
        )


def format_summary(summary: RunSummary) -> str:
    metrics = summary.metrics
    hyperparameters = ", ".join(f"{k}={_short(v)}" for k, v in metrics["hyperparameters"].items())
    failed = [f"{t['trial_id']} ({_clip(t['error'])})" for t in metrics["trials"] if t["status"] == "ERROR"]
    times = ", ".join(
        f"{stage} {_duration(summary.stage_seconds[stage])}" + (" (earlier)" if stage in summary.skipped else "")
        for stage in STAGES
    )
    nodes = sorted({node for trial in metrics["trials"] for node in trial["nodes"]})
    ensemble = metrics.get("ensemble")
    lines = [
        f"run {summary.run_id} finished in {_duration(sum(summary.stage_seconds.values()))}"
        + (" (resumed)" if summary.skipped else ""),
        f"  best trial:      {metrics['best_trial_id']} (epoch {metrics['best_epoch']}) "
        f"of {len(metrics['trials'])} trials on {len(nodes)} node{'s' if len(nodes) != 1 else ''}"
        + (f"; failed after retries: {'; '.join(failed)}" if failed else ""),
        *_top_trials_table(metrics.get("top_trials") or [], indent=" " * 19),
        *([f"  search stopped:  {metrics['stop_reason']}"] if metrics.get("stop_reason") else []),
        f"  hyperparameters: {hyperparameters}",
        f"  val accuracy:    {metrics['val_accuracy']:.4f}",
        f"  test accuracy:   {metrics['test_accuracy']:.4f} (loss {metrics['test_loss']:.4f}, "
        f"{metrics['test_images']} images)"
        + (f"; ensemble of the {ensemble['k']} best trials: {ensemble['test_accuracy']:.4f} "
           f"(loss {ensemble['test_loss']:.4f})" if ensemble else ""),
        f"  trial nodes:     {', '.join(node[:12] for node in nodes)}",
        f"  stage times:     {times}",
        f"  report:          {redact(RunFolder(summary.folder).report_file)}",
        f"  artifacts:       {redact(summary.folder)}/ (metrics.json, trials.csv, model/model.keras, tune/, data/, "
        "config.yaml)",
    ]
    return "\n".join(lines)


def _top_trials_table(top: list[dict], indent: str) -> list[str]:
    """The best trials as aligned rows under a header: rank, trial, best validation accuracy, its epoch, epochs
    trained, the searched hyperparameters. Nothing for a single trial: the best trial's line says it all."""
    if len(top) < 2:
        return []
    names = list(dict.fromkeys(name for trial in top for name in trial["hyperparameters"]))
    rows = [["#", "trial", "val acc", "epoch", "epochs", *names]] + [
        [str(rank), trial["trial_id"], f"{trial['best_val_accuracy']:.4f}", str(trial["best_epoch"]),
         str(trial["epochs"]), *(_short(trial["hyperparameters"].get(name)) for name in names)]
        for rank, trial in enumerate(top, start=1)
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    numbers = {0, 2, 3, 4}  # right-aligned
    table = [
        "  ".join(cell.rjust(width) if column in numbers else cell.ljust(width)
                  for column, (cell, width) in enumerate(zip(row, widths))).rstrip()
        for row in rows
    ]
    return [f"  top trials:      {table[0]}"] + [indent + line for line in table[1:]]


_running_stage: str | None = None  # the stage the driver waits for (named in failures that have no task)


@contextmanager
def _stage(name: str, seconds: dict[str, float], records: StageRecords, inputs: StageInputs) -> Iterator[dict]:
    """Times a stage and records it in stages.json: begun on entry, finished (with the outputs the block put into
    the yielded dict) when the block completes."""
    global _running_stage
    log.info("stage %s: started", name)
    _running_stage = name
    records.begin(name, inputs)
    started = time.perf_counter()
    outputs: dict[str, Any] = {}
    yield outputs
    seconds[name] = round(time.perf_counter() - started, 2)
    records.finish(name, inputs, seconds[name], outputs)
    log.info("stage %s: done in %s", name, _duration(seconds[name]))


# the stage each task belongs to, for naming it when it fails
_TASK_STAGES = {
    "download_task": "download", "preprocess_task": "preprocess", "load_splits_task": "preprocess",
    "train_task": "train", "load_outcome_task": "train", "evaluate_task": "evaluate",
}


def _get(ref):
    """ray.get, a failed task's error turned into the one line the driver would give (pipeline.task_failures): a
    stage's PipelineError as itself, anything else named with its stage, never a RayTaskError's worker traceback."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as error:
        function = getattr(error, "function_name", None) or ""
        stage = _TASK_STAGES.get(function.rsplit(".", 1)[-1], _running_stage or "a stage")
        failure = task_failure(stage, error)
        if failure is error:
            raise
        raise failure from (None if failure is getattr(error, "cause", None) else error)


def _clip(text: str | None, limit: int = 100) -> str:
    text = (text or "unknown error").strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _duration(seconds: float) -> str:
    return f"{seconds:.1f}s" if seconds < 60 else f"{int(seconds // 60)}m{seconds % 60:02.0f}s"


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
