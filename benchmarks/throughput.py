"""Throughput suite: the same CNN on the same images trained by the seed's TF1 loop, plain Keras, several plain Keras
processes side by side, and the pipeline's Tune trials, each layout using every CPU given to the benchmark.

Every side reports each epoch's images/second, so slow epochs show; the first epoch (tracing, warm-up) is reported
but left out of medians.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks import BenchmarkError
from stages.preprocess import Splits

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Measurement:
    """One layout: `processes` trainers side by side with `threads` threads (CPUs) each."""

    name: str
    processes: int
    threads: int
    epoch_rates: list[list[float]]  # images/second, per process, per epoch

    @property
    def steady(self) -> list[list[float]]:
        """Each process's epochs after the first (or the only one)."""
        return [rates[1:] or rates for rates in self.epoch_rates]

    @property
    def median_rate(self) -> float:
        """The median epoch of all processes: one process's usual rate."""
        return statistics.median(rate for rates in self.steady for rate in rates)

    @property
    def aggregate_rate(self) -> float:
        """Images/second of all processes together."""
        return sum(statistics.median(rates) for rates in self.steady)

    @property
    def slowest_epoch(self) -> float:
        return min(rate for rates in self.steady for rate in rates)

    def record(self, plain_keras: Measurement | None = None, tf1: Measurement | None = None) -> dict:
        """The measurement as JSON; with the plain Keras and TF1 layouts of the same processes and threads, the
        ratios to them."""
        row = asdict(self) | {
            "epoch_rates": [[round(rate, 1) for rate in rates] for rates in self.epoch_rates],
            "median_rate": round(self.median_rate, 1),
            "aggregate_rate": round(self.aggregate_rate, 1),
            "slowest_epoch": round(self.slowest_epoch, 1),
            "slowest_epoch_vs_median": round(self.slowest_epoch / self.median_rate, 3),
        }
        if plain_keras is not None:
            row["median_vs_plain_keras"] = round(self.median_rate / plain_keras.median_rate, 3)
            row["slowest_epoch_vs_plain_keras"] = round(self.slowest_epoch / plain_keras.median_rate, 3)
        if tf1 is not None:
            row["median_vs_tf1"] = round(self.median_rate / tf1.median_rate, 3)
        return row


def layouts(cpus: int) -> list[tuple[int, int]]:
    """(processes, threads each) that use all `cpus`: for 2 CPUs, 1x2 and 2x1."""
    return [(cpus // threads, threads) for threads in range(cpus, 0, -1) if cpus % threads == 0]


def plain(kind: str, dataset: Path, *, epochs: int, processes: int, threads: int) -> Measurement:
    """`processes` plain trainers (benchmarks.workers) started together, `threads` threads each."""
    command = [sys.executable, "-m", "benchmarks.workers", kind, str(dataset), str(epochs), str(threads)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    running = [
        subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(processes)
    ]
    rates = []
    for process in running:
        out, err = process.communicate()
        if process.returncode:
            last = (err.strip().splitlines() or ["no error output"])[-1]
            raise BenchmarkError(f"the {kind} worker failed (exit {process.returncode}): {last}")
        rates.append(json.loads(out.splitlines()[-1]))
    name = {"keras": "plain Keras fit", "tf1": "TF1 graph loop (seed)"}[kind]
    return Measurement(name, processes, threads, rates)


def trials(splits: Splits, storage: Path, *, epochs: int, processes: int, threads: int) -> Measurement:
    """`processes` pipeline trials at once (stages.train: Tune, the object store, checkpoints every epoch), `threads`
    CPUs each, in float32 like the plain trainers; the caller has started Ray with all the CPUs."""
    from stages.train import train
    from stages.training.hyperparameters import Hyperparameters
    from stages.training.train_settings import TrainSettings

    settings = TrainSettings(
        epochs=epochs, num_samples=processes, scheduler="fifo", search_space={}, cpus_per_trial=threads,
        mixed_precision=False,
    )
    outcome = train(
        splits.train, splits.validation, base=Hyperparameters(), settings=settings, storage_path=str(storage),
        experiment_name=f"trials-{processes}x{threads}",
    )
    if policies := {row["dtype_policy"] for row in outcome.history} - {"float32"}:
        raise BenchmarkError(f"the trials computed in {', '.join(sorted(policies))}, not float32 as the others do")
    rates: dict[str, list[float]] = {}  # the outcome's history: one row per trial per epoch, in epoch order
    for row in outcome.history:
        rates.setdefault(row["trial_id"], []).append(row["images_per_second"])
    return Measurement("pipeline trials", processes, threads, list(rates.values()))


def input_pipeline_rate(splits: Splits, *, passes: int = 3, batch_size: int = 128) -> float:
    """Images/second that a trial's input pipeline (stages.training.trial.make_dataset: shuffled order, gathered
    batches from arrays in memory, one thread) delivers with no model to feed: what it could give a GPU. The best
    of `passes`."""
    import time

    import numpy as np

    from stages.training.trial import configure_tensorflow, make_dataset

    configure_tensorflow(1)  # a no-op where this process ran TensorFlow before
    best = 0.0
    for epoch in range(passes):
        order = np.random.default_rng(epoch).permutation(len(splits.train))
        started = time.perf_counter()
        for _ in make_dataset(splits.train, batch_size, threads=1, order=order):
            pass
        best = max(best, len(splits.train) / (time.perf_counter() - started))
    return best


def run(splits: Splits, dataset: Path, storage: Path, *, cpus: int, epochs: int) -> list[dict]:
    """Every layout of every trainer, one after the other (never two layouts at once); each layout's three
    trainers back to back, so that a machine whose speed drifts (a shared one) moves all three alike."""
    import ray

    rows = []
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)  # idle meanwhile
    try:
        for processes, threads in layouts(cpus):
            references = {}
            for kind in ("tf1", "keras"):
                references[kind] = plain(kind, dataset, epochs=epochs, processes=processes, threads=threads)
                rows.append(references[kind].record())
                print(_line(references[kind]), flush=True)
            measured = trials(splits, storage, epochs=epochs, processes=processes, threads=threads)
            rows.append(measured.record(references["keras"], references["tf1"]))
            print(_line(measured), flush=True)
    finally:
        ray.shutdown()
    return rows


def _line(measured: Measurement) -> str:
    epochs = [[round(rate) for rate in rates] for rates in measured.epoch_rates]
    layout = f"{measured.processes}x{measured.threads}"
    return f"  {measured.name} {layout}: {measured.aggregate_rate:.0f} images/s in all, epochs {epochs}"
