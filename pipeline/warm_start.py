"""train.warm_start: the trials of earlier runs that seed a new search (SageMaker AMT's warm start, for Tune).

Each earlier run contributes every trial that finished with a validation accuracy: its hyperparameters, its best
validation accuracy and its validation accuracy at the epoch all the run's trials reached, from the run's
metrics.json. How a searcher uses them is
stages.training.search_algorithms.make_searcher's business.
"""

from __future__ import annotations

from pipeline.run_files import read_metrics
from pipeline.run_folder import locate_run
from stages.common.errors import BadInputError
from stages.training.search_algorithms import EarlierTrial, earlier_trials_from


def earlier_trials(runs: list[str], root: str) -> list[EarlierTrial]:
    """Every finished trial of the `runs` (ids under `root`, folders or URIs), in the runs' order.

    Raises:
      BadInputError: a run is not there, or has not finished (no metrics.json).
      DamagedFile: a run's metrics.json is not what evaluate writes.
    """
    trials = []
    for name in runs:
        try:
            run = locate_run(name, root)
        except BadInputError as error:
            raise BadInputError(f"train.warm_start: {error}") from None
        from stages.common import storage

        if not storage.exists(run.metrics_file):
            raise BadInputError(f"train.warm_start: run {name!r} has not finished (no {run.metrics_file})")
        trials += earlier_trials_from(read_metrics(run).trials)
    return trials
