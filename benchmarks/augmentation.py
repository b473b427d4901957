"""Training throughput of the classic CNN with augmentation or batch normalization, against the plain CNN.

    python benchmarks/augmentation.py [--steps 200] [--warmup-steps 20] [--rounds 2] [--threads 1 2]

Trains the classic CNN (batch 128) on a slice of real MNIST in three variants: plain; with augmentation (shift 0.1,
rotation 10 degrees, zoom 0.1); with batch normalization. Each thread count runs in its own process (TensorFlow's
thread pools are fixed before its first op, as in a trial). In each round every variant trains --warmup-steps steps
(in the first round they trace the training step), then --steps timed steps; the rounds alternate the variants and
each keeps its best round, since other processes on the machine can only slow a round down. Ratios compare
variants measured in the same process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BATCH_SIZE = 128  # the classic CNN's
VARIANTS = {
    "plain": {},
    "augmented": {"augment_shift": 0.1, "augment_rotation": 10.0, "augment_zoom": 0.1},
    "batch_norm": {"batch_norm": True},
}


def measure(threads: int, mirror: str, steps: int, warmup_steps: int, rounds: int) -> dict[str, float]:
    """Images per second of each variant, trained with `threads` TensorFlow threads (in this process)."""
    from stages.training.trial import configure_tensorflow

    configure_tensorflow(threads)
    import keras

    from stages.dataset.idx import read_labeled_images
    from stages.download import download
    from stages.training.hyperparameters import Hyperparameters
    from stages.training.model import build_model

    with tempfile.TemporaryDirectory(prefix="augmentation-") as cache:
        raw = download([mirror], Path(cache))
        images, labels = read_labeled_images(raw.train_images, raw.train_labels)
    if len(labels) < (warmup_steps + steps) * BATCH_SIZE:
        raise SystemExit(f"{warmup_steps} + {steps} steps need more than MNIST's {len(labels)} training images")

    images, labels = images[: (warmup_steps + steps) * BATCH_SIZE], labels[: (warmup_steps + steps) * BATCH_SIZE]
    models = {}
    for name, settings in VARIANTS.items():
        keras.utils.set_random_seed(0)
        models[name] = build_model(Hyperparameters(**settings))

    best = {name: 0.0 for name in VARIANTS}
    for _ in range(rounds):
        for name, model in models.items():
            step_ends: list[float] = []
            clock = keras.callbacks.LambdaCallback(
                on_train_batch_end=lambda batch, logs: step_ends.append(time.perf_counter())
            )
            model.fit(images, labels, batch_size=BATCH_SIZE, shuffle=False, verbose=0, callbacks=[clock])
            # from the end of the warm-up (the first fit traces the step) to the end of the last step
            best[name] = max(best[name], steps * BATCH_SIZE / (step_ends[-1] - step_ends[warmup_steps - 1]))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps of 128 images per variant and round")
    parser.add_argument("--warmup-steps", type=int, default=20, help="steps of each round before the clock (>= 1)")
    parser.add_argument("--rounds", type=int, default=2, help="measurements per variant; the best one counts")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="TensorFlow thread counts to run")
    parser.add_argument("--mirror", default=str(REPO.parent / "shared" / "mnist"), help="folder of MNIST .gz files")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # internal: measure with this many threads
    args = parser.parse_args()
    if args.steps < 1 or args.warmup_steps < 1 or args.rounds < 1:
        parser.error("--steps, --warmup-steps and --rounds must be at least 1")
    if args.worker:
        print(json.dumps(measure(args.worker, args.mirror, args.steps, args.warmup_steps, args.rounds)))
        return

    print(f"classic CNN, batch {BATCH_SIZE}, {args.steps} steps per measurement, best of {args.rounds} rounds")
    print(f"{'threads':>7}  {'variant':<11} {'images/s':>9}  {'vs plain':>8}")
    for threads in args.threads:
        worker = subprocess.run(
            [sys.executable, __file__, "--worker", str(threads), "--steps", str(args.steps), "--warmup-steps",
             str(args.warmup_steps), "--rounds", str(args.rounds), "--mirror", args.mirror],
            capture_output=True, text=True, cwd=REPO, check=False,
        )
        if worker.returncode:
            raise SystemExit(f"the {threads}-thread measurement failed:\n{worker.stderr[-3000:]}")
        rates = json.loads(worker.stdout.splitlines()[-1])
        for name, rate in rates.items():
            print(f"{threads:>7}  {name:<11} {rate:>9,.0f}  {rate / rates['plain']:>7.2f}x")


if __name__ == "__main__":
    main()
