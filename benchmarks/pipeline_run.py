"""End-to-end suite: one real `mnist-pipeline run` (the quick config unless told otherwise) with a warm download
cache, and where its wall time went, read back from the run folder.

The train stage is broken down by trial slots (trials that can run at once): each slot-second is training at the
full rate, training below it (slow epochs), validation, checkpoint writes (the save, its upload and Tune's round
trip), trial start-up (TensorFlow's import, the model, a restore), or idle (no trial in the slot: Ray starting a
trial's process, the tail of a search where fewer trials remain than slots). The columns come from what each trial
reports per epoch (stages.training.trial): startup_seconds, train_seconds, validation_seconds, checkpoint_seconds,
reported_at.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import yaml

from benchmarks import BenchmarkError

REPO = Path(__file__).resolve().parent.parent


def run(config: Path, work: Path, *, mirror: str, cache: Path, cpus: int, overrides: list[str]) -> dict:
    root = work / "runs"
    command = [
        sys.executable, "-m", "pipeline", "run", "--config", str(config),
        "--set", f"data.mirrors=[{mirror}]", "--set", f"data.cache_dir={cache}", "--set", f"run.root={root}",
        "--set", f"ray.num_cpus={cpus}", "--set", "ray.include_dashboard=false",
        *(part for override in overrides for part in ("--set", override)),
    ]
    started = time.perf_counter()
    finished = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if finished.returncode not in (0, 1):  # 1: a run that missed its min_test_accuracy gate still measured
        last = (finished.stderr.strip().splitlines() or ["no error output"])[-1]
        raise BenchmarkError(f"the pipeline run failed (exit {finished.returncode}): {last}")
    (folder,) = [path.parent for path in root.glob("*/summary.json")]
    return breakdown(folder, wall=wall, cpus=cpus)


def breakdown(folder: Path, *, wall: float, cpus: int) -> dict:
    """Where the wall time of the run in `folder` went, in seconds; the parts add up to `wall`."""
    summary = json.loads((folder / "summary.json").read_text())
    config = yaml.safe_load((folder / "config.yaml").read_text())
    stages = {name: float(seconds) for name, seconds in summary["stage_seconds"].items()}
    rows = list(csv.DictReader((folder / "trials.csv").open()))
    train = _train_breakdown(rows, stages["train"], slots=_slots(config["train"], cpus))
    useful = train["training_at_full_rate"]
    return {
        "run_id": summary["run_id"],
        "wall_seconds": round(wall, 1),
        "test_accuracy": summary["test_accuracy"],
        "useful_training_fraction": round(useful / wall, 3),
        "overhead_outside_training_seconds": round(wall - stages["train"], 1),
        "parts_seconds": {
            "python_and_ray_startup_and_shutdown": round(wall - sum(stages.values()), 1),
            "download": round(stages["download"], 1),
            "preprocess": round(stages["preprocess"], 1),
            **{f"train: {name}": value for name, value in train.items() if name not in ("slots", "epochs")},
            "evaluate_and_report": round(stages["evaluate"], 1),
        },
        "trial_slots": train["slots"],
        "epochs_trained": train["epochs"],
        # what train.mixed_precision came to in the trials (stages.training.precision)
        "dtype_policies": sorted({row["dtype_policy"] for row in rows if row.get("dtype_policy")}),
        "disk": disk(folder, rows),
    }


def _slots(train: dict, cpus: int) -> int:
    """How many trials can run at once."""
    limit = train.get("max_concurrent_trials") or math.inf
    return int(max(1, min(train["num_samples"], limit, cpus // float(train["cpus_per_trial"]) or 1)))


def _train_breakdown(rows: list[dict], seconds: float, *, slots: int) -> dict:
    number = {key: [float(row[key] or 0) for row in rows] for key in (
        "startup_seconds", "train_seconds", "validation_seconds", "checkpoint_seconds", "images_per_second",
        "reported_at",
    )}
    full_rate = statistics.median(number["images_per_second"])
    images = [rate * spent for rate, spent in zip(number["images_per_second"], number["train_seconds"])]
    # an epoch at or above the median rate trained at full rate all along; a slower one, for what the median rate
    # needed: the rest of its time is "below full rate" (never negative)
    at_full_rate = sum(min(spent, count / full_rate) for count, spent in zip(images, number["train_seconds"]))
    trained = sum(number["train_seconds"])
    # a trial's process trains from its first reported epoch to its last: group its rows by process (a restored or
    # retried trial starts a new process, whose first epoch carries start-up seconds)
    segments = defaultdict(list)
    for index, row in enumerate(rows):
        if number["startup_seconds"][index] > 0 or not segments[row["trial_id"]]:
            segments[row["trial_id"]].append([])
        segments[row["trial_id"]][-1].append(index)
    saves = [value for value in number["checkpoint_seconds"] if value > 0]
    last_save = statistics.median(saves) if saves else 0.0  # a process's last save is never reported: its median
    busy = 0.0
    for processes in segments.values():
        for indices in processes:
            first, last = indices[0], indices[-1]
            start = number["reported_at"][first] - sum(
                number[key][first] for key in ("startup_seconds", "train_seconds", "validation_seconds")
            )
            busy += number["reported_at"][last] + last_save - start
    checkpoints = sum(number["checkpoint_seconds"]) + last_save * sum(len(p) for p in segments.values())
    startup, validation = sum(number["startup_seconds"]), sum(number["validation_seconds"])
    parts = {
        "training_at_full_rate": at_full_rate,
        "training_below_full_rate": trained - at_full_rate,
        "validation": validation,
        "checkpoint_writes": checkpoints,
        "trial_startup": startup,
        "other_in_trial": busy - trained - validation - checkpoints - startup,
        "idle_slots": seconds * slots - busy,
    }
    return {name: round(value / slots, 1) for name, value in parts.items()} | {"slots": slots, "epochs": len(rows)}


def disk(folder: Path, rows: list[dict]) -> dict:
    """What the run left on disk, and what its checkpoints wrote (`rows`: its trials.csv)."""
    tune = folder / "tune"
    checkpoints = [path for path in tune.glob("*/checkpoint_*") if path.is_dir()]
    sizes = [folder_bytes(path) for path in checkpoints]
    written = [int(row.get("checkpoint_bytes") or 0) for row in rows]
    return {
        "run_folder_bytes": folder_bytes(folder),
        "tune_folder_bytes": folder_bytes(tune),
        "checkpoints_kept": len(checkpoints),
        "kept_checkpoint_bytes": int(statistics.median(sizes)) if sizes else 0,  # as the finished run keeps them
        "written_checkpoint_bytes": int(statistics.median(written)) if written else 0,  # as trials wrote them
        "checkpoint_bytes_written": sum(written),  # one checkpoint per epoch trained
    }


def folder_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file()) if path.is_dir() else 0
