"""Training throughput: two concurrent 1-CPU Tune trials vs plain Keras with one thread, on the same model.

    python benchmarks/throughput.py [--images 12800] [--epochs 3]

Each side trains the classic CNN on the same slice of real MNIST; the first epoch (tracing, warm-up) is left out.
Plain Keras runs alone in a subprocess limited to one thread; then a real Tune experiment runs two trials at
once on a 2-CPU Ray, each reporting images/second per epoch. With thread pools sized to the trial's CPUs, each trial
should keep >= 0.85x the single-thread rate; oversubscription (every trial grabbing every core) shows as far less.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PLAIN_KERAS = """
import json, sys, time
from stages.trial import configure_tensorflow
configure_tensorflow(1)
from stages.hyperparameters import Hyperparameters
from stages.model import build_model
from stages.preprocess import load_splits
train = load_splits(sys.argv[1]).train
model = build_model(Hyperparameters())
rates = []
for epoch in range(int(sys.argv[2])):
    started = time.perf_counter()
    model.fit(train.images, train.labels, batch_size=128, epochs=1, verbose=0)
    rates.append(len(train) / (time.perf_counter() - started))
print(json.dumps(rates))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=12800, help="training images per epoch")
    parser.add_argument("--epochs", type=int, default=6, help="epochs per side (the first is not counted)")
    parser.add_argument("--mirror", default=str(REPO.parent / "shared" / "mnist"), help="folder of MNIST .gz files")
    args = parser.parse_args()

    from stages.download import download
    from stages.preprocess import manifest, preprocess, save_splits

    work = Path(tempfile.mkdtemp(prefix="throughput-"))
    raw = download([args.mirror], work / "cache").read()
    splits = preprocess(raw, validation_size=1000, max_train_images=args.images + 1000, max_test_images=1000)
    save_splits(splits, manifest(splits, raw, validation_size=1000, seed=0), str(work))

    plain = json.loads(
        subprocess.run(
            [sys.executable, "-c", PLAIN_KERAS, str(work / "dataset.npz"), str(args.epochs)],
            check=True, capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        ).stdout.splitlines()[-1]
    )
    plain_rate = statistics.median(plain[1:])

    import ray

    from stages.hyperparameters import Hyperparameters
    from stages.train import train
    from stages.train_settings import TrainSettings

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    started = time.perf_counter()
    outcome = train(
        splits.train,
        splits.validation,
        base=Hyperparameters(),
        settings=TrainSettings(
            epochs=args.epochs, num_samples=2, scheduler="fifo", search_space={}, cpus_per_trial=1.0
        ),
        storage_path=str(work / "tune"),
    )
    tune_seconds = time.perf_counter() - started
    ray.shutdown()

    trial_rates = []
    for trial_folder in sorted(p for p in Path(outcome.experiment_path).iterdir() if p.is_dir()):
        rows = [json.loads(line) for line in (trial_folder / "result.json").read_text().splitlines()]
        trial_rates.append(statistics.median(row["images_per_second"] for row in rows[1:]))

    report = {
        "images_per_epoch": args.images,
        "plain_keras_1_thread_images_per_second": round(plain_rate, 1),
        "tune_trial_images_per_second": [round(rate, 1) for rate in trial_rates],
        "ratio_per_trial": [round(rate / plain_rate, 3) for rate in trial_rates],
        "aggregate_speedup_vs_one_thread": round(sum(trial_rates) / plain_rate, 3),
        "tune_wall_seconds": round(tune_seconds, 1),
        "target": ">= 0.85 per trial",
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
