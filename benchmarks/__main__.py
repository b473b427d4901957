"""python -m benchmarks: measure the pipeline against plain TensorFlow side by side, print a table, write JSON.

    python -m benchmarks                          # every suite, as benchmarks/README.md describes
    python -m benchmarks --suites throughput --epochs 6 --json throughput.json
    python -m benchmarks --suites pipeline --set data.max_train_images=20000

Suites run one after the other, never side by side, so each measures the whole machine (--cpus of it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SUITES = ("throughput", "pipeline", "schedulers")
# the issue-12 targets, as ratios measured in one invocation (benchmarks/README.md)
MIN_EPOCH_VS_PLAIN_KERAS = 0.9
MIN_TRIALS_VS_TF1, MIN_EPOCH_VS_MEDIAN = 1.0, 0.95  # issue 24: float32 trials against the seed's loop
MIN_USEFUL_TRAINING = 0.85
QUICK_TEST_ACCURACY, QUICK_WALL_SECONDS = 0.99, 240.0
MAX_OVERHEAD_SECONDS = 15.0
QUICK_TUNE_BYTES_BEFORE, MAX_DISK_FRACTION = 301e6, 0.2  # the quick config's tune/ before issue 12 (4 trials)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--suites", default=",".join(SUITES), help=f"comma-separated, of {', '.join(SUITES)}")
    parser.add_argument("--cpus", type=int, default=len(os.sched_getaffinity(0)), help="CPUs to use (all: default)")
    parser.add_argument("--images", type=int, default=12800, help="training images per epoch (throughput, schedulers)")
    parser.add_argument("--validation", type=int, default=2000, help="validation images (throughput, schedulers)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per trainer in the throughput suite")
    parser.add_argument("--search-trials", type=int, default=6, help="trials of each search in the schedulers suite")
    parser.add_argument("--search-epochs", type=int, default=3, help="epochs per trial in the schedulers suite")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "quick.yaml", help="pipeline and schedulers")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting of --config (pipeline and schedulers suites); repeatable")
    parser.add_argument("--mirror", default=str(REPO.parent / "shared" / "mnist"), help="where MNIST comes from")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--work", type=Path, help="keep runs and experiments in this folder (default: a temporary one)")
    args = parser.parse_args(argv)
    args.suites = [name.strip() for name in args.suites.split(",") if name.strip()]
    if unknown := [name for name in args.suites if name not in SUITES]:
        parser.error(f"--suites: unknown suite {unknown[0]!r}; choose from {', '.join(SUITES)}")
    if min(args.cpus, args.images, args.validation, args.epochs, args.search_trials, args.search_epochs) < 1:
        parser.error("--cpus, --images, --validation, --epochs, --search-trials and --search-epochs must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, str(REPO))
    from benchmarks import BenchmarkError
    from stages.common.errors import PipelineError

    try:
        return _run(args)
    except (PipelineError, BenchmarkError) as error:  # a bad config or mirror, a failed run: said in one line
        print(f"benchmarks: {' '.join(str(error).split())}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from pipeline.config_loading import load_config
    from stages.download import download
    from stages.preprocess import manifest, preprocess, save_splits

    config = load_config(args.config, args.overrides)  # refused here, before anything runs, if it is bad
    work = args.work or Path(tempfile.mkdtemp(prefix="mnist-benchmarks-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": machine(), "settings": {
        "cpus": args.cpus, "images": args.images, "validation": args.validation, "epochs": args.epochs,
        "search_trials": args.search_trials, "search_epochs": args.search_epochs,
        "config": str(args.config), "overrides": args.overrides,
    }}
    try:
        cache = work / "cache"
        raw = download([args.mirror], cache).read()
        splits = preprocess(raw, validation_size=args.validation, max_train_images=args.images + args.validation,
                            max_test_images=1000)
        save_splits(splits, manifest(splits, raw, validation_size=args.validation, seed=0), str(work))
        if "throughput" in args.suites:
            from benchmarks import throughput

            print(f"throughput: {args.images} images per epoch, {args.epochs} epochs per trainer", flush=True)
            results["throughput"] = throughput.run(
                splits, work / "dataset.npz", work / "tune", cpus=args.cpus, epochs=args.epochs
            )
            results["input_pipeline_images_per_second"] = round(throughput.input_pipeline_rate(splits), 1)
        if "pipeline" in args.suites:
            from benchmarks import pipeline_run

            print(f"pipeline: mnist-pipeline run --config {args.config} (warm download cache)", flush=True)
            results["pipeline"] = pipeline_run.run(
                args.config, work, mirror=args.mirror, cache=cache, cpus=args.cpus, overrides=args.overrides
            )
        if "schedulers" in args.suites:
            from benchmarks import schedulers

            print(f"schedulers: fifo and asha, {args.search_trials} trials of {args.search_epochs} epochs", flush=True)
            search = config.train.model_copy(update={"num_samples": args.search_trials, "epochs": args.search_epochs})
            results["schedulers"] = schedulers.run(
                splits, work / "tune", config.model_copy(update={"train": search}), cpus=args.cpus
            )
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    results["targets"] = targets(results)
    print(table(results))
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


def machine() -> dict:
    import keras
    import ray
    import tensorflow as tf

    model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")), platform.processor(),
    ) if Path("/proc/cpuinfo").exists() else platform.processor()
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": model,
        "cpus_available": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "tensorflow": tf.__version__, "keras": keras.__version__, "ray": ray.__version__,
    }


def targets(results: dict) -> list[dict]:
    """Each target with what was measured and whether it was met."""
    checks = []

    def check(name: str, measured, met: bool) -> None:
        checks.append({"target": name, "measured": measured, "met": bool(met)})

    trial_rows = [row for row in results.get("throughput", []) if "slowest_epoch_vs_plain_keras" in row]
    for row in trial_rows:
        check(
            f"every epoch of {row['processes']}x{row['threads']} trials >= {MIN_EPOCH_VS_PLAIN_KERAS}x plain Keras",
            row["slowest_epoch_vs_plain_keras"], row["slowest_epoch_vs_plain_keras"] >= MIN_EPOCH_VS_PLAIN_KERAS,
        )
        layout = f"{row['processes']}x{row['threads']}"
        check(f"{layout} trials (float32) >= {MIN_TRIALS_VS_TF1}x the TF1 loop's median epoch",
              row["median_vs_tf1"], row["median_vs_tf1"] >= MIN_TRIALS_VS_TF1)
        check(f"every epoch of {layout} trials >= {MIN_EPOCH_VS_MEDIAN}x their median",
              row["slowest_epoch_vs_median"], row["slowest_epoch_vs_median"] >= MIN_EPOCH_VS_MEDIAN)
    if run := results.get("pipeline"):
        check(f"useful training >= {MIN_USEFUL_TRAINING:.0%} of the run's wall time", run["useful_training_fraction"],
              run["useful_training_fraction"] >= MIN_USEFUL_TRAINING)
        check(f"test accuracy >= {QUICK_TEST_ACCURACY} in <= {QUICK_WALL_SECONDS:.0f} s",
              [run["test_accuracy"], run["wall_seconds"]],
              run["test_accuracy"] >= QUICK_TEST_ACCURACY and run["wall_seconds"] <= QUICK_WALL_SECONDS)
        check(f"overhead outside training <= {MAX_OVERHEAD_SECONDS:.0f} s", run["overhead_outside_training_seconds"],
              run["overhead_outside_training_seconds"] <= MAX_OVERHEAD_SECONDS)
        fraction = run["disk"]["tune_folder_bytes"] / QUICK_TUNE_BYTES_BEFORE
        check(f"tune/ <= {MAX_DISK_FRACTION:.0%} of the quick config's {QUICK_TUNE_BYTES_BEFORE / 1e6:.0f} MB before",
              round(fraction, 3), fraction <= MAX_DISK_FRACTION)
    return checks


def table(results: dict) -> str:
    lines = []
    if rows := results.get("throughput"):
        lines += ["", f"{'trainer':<24}{'layout':>7}{'median/proc':>13}{'all procs':>11}{'slowest':>9}"
                      f"{'vs Keras':>10}{'slowest vs':>12}{'vs TF1':>8}  epochs (images/s)"]
        for row in rows:
            lines.append(
                f"{row['name']:<24}{row['processes']}x{row['threads']:<5}{row['median_rate']:>13.0f}"
                f"{row['aggregate_rate']:>11.0f}{row['slowest_epoch']:>9.0f}"
                f"{row.get('median_vs_plain_keras', ''):>10}{row.get('slowest_epoch_vs_plain_keras', ''):>12}"
                f"{row.get('median_vs_tf1', ''):>8}  "
                + " | ".join(" ".join(f"{rate:.0f}" for rate in rates) for rates in row["epoch_rates"])
            )
    if rate := results.get("input_pipeline_images_per_second"):
        lines.append(f"input pipeline alone (1 thread, data in memory, no model): {rate:.0f} images/s")
    if run := results.get("pipeline"):
        wall = run["wall_seconds"]
        lines += ["", f"pipeline run {run['run_id']}: {wall:.1f} s wall, test accuracy {run['test_accuracy']:.4f}, "
                      f"{run['epochs_trained']} epochs in {run['trial_slots']} trial slots, "
                      f"computing in {' and '.join(run['dtype_policies']) or 'float32'}"]
        parts = run["parts_seconds"].items()
        lines += [f"  {name:<40}{seconds:>8.1f} s {seconds / wall:>6.1%}" for name, seconds in parts]
        disk = {name: value / 1e6 for name, value in run["disk"].items()}  # MB
        lines.append(
            f"  disk: run folder {disk['run_folder_bytes']:.1f} MB, tune/ {disk['tune_folder_bytes']:.1f} MB, "
            f"{run['disk']['checkpoints_kept']} checkpoints kept of {disk['kept_checkpoint_bytes']:.1f} MB; "
            f"written: {disk['written_checkpoint_bytes']:.1f} MB each, {disk['checkpoint_bytes_written']:.1f} MB in all"
        )
    if rows := results.get("schedulers"):
        lines += ["", f"{'scheduler':<11}{'trials':>7}{'epochs':>8}{'best val':>10}{'wall s':>9}{'tune/ MB':>10}"]
        lines += [f"{r['scheduler']:<11}{r['trials']:>7}{r['epochs_trained']:>8}{r['best_val_accuracy']:>10.4f}"
                  f"{r['wall_seconds']:>9.1f}{r['tune_folder_bytes'] / 1e6:>10.1f}" for r in rows]
    if checks := results.get("targets"):
        lines += ["", "targets:"]
        lines += [f"  {'met ' if c['met'] else 'MISS'} {c['target']}: {c['measured']}" for c in checks]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
