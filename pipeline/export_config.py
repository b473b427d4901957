"""`mnist-pipeline export-config RUN`: a config that retrains a finished run's winning trial as a single trial.

The winner is replayed exactly: its hyperparameters, its seed (train.trial_seed), its learning-rate cycles (the rungs
successive halving gave it: train.lr_cycle_ends), up to the epoch of its best checkpoint; and everything else that
decides the numbers as the run had it: the data (run.seed's split), the CPUs per trial (TensorFlow's thread count)
and the precision. On the same machine the retrained trial's validation accuracy is the winner's, to the last digit.
"""

from __future__ import annotations

from pipeline.config_loading import load_run_config
from pipeline.run_files import read_metrics
from pipeline.run_folder import locate_run
from stages.common.errors import BadInputError
from stages.training.hyperparameters import Hyperparameters
from stages.training.train_settings import TrainSettings


def export_config(run_or_id: str, root: str) -> str:
    """The YAML text of the config that retrains the run's winner (with a header saying where it came from).

    Raises:
      BadInputError: no such finished run, or its winner cannot be replayed as one trial (PBT changed its
        hyperparameters while it trained; a run evaluated before trials recorded their seeds).
      DamagedFile: its config.yaml or metrics.json is not what a run writes.
    """
    run = locate_run(run_or_id, root)
    config = load_run_config(run.config_file)
    metrics = read_metrics(run)
    winner = next((trial for trial in metrics.trials if trial.trial_id == metrics.best_trial_id), None)
    if config.train.scheduler == "pbt":
        raise BadInputError(f"run {run.run_id} searched with scheduler pbt, which changed its winner's "
                            "hyperparameters while it trained: it cannot be retrained as one trial")
    if winner is None or winner.trial_seed is None:
        raise BadInputError(f"run {run.run_id}'s metrics.json does not say which seed its winner "
                            f"{metrics.best_trial_id} trained with (evaluated by an older version): re-evaluate it "
                            "with --resume, or retrain its hyperparameters without export-config")
    cycles = winner.rungs or list(config.train.lr_cycle_ends) or [config.train.epochs]
    train = TrainSettings.model_validate({
        **config.train.model_dump(),
        "epochs": metrics.best_epoch,  # the schedule still runs over all its cycles; training stops at the best
        "num_samples": 1,
        "searcher": "random",
        "scheduler": "fifo",
        "search_space": {},
        "include_base_trial": True,
        "max_concurrent_trials": None,
        "time_budget_s": None,
        "target_val_accuracy": None,
        "warm_start": [],  # its starting points would be trials of their own
        "trial_seed": winner.trial_seed,
        "lr_cycle_ends": cycles,
    })
    exported = config.model_copy(update={
        "run": config.run.model_copy(update={"id": None}),
        "model": Hyperparameters.model_validate({**config.model.model_dump(), **metrics.hyperparameters}),
        "train": train,
        "evaluate": config.evaluate.model_copy(update={"ensemble_top_k": None}),
    })
    header = (
        f"# Retrains trial {winner.trial_id} of run {run.run_id} as a single trial, exactly: on the same machine its\n"
        f"# validation accuracy is the run's, {metrics.val_accuracy:.4f} at epoch {metrics.best_epoch} (test accuracy "
        f"{metrics.test_accuracy:.4f}).\n"
        f"#   mnist-pipeline export-config {run.run_id} > winner.yaml && mnist-pipeline run --config winner.yaml\n"
    )
    return header + exported.to_yaml()
