"""Scheduler suite: ASHA against FIFO on the same search space, trials and seed (a config's train section), on the
benchmark's slice of MNIST: epochs trained, best validation accuracy, wall time."""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks.pipeline_run import folder_bytes
from pipeline.config import Config
from stages.preprocess import Splits


def run(splits: Splits, storage: Path, config: Config, *, cpus: int) -> list[dict]:
    import ray

    from stages.train import train

    rows = []
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        for scheduler in ("fifo", "asha"):
            settings = config.train.model_copy(update={"scheduler": scheduler})
            started = time.perf_counter()
            outcome = train(
                splits.train, splits.validation, base=config.model, settings=settings, storage_path=str(storage),
                experiment_name=f"scheduler-{scheduler}", seed=config.run.seed,
            )
            rows.append({
                "scheduler": scheduler,
                "trials": len(outcome.trials),
                "epochs_trained": sum(trial.epochs for trial in outcome.trials),
                "best_val_accuracy": round(outcome.best_val_accuracy, 4),
                "wall_seconds": round(time.perf_counter() - started, 1),
                "tune_folder_bytes": folder_bytes(Path(outcome.experiment_path)),
            })
            print(f"  {scheduler}: {rows[-1]}", flush=True)
    finally:
        ray.shutdown()
    return rows
