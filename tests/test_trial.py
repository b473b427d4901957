"""One trial, repeatable and restorable: its seed comes from the run's seed and its creation index; a trial restored
from a checkpoint (a retry, PBT's exploit) goes on exactly where it stopped, with the config it is given.

The experiments are real Tune runs of the real `stages.training.trial.run_trial` on 1,000 real MNIST training images
and 500 validation images, with a tiny CNN, sharing one 2-CPU Ray (each trial on 1 CPU); a few tests call the trial's
restore directly on tiny models.
"""

import json
import math
import os
import signal
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import ray
from ray import tune

from stages.common.errors import TrainingError
from stages.training.hyperparameters import Hyperparameters
from stages.training.precision import cpu_runs_bfloat16
from stages.training.trial import (
    CHECKPOINT_MODEL,
    CHECKPOINT_STATE,
    epoch_order,
    make_dataset,
    restore_checkpoint,
    run_trial,
    trial_key,
    trial_seed,
)

pytestmark = pytest.mark.e2e

TRAIN_IMAGES, VALIDATION_IMAGES, EPOCHS, BATCH = 1000, 500, 2, 64
STEPS = math.ceil(TRAIN_IMAGES / BATCH)  # 16 steps per epoch
# dropout and a cosine schedule: a restore that lost the random layers' state or the schedule's position shows
TINY = {"conv1_filters": 4, "conv2_filters": 8, "dense_units": 32, "dropout": 0.25, "batch_size": BATCH}
SCHEDULED = {**TINY, "lr_schedule": "cosine"}
EXACT = ("val_accuracy", "val_loss", "train_accuracy", "train_loss")  # compared bit for bit
PBT_LEARNING_RATE, PBT_BATCH = 0.003, 2 * BATCH  # what PBT's exploit gives the trial it restores
NEEDS_BFLOAT16 = pytest.mark.skipif(not cpu_runs_bfloat16(), reason="this CPU runs no bfloat16 kernels (no AVX-512)")


@pytest.fixture(scope="module")
def ray_local():
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def splits(raw_data):
    from stages.preprocess import preprocess

    data = preprocess(raw_data, validation_size=VALIDATION_IMAGES, max_train_images=TRAIN_IMAGES + VALIDATION_IMAGES,
                      max_test_images=1)
    assert len(data.train) == TRAIN_IMAGES
    return data


class TrialRun(NamedTuple):
    rows: list[dict]  # what the trial reported, one row per epoch, in order
    folder: str
    config: dict  # the last one (PBT changes it)


class Recorder(tune.Callback):
    """Keeps every result as the driver receives it. (Tune's result.json and progress.csv are not enough: a restored
    trial's are replaced by the copies last synced to the storage path, which may lack the latest rows.)

    With `kill_after_first_checkpoint`, it also SIGKILLs each trial's process as Tune takes in its first checkpoint
    (epoch 1), the first time only: Tune then retries the trial from that checkpoint. The trial is waiting in its
    report then (Tune's function trainables report synchronously), so it never starts epoch 2 in the process that
    dies."""

    def __init__(self, *, kill_after_first_checkpoint: bool = False):
        self.rows: dict[str, list[dict]] = {}
        self.kill = kill_after_first_checkpoint

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.rows.setdefault(trial.trial_id, []).append(dict(result))

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        if self.kill and trial.num_failures == 0 and trial.last_result.get("epoch") == 1:
            os.kill(trial.last_result["pid"], signal.SIGKILL)


def run_experiment(
    folder, splits, *, param_space, num_samples, scheduler=None, kill=False, max_failures=0, stop=None,
    mixed_precision=False,
) -> dict[int, TrialRun]:
    """A Tune experiment of the real trial (run seed 0); returns each trial's run by its index."""
    trainable = tune.with_parameters(
        run_trial, train_data=splits.train, validation_data=splits.validation, epochs=EPOCHS, cpus=1, seed=0,
        mixed_precision=mixed_precision,
    )
    recorder = Recorder(kill_after_first_checkpoint=kill)
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1}),
        param_space=param_space,
        tune_config=tune.TuneConfig(metric="val_accuracy", mode="max", num_samples=num_samples, scheduler=scheduler),
        run_config=tune.RunConfig(
            name="tune", storage_path=str(folder), callbacks=[recorder], verbose=0, stop=stop,
            failure_config=tune.FailureConfig(max_failures=max_failures),
        ),
    )
    results = tuner.fit()
    assert not results.errors, results.errors
    trials = {}
    for result in results:
        trial_id = result.metrics["trial_id"]
        trials[int(trial_id.rsplit("_", 1)[1])] = TrialRun(recorder.rows[trial_id], result.path, result.config)
    return trials


@pytest.fixture(scope="module")
def straight(ray_local, splits, tmp_path_factory):
    """Two trials of the same config, 2 epochs each, uninterrupted."""
    return run_experiment(tmp_path_factory.mktemp("straight"), splits, param_space=SCHEDULED, num_samples=2)


@pytest.fixture(scope="module")
def interrupted(ray_local, splits, tmp_path_factory):
    """The same config's first trial, killed after its first epoch and retried from its checkpoint."""
    return run_experiment(
        tmp_path_factory.mktemp("killed"), splits, param_space=SCHEDULED, num_samples=1, kill=True, max_failures=1
    )


def exact(row):
    return {key: row[key] for key in (*EXACT, "epoch", "trial_seed")}


def test_a_trial_repeats_bit_for_bit_and_its_siblings_differ(straight, interrupted):
    rows, sibling = straight[0].rows, straight[1].rows
    assert [row["epoch"] for row in rows] == [1, 2]
    # the same trial (index 0, run seed 0) in another experiment: identical before anything interrupted it
    assert exact(interrupted[0].rows[0]) == exact(rows[0])
    # same config, another index: another seed, so other initial weights, data order and dropout
    assert rows[0]["trial_seed"] == trial_seed(0, 0) and sibling[0]["trial_seed"] == trial_seed(0, 1)
    assert rows[0]["trial_seed"] != sibling[0]["trial_seed"]
    assert all(rows[i][key] != sibling[i][key] for i in range(EPOCHS) for key in ("val_loss", "train_loss"))


def test_a_trial_restored_from_its_checkpoint_goes_on_as_if_never_stopped(straight, interrupted):
    rows, folder = interrupted[0].rows, interrupted[0].folder
    # epoch 1 once, then epoch 2 in a new process: restored from the checkpoint, not started again
    assert [row["epoch"] for row in rows] == [1, 2]
    assert rows[0]["pid"] != rows[1]["pid"]
    # the epoch counter, the order of the images, the dropout masks, Adam's moments and the schedule's position all
    # came back: epoch 2 is bit for bit the uninterrupted trial's
    assert exact(rows[1]) == exact(straight[0].rows[1])
    state = json.loads(open(os.path.join(folder, latest_checkpoint(folder), CHECKPOINT_STATE)).read())
    assert state["epoch"] == 2 and state["iterations"] == 2 * STEPS


@pytest.mark.parametrize("mixed_precision", [False, pytest.param("bfloat16", marks=NEEDS_BFLOAT16), "float16", True])
def test_the_trial_trains_and_checkpoints_in_the_precision_asked_for(ray_local, splits, tmp_path, mixed_precision):
    """Reused trial processes clear Keras's session, which resets the dtype policy: the policy must be set after."""
    from stages.evaluate import load_checkpoint_model
    from stages.training.precision import dtype_policy

    expected = dtype_policy(mixed_precision, gpu_compute_capabilities=[])  # true: what this machine's CPU allows
    trials = run_experiment(tmp_path, splits, param_space=TINY, num_samples=1, mixed_precision=mixed_precision)
    rows, folder = trials[0].rows, trials[0].folder
    assert [row["dtype_policy"] for row in rows] == [expected] * EPOCHS
    assert all(math.isfinite(row["train_loss"]) for row in rows)
    with zipfile.ZipFile(os.path.join(folder, latest_checkpoint(folder), CHECKPOINT_MODEL)) as archive:
        layers = json.loads(archive.read("config.json"))["config"]["layers"]
    conv = next(layer["config"] for layer in layers if layer["class_name"] == "Conv2D")
    policy = conv["dtype"]["config"]["name"] if isinstance(conv["dtype"], dict) else conv["dtype"]
    assert policy == expected
    # evaluate and the export compute in float32 whatever the training's precision
    model = load_checkpoint_model(Path(folder) / latest_checkpoint(folder))
    assert {layer.dtype_policy.name for layer in model.layers} == {"float32"}
    assert model.predict(splits.validation.images[:100], verbose=0).argmax(1).tolist() != [0] * 100


@NEEDS_BFLOAT16
def test_a_bfloat16_trial_repeats_bit_for_bit(ray_local, splits, tmp_path):
    first, second = (
        run_experiment(tmp_path / name, splits, param_space=SCHEDULED, num_samples=1, mixed_precision="bfloat16")
        for name in ("first", "second")
    )
    assert [exact(row) for row in first[0].rows] == [exact(row) for row in second[0].rows]


def latest_checkpoint(folder):
    return sorted(name for name in os.listdir(folder) if name.startswith("checkpoint_"))[-1]


def explore(config):
    """PBT's perturbation, made certain: a new learning rate and batch size."""
    return {**config, "learning_rate": PBT_LEARNING_RATE, "batch_size": PBT_BATCH}


def test_pbt_restores_another_trials_checkpoint_under_the_perturbed_config(ray_local, splits, tmp_path):
    import keras
    from ray.tune.schedulers import PopulationBasedTraining

    pbt = PopulationBasedTraining(
        time_attr="training_iteration", perturbation_interval=1, custom_explore_fn=explore, quantile_fraction=0.5,
        synch=True,
    )
    # stopped by Tune at the last epoch, so that PBT perturbs after epoch 1 only
    trials = run_experiment(tmp_path, splits, param_space={**TINY, "learning_rate": 1e-3}, num_samples=2,
                            scheduler=pbt, stop={"training_iteration": EPOCHS})
    exploited = [index for index, trial in trials.items() if trial.config["learning_rate"] != 1e-3]
    assert len(exploited) == 1, {index: trial.config for index, trial in trials.items()}
    rows, folder = trials[exploited[0]].rows, trials[exploited[0]].folder
    assert trials[exploited[0]].config["batch_size"] == PBT_BATCH
    # the epoch counter went on from the cloned checkpoint's epoch 1; the trial kept its own seed
    assert [row["epoch"] for row in rows] == [1, 2]
    assert rows[0]["trial_seed"] == rows[1]["trial_seed"] == trial_seed(0, exploited[0])

    checkpoint = os.path.join(folder, latest_checkpoint(folder))
    state = json.loads(open(os.path.join(checkpoint, CHECKPOINT_STATE)).read())
    model = keras.models.load_model(os.path.join(checkpoint, CHECKPOINT_MODEL), safe_mode=True)
    steps = math.ceil(TRAIN_IMAGES / PBT_BATCH)
    # epoch 1's steps (16 at batch 64) count as one epoch at the new batch size (8), then epoch 2's 8 steps: the
    # iteration count went on, at the same fraction of the training, and did not restart
    assert state["epoch"] == 2 and state["steps_per_epoch"] == steps
    assert int(model.optimizer.iterations) == state["iterations"] == 2 * steps
    # the perturbed learning rate is the one the optimizer trained with, not the checkpoint's
    assert float(model.optimizer.learning_rate) == pytest.approx(PBT_LEARNING_RATE, rel=1e-6)
    assert state["learning_rate"] == pytest.approx(PBT_LEARNING_RATE, rel=1e-6)
    other = next(index for index in trials if index != exploited[0])
    other_folder = trials[other].folder
    other_state = json.loads(open(os.path.join(other_folder, latest_checkpoint(other_folder), CHECKPOINT_STATE)).read())
    assert other_state["learning_rate"] == pytest.approx(1e-3, rel=1e-6) and other_state["iterations"] == 2 * STEPS


# --- the restore itself, on tiny models without Tune ---


def trained_checkpoint(folder, hp, images, labels, *, epochs=1):
    """What run_trial writes after `epochs` epochs of `hp`."""
    import keras

    from stages.training.model import build_model

    keras.utils.set_random_seed(1)
    model = build_model(hp)
    model.fit(images, labels, batch_size=hp.batch_size, epochs=epochs, shuffle=False, verbose=0)
    folder.mkdir()
    model.save(folder / CHECKPOINT_MODEL)
    steps = math.ceil(len(labels) / hp.batch_size)
    (folder / CHECKPOINT_STATE).write_text(json.dumps({"epoch": epochs, "steps_per_epoch": steps}))
    return model


@pytest.fixture(scope="module")
def digits(splits):
    return splits.train.images[:256], splits.train.labels[:256]


def test_another_optimizer_takes_the_weights_and_the_iteration_count_only(tmp_path, digits):
    from stages.training.model import build_model

    saved = trained_checkpoint(tmp_path / "adam", Hyperparameters(**TINY), *digits)
    model = build_model(Hyperparameters(**{**TINY, "optimizer": "sgd", "learning_rate": 0.05}))
    assert restore_checkpoint(model, tmp_path / "adam", steps_per_epoch=4) == 1
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), saved.get_weights()))
    assert int(model.optimizer.iterations) == 4
    momentums = [v for v in model.optimizer.variables if "momentum" in v.path]
    assert momentums and all(not np.any(np.asarray(v)) for v in momentums)  # SGD's momentum starts afresh
    assert float(model.optimizer.learning_rate) == pytest.approx(0.05)


def test_the_same_optimizer_keeps_its_moments_under_a_new_learning_rate(tmp_path, digits):
    from stages.training.model import build_model

    saved = trained_checkpoint(tmp_path / "adam", Hyperparameters(**TINY), *digits)
    model = build_model(Hyperparameters(**{**TINY, "learning_rate": 0.01}))
    restore_checkpoint(model, tmp_path / "adam", steps_per_epoch=4)
    # Adam's variables: the iteration count, the learning rate, then a momentum and a velocity per weight
    moments = [(v.path.rsplit("_", 1)[-1], np.asarray(v)) for v in model.optimizer.variables[2:]]
    saved_moments = [(v.path.rsplit("_", 1)[-1], np.asarray(v)) for v in saved.optimizer.variables[2:]]
    assert [role for role, _ in moments] == [role for role, _ in saved_moments] == ["momentum", "velocity"] * 8
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(moments, saved_moments))
    assert any(np.any(value) for _, value in moments)
    assert float(model.optimizer.learning_rate) == pytest.approx(0.01)


def test_a_checkpoint_of_keras_own_adam_keeps_its_moments_in_the_fused_one(tmp_path, digits):
    """Checkpoints from before the fused Adam hold keras.optimizers.Adam: the same state, so it carries over."""
    import keras

    from stages.training.model import build_model

    images, labels = digits
    keras.utils.set_random_seed(1)
    saved = build_model(Hyperparameters(**TINY))
    saved.compile(optimizer=keras.optimizers.Adam(1e-3), loss=saved.loss, metrics=["accuracy"])
    saved.fit(images, labels, batch_size=64, epochs=1, shuffle=False, verbose=0)
    (tmp_path / "adam").mkdir()
    saved.save(tmp_path / "adam" / CHECKPOINT_MODEL)
    (tmp_path / "adam" / CHECKPOINT_STATE).write_text(json.dumps({"epoch": 1, "steps_per_epoch": 4}))

    model = build_model(Hyperparameters(**TINY))
    assert type(model.optimizer).__name__ == "FusedAdam"
    restore_checkpoint(model, tmp_path / "adam", steps_per_epoch=4)
    moments = [np.asarray(v) for v in model.optimizer.variables[2:]]
    saved_moments = [np.asarray(v) for v in saved.optimizer.variables[2:]]
    assert len(moments) == 16 and any(np.any(value) for value in moments)
    assert all(np.array_equal(a, b) for a, b in zip(moments, saved_moments, strict=True))


@pytest.mark.parametrize(
    "saved_policy, policy",
    [("mixed_float16", "mixed_float16"), ("mixed_float16", "float32"), ("float32", "mixed_float16"),
     pytest.param("mixed_bfloat16", "mixed_float16", marks=NEEDS_BFLOAT16),
     pytest.param("mixed_bfloat16", "float32", marks=NEEDS_BFLOAT16),
     pytest.param("float32", "mixed_bfloat16", marks=NEEDS_BFLOAT16)],
)
def test_a_checkpoint_restores_its_optimizer_state_across_precisions(tmp_path, digits, saved_policy, policy):
    """A retry may land on a node where train.mixed_precision comes to another policy; float16 wraps the optimizer
    in a LossScaleOptimizer, whose state Keras loads only under a mixed_float16 global policy."""
    import keras

    from stages.training.model import build_model
    from stages.training.precision import global_dtype_policy

    def adam_state(optimizer):
        inner = getattr(optimizer, "inner_optimizer", optimizer)
        return [v.numpy() for v in inner.variables if id(v) != id(inner.learning_rate)]

    with global_dtype_policy(saved_policy):
        saved = trained_checkpoint(tmp_path / "saved", Hyperparameters(**TINY), *digits)
    with global_dtype_policy(policy):
        model = build_model(Hyperparameters(**TINY))
        assert restore_checkpoint(model, tmp_path / "saved", steps_per_epoch=4) == 1
    assert int(model.optimizer.iterations) == int(saved.optimizer.iterations) == 4  # 256 images, batch 64
    restored, expected = adam_state(model.optimizer), adam_state(saved.optimizer)
    assert len(restored) == len(expected) > 2 and any(np.abs(moment).sum() > 0 for moment in expected[1:])
    for moment, saved_moment in zip(restored, expected):
        np.testing.assert_array_equal(moment, saved_moment)
    assert keras.mixed_precision.global_policy().name == "float32"


def test_a_checkpoint_of_another_architecture_is_refused(tmp_path, digits):
    from stages.training.model import build_model

    trained_checkpoint(tmp_path / "small", Hyperparameters(**TINY), *digits)
    model = build_model(Hyperparameters(**{**TINY, "dense_units": 64}))
    with pytest.raises(TrainingError, match="another architecture"):
        restore_checkpoint(model, tmp_path / "small", steps_per_epoch=4)


def test_an_oversized_or_broken_checkpoint_is_refused_before_keras_opens_it(tmp_path, digits):
    from stages.training.model import build_model

    folder = tmp_path / "bloated"
    trained_checkpoint(folder, Hyperparameters(**TINY), *digits)
    with zipfile.ZipFile(folder / CHECKPOINT_MODEL, "a") as archive:  # 64 MiB of zeros, compressed to little
        archive.writestr("padding", bytes(64 * 2**20), compress_type=zipfile.ZIP_DEFLATED)
    model = build_model(Hyperparameters(**TINY))
    with pytest.raises(TrainingError, match="at most"):
        restore_checkpoint(model, folder, steps_per_epoch=4)
    (folder / CHECKPOINT_MODEL).write_bytes(b"not a zip archive")
    with pytest.raises(TrainingError, match="not a Keras model archive"):
        restore_checkpoint(model, folder, steps_per_epoch=4)
    (folder / CHECKPOINT_STATE).write_text(" " * (2**20 + 1))
    with pytest.raises(TrainingError, match="larger than"):
        restore_checkpoint(model, folder, steps_per_epoch=4)


# --- seeds and orders ---


def test_trial_keys_are_creation_indices():
    assert trial_key("3a9f1_00007") == 7
    # a searcher's trial: a random id, its index in Tune's default folder name
    assert trial_key("a1b2c3d4", "/runs/tune/run_trial_a1b2c3d4_12_batch_size=64_2026-01-01_00-00-00") == 12
    assert trial_key("a1b2c3d4", "/runs/tune/custom-name") == "a1b2c3d4"


def test_trial_seeds_depend_on_the_run_seed_and_the_index():
    seeds = {trial_seed(run, index) for run in range(3) for index in range(100)}
    assert len(seeds) == 300 and all(0 <= seed < 2**31 for seed in seeds)
    assert trial_seed(0, 3) == trial_seed(0, 3)


def test_each_epoch_has_its_own_order_made_from_the_seed_alone():
    first, second = epoch_order(5, 0, 1000), epoch_order(5, 1, 1000)
    assert sorted(first) == list(range(1000)) and not np.array_equal(first, second)
    assert np.array_equal(second, epoch_order(5, 1, 1000))
    assert not np.array_equal(first, epoch_order(6, 0, 1000))


def test_the_input_pipeline_runs_without_tf_data_autotuning(splits):
    # with the autotuner, each epoch's iterator waited for its model thread on destruction: 10-30 s lost at the end of
    # some epochs when trials ran side by side (`python -m benchmarks --suites throughput` shows it); the pipeline is
    # fixed anyway (sequential map, prefetch 2)
    dataset = make_dataset(splits.train, BATCH, threads=1, order=np.arange(TRAIN_IMAGES))
    assert dataset.options().autotune.enabled is False
    assert sum(len(labels) for _, labels in dataset) == TRAIN_IMAGES
