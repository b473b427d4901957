"""MLflow tracking, opt-in: a parent run per pipeline run, a child run per trial, the model logged.

The driver opens the parent run before Ray starts (`open_tracking`): a server it cannot reach refuses the run in one
line, or, with `tracking.required: false`, the run goes on untracked after a warning. The train task logs the trials
(pipeline.trial_runs); once the pipeline is over, the driver logs the results, the report and the model into the
parent run (`Tracking.finish`). Whatever fails after the start is a warning: tracking never fails a run.

The server's URI may hold credentials: every message shows it redacted, and it is never saved (not in the run's
config.yaml, nor in Tune's pickled callbacks, which read it from MLFLOW_TRACKING_URI in the train task's process).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from stages.common.errors import BadInputError
from stages.common.redact import redact

log = logging.getLogger(__name__)

RUN_ID_TAG = "mnist_pipeline.run_id"  # the parent run of a pipeline run (a resumed run finds it again)
TRIAL_ID_TAG = "mnist_pipeline.trial_id"  # a trial's child run (a restored trial finds it again)
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own: the UI nests child runs under their parent
TRIAL_METRICS = ("val_accuracy", "val_loss", "train_accuracy", "train_loss", "images_per_second")
# a lost server must cost seconds, not MLflow's default 7 retries with back-off per call
_CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
MAX_PARAM_CHARS = 6000  # MLflow's limit of a parameter's value


@dataclass(frozen=True)
class TrackingTarget:
    """Where the trials' runs go: picklable, without the server's URI (the train task gets it from its env)."""

    experiment_id: str
    parent_run_id: str


def tracking_uri(config) -> str | None:
    """tracking.mlflow_uri, else MLFLOW_TRACKING_URI, else None (no tracking)."""
    return config.tracking.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or None


def client_for(uri: str):
    for name, value in _CLIENT_ENV.items():
        os.environ.setdefault(name, value)
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise BadInputError(
            f"tracking.mlflow_uri={redact(uri)}: MLflow is not installed (pip install 'mnist-pipeline[mlflow]')"
        ) from None
    return MlflowClient(tracking_uri=uri)


class Tracking:
    """The parent run of one pipeline run on an MLflow server."""

    def __init__(self, uri: str, client, experiment_id: str, run_id: str) -> None:
        self.uri, self._client, self.experiment_id, self.run_id = uri, client, experiment_id, run_id
        self._failed_once = False

    @property
    def target(self) -> TrackingTarget:
        return TrackingTarget(self.experiment_id, self.run_id)

    def finish(self, run, summary: dict | None, register_model: str | None, *, stopped: bool = False) -> None:
        """Logs the results, report, metrics and model of a finished pipeline run (summary) and ends the parent run;
        a run that failed (summary None) ends FAILED, one that was stopped KILLED (a resume goes on in it)."""
        if summary is None:
            status = "KILLED" if stopped else "FAILED"
            self._safely("the run's end", lambda: self._client.set_terminated(self.run_id, status))
            return

        def results() -> None:
            from mlflow.entities import Metric

            numbers = {
                "val_accuracy": summary["val_accuracy"], "test_accuracy": summary["test_accuracy"],
                "test_loss": summary.get("test_loss"),
                **{f"stage_seconds_{stage}": seconds for stage, seconds in summary["stage_seconds"].items()},
            }
            timestamp = now_ms()
            self._client.log_batch(self.run_id, metrics=[
                Metric(name, float(value), timestamp, 0) for name, value in numbers.items() if value is not None
            ])
            self._client.set_tag(self.run_id, "best_trial_id", summary["best_trial_id"])

        self._safely("the results", results)
        self._safely("the report and model", lambda: self._log_files(run))
        if register_model:
            self._safely(f"registering the model as {register_model!r}", lambda: self._register(register_model))
        self._safely("the run's end", lambda: self._client.set_terminated(self.run_id, "FINISHED"))

    def _log_files(self, run) -> None:
        import tempfile
        from pathlib import Path

        from stages.common import storage

        with tempfile.TemporaryDirectory() as folder:
            for location, artifact_path in [(run.report_file, None), (run.metrics_file, None),
                                            (run.summary_file, None), (run.config_file, None),
                                            (run.model_file, "model")]:
                if storage.exists(location):
                    local = Path(folder) / storage.name_of(location)
                    local.write_bytes(storage.read_bytes(location))
                    self._client.log_artifact(self.run_id, str(local), artifact_path)

    def _register(self, name: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self._client.create_registered_model(name)
        except MlflowException as error:
            if getattr(error, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise
        source = f"{self._client.get_run(self.run_id).info.artifact_uri}/model"
        version = self._client.create_model_version(name, source, run_id=self.run_id)
        log.info("tracking: the model is version %s of %r", version.version, name)

    def _safely(self, what: str, action) -> None:
        try:
            action()
        except Exception as error:  # noqa: BLE001 - an outage of the server never fails the run
            log.warning("tracking: MLflow at %s: %s failed (%s); the run goes on", redact(self.uri), what,
                        redact(first_line(error)))


def open_tracking(config, run, *, resume: bool) -> Tracking | None:
    """The parent run for `run` (found again when resuming), its config logged as parameters; None without a
    tracking URI, or when the server cannot be reached and tracking.required is false.

    Raises:
      BadInputError: the server cannot be reached (tracking.required), or MLflow is not installed.
    """
    uri = tracking_uri(config)
    if uri is None:
        return None
    client = client_for(uri)
    settings = config.tracking
    try:
        experiment = client.get_experiment_by_name(settings.experiment)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(settings.experiment)
        found = client.search_runs(
            [experiment_id], filter_string=f"tags.`{RUN_ID_TAG}` = '{run.run_id}'", max_results=1
        ) if resume else []
        if found:
            run_id = found[0].info.run_id
            client.update_run(run_id, status="RUNNING")
        else:
            parent = client.create_run(experiment_id, run_name=run.run_id, tags={RUN_ID_TAG: run.run_id})
            run_id = parent.info.run_id
            _log_params(client, run_id, config)
    except Exception as error:  # noqa: BLE001 - any failure to talk to the server is one line
        what = f"tracking.mlflow_uri={redact(uri)}: cannot use MLflow there ({redact(first_line(error))})"
        if settings.required:
            raise BadInputError(what + "; set tracking.required=false to run without it") from None
        log.warning("%s; the run goes on without tracking", what)
        return None
    log.info("tracking: MLflow run %s in experiment %r at %s", run_id, settings.experiment, redact(uri))
    return Tracking(uri, client, experiment_id, run_id)


def _log_params(client, run_id: str, config) -> None:
    """The resolved config as parameters ("train.epochs": "2"), credentials redacted, in MLflow's batches of 100."""
    import yaml
    from mlflow.entities import Param

    from pipeline.config import dotted

    plain = yaml.safe_load(config.to_yaml())  # redacted
    params = [Param(key, str(value)[:MAX_PARAM_CHARS]) for key, value in dotted(plain).items()]
    for start in range(0, len(params), 100):
        client.log_batch(run_id, params=params[start:start + 100])


def now_ms() -> int:
    import time

    return int(time.time() * 1000)


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:300]
