"""The trials' child runs on the MLflow server (pipeline.tracking): a Tune callback in the train task.

Every call to the server is made on a thread of the callback's own, in order, so that a slow or lost server never
holds up Tune's loop; a failure is a warning, once, and the search goes on.
"""

from __future__ import annotations

import logging
import os
import queue
import threading

from ray.tune import Callback

from pipeline.tracking import MAX_PARAM_CHARS, PARENT_TAG, TRIAL_ID_TAG, TRIAL_METRICS, TrackingTarget, client_for
from pipeline.tracking import first_line as _first_line
from pipeline.tracking import now_ms as _now_ms
from stages.common.redact import redact

log = logging.getLogger(__name__)

_DRAIN_SECONDS = 60  # what the trials' thread may still take once the search is over


class TrialRuns(Callback):
    """A Tune callback in the train task: a child run per trial (found again when the trial is restored), with its
    hyperparameters as parameters and its epochs' metrics, ended with the trial's outcome."""

    def __init__(self, target: TrackingTarget) -> None:
        self._target = target
        self._queue: queue.Queue | None = None
        self._runs: dict[str, str] = {}

    def __getstate__(self) -> dict:  # Tune pickles its callbacks with the experiment: the target only
        return {"_target": self._target, "_queue": None, "_runs": {}}

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._put(self._start, trial.trial_id, dict(trial.config))

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        metrics = {name: float(result[name]) for name in TRIAL_METRICS if isinstance(result.get(name), (int, float))}
        self._put(self._metrics, trial.trial_id, metrics, int(result.get("training_iteration", 0) or 0))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._put(self._end, trial.trial_id, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._put(self._end, trial.trial_id, "FAILED")

    def on_experiment_end(self, trials, **info) -> None:
        if self._queue is not None:  # what is queued reaches the server (or fails) before the train task returns
            done = threading.Event()
            self._queue.put((None, (done,)))
            if not done.wait(_DRAIN_SECONDS):
                log.warning("tracking: MLflow did not take the trials' last results within %d s", _DRAIN_SECONDS)

    def _put(self, action, *args) -> None:
        if self._queue is None:
            uri = os.environ.get("MLFLOW_TRACKING_URI")
            if not uri:
                return
            self._queue = queue.Queue()
            threading.Thread(target=self._work, args=(client_for(uri), uri), name="mlflow-trials", daemon=True).start()
        self._queue.put((action, args))

    def _work(self, client, uri: str) -> None:
        """The callback's thread: each queued call in order; None marks a drain (its event is set)."""
        warned = False
        while True:
            action, args = self._queue.get()
            if action is None:
                args[0].set()
                continue
            try:
                action(client, *args)
            except Exception as error:  # noqa: BLE001 - the server's outage never fails a trial
                if not warned:
                    log.warning("tracking: MLflow at %s failed for the trials (%s); the search goes on", redact(uri),
                                redact(_first_line(error)))
                    warned = True

    def _start(self, client, trial_id: str, config: dict) -> None:
        from mlflow.entities import Param

        if trial_id in self._runs:
            return
        target = self._target
        found = client.search_runs(
            [target.experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{target.parent_run_id}' and tags.`{TRIAL_ID_TAG}` = '{trial_id}'",
            max_results=1,
        )
        if found:
            self._runs[trial_id] = found[0].info.run_id
            client.update_run(self._runs[trial_id], status="RUNNING")
            return
        run = client.create_run(target.experiment_id, run_name=trial_id,
                                tags={PARENT_TAG: target.parent_run_id, TRIAL_ID_TAG: trial_id})
        self._runs[trial_id] = run.info.run_id
        client.log_batch(run.info.run_id, params=[Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in config.items()])

    def _metrics(self, client, trial_id: str, metrics: dict, epoch: int) -> None:
        from mlflow.entities import Metric

        if trial_id in self._runs:
            timestamp = _now_ms()
            client.log_batch(self._runs[trial_id],
                             metrics=[Metric(name, value, timestamp, epoch) for name, value in metrics.items()])

    def _end(self, client, trial_id: str, status: str) -> None:
        if trial_id in self._runs:
            client.set_terminated(self._runs[trial_id], status)
