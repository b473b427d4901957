"""One Tune trial: train the CNN epoch by epoch, report metrics and checkpoint through Tune after each epoch.

A trial is a function of its seed, its hyperparameters and where it starts: the trial's seed comes from the run's
seed and the trial's creation index (`trial_seed`), and everything random in an epoch (the order of the images, the
dropout masks, the augmentations) is drawn from (trial seed, epoch), not from a state that runs on from epoch to
epoch. So a trial restored from the checkpoint of epoch e trains epoch e + 1 exactly as the uninterrupted trial does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

from stages.common.errors import TrainingError
from stages.preprocess import LabeledImages
from stages.training.hyperparameters import Hyperparameters
from stages.training.precision import MixedPrecision, global_dtype_policy, use_dtype_policy
from stages.training.train_settings import RUNGS_KEY

_STATE_ONLY = ("steps_per_epoch", "iterations", "learning_rate")  # in state.json beside the epoch's metrics

log = logging.getLogger(__name__)

CHECKPOINT_MODEL = "model.keras"  # the model with its optimizer state (what evaluate loads)
CHECKPOINT_STATE = "state.json"  # the epoch, the optimizer's position and the epoch's metrics
EVAL_BATCH_SIZE = 1000
MAX_STATE_BYTES = 2**20  # state.json holds a few numbers
# model.keras holds the weights, at most a few optimizer slots per weight (Adam: two) and a small config
MAX_MODEL_COPIES, MAX_MODEL_OVERHEAD_BYTES, MAX_MODEL_FILES = 6, 16 * 2**20, 16
ORDER_STREAM, LAYER_SEED_STREAM = 0, 1  # what each draw from (trial seed, epoch) is for


def configure_tensorflow(cpus: float) -> None:
    """Limits TensorFlow to the CPUs Ray gave this process and lets it share GPUs; must run before any TF op.

    Ray sets OMP_NUM_THREADS, which TensorFlow ignores: without this, every trial on a machine grabs every core
    and concurrent trials slow each other down.
    """
    import tensorflow as tf

    threads = max(1, math.floor(cpus))
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
        for gpu in tf.config.list_physical_devices("GPU"):
            # fractional GPUs: several trials share one card, so none may take all its memory up front
            tf.config.experimental.set_memory_growth(gpu, True)
    except RuntimeError:
        # TensorFlow already ran in this process (a reused Ray worker): it keeps the settings it started with
        log.info("TensorFlow was initialised before; its thread and GPU settings stay as they were")


def trial_key(trial_id: str, trial_dir: str = "") -> int | str:
    """The trial's creation index in its experiment, or its id where Tune gives none.

    Tune's variant generator (grid and random search) names trials `<5 random hex digits>_<index>`; the prefix is new
    in every run, the index is the same in every run with the same settings, and Tuner.restore, retries and PBT keep
    a trial's id. Trials a searcher suggests (Optuna, HyperOpt...) get random ids; their index is in Tune's default
    trial folder name `<trainable>_<id>_<index>_<config>_<date>`. Without either, the id itself is the key: still
    stable across restores, but not across runs.
    """
    if match := re.fullmatch(r".+_(\d+)", trial_id):
        return int(match.group(1))
    if trial_id and (match := re.search(re.escape(trial_id) + r"_(\d+)(?:_|$)", Path(trial_dir).name)):
        return int(match.group(1))
    return trial_id


def trial_seed(run_seed: int, key: int | str) -> int:
    """The seed of one trial: a stable hash of the run's seed and the trial's key, in [0, 2**31).

    sha256, not hash(): Python salts string hashes per process, and the seed must be the same in every process.
    """
    digest = hashlib.sha256(f"{run_seed}/{key}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def epoch_order(seed: int, epoch: int, size: int) -> np.ndarray:
    """The order of the `size` training images in epoch `epoch` (0 for the first): a permutation drawn from
    (seed, epoch) alone, so any epoch's order can be made without making the ones before it."""
    return np.random.default_rng([seed, epoch, ORDER_STREAM]).permutation(size)


def make_dataset(data: LabeledImages, batch_size: int, *, threads: int, order: np.ndarray | None = None):
    """A tf.data pipeline of (uint8 images, labels) batches that reads `data` in place, in `order` (indices into
    `data`) or as it is.

    The arrays may be read-only views into Ray's object store; batches are gathered from them by index, so no
    trial ever copies the whole dataset. The pipeline is sequential (no parallel map), so its batches come in the
    same order every time.
    """
    import tensorflow as tf

    images, labels = data.images, data.labels

    def gather(index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return images[index], labels[index]

    def gather_batch(index):
        batch_images, batch_labels = tf.numpy_function(gather, [index], (tf.uint8, tf.uint8), stateful=False)
        batch_images.set_shape((None, *images.shape[1:]))
        batch_labels.set_shape((None,))
        return batch_images, batch_labels

    if order is None:
        dataset = tf.data.Dataset.range(len(labels))
    else:
        dataset = tf.data.Dataset.from_tensor_slices(np.asarray(order, dtype=np.int64))
    dataset = dataset.batch(batch_size).map(gather_batch).prefetch(2)
    options = tf.data.Options()
    options.threading.private_threadpool_size = threads
    options.threading.max_intra_op_parallelism = 1
    # tf.data's autotuner starts a model thread per iterator, and each epoch's iterator waits for it on destruction:
    # in Tune trials running side by side that wait took 10-30 s at the end of some epochs (benchmarks/ measures it).
    # The pipeline is fixed (prefetch 2, sequential map): there is nothing for the autotuner to tune.
    options.autotune.enabled = False
    return dataset.with_options(options)


def reseed_random_layers(model, seed: int, epoch: int) -> None:
    """Sets the random state of every random layer (dropout, augmentation) to one drawn from (seed, epoch).

    Keras saves no random state with a model (`model.variables` holds it, `model.weights` does not): without this, a
    restored trial would repeat its first epoch's dropout masks and augmentations instead of the ones an
    uninterrupted trial sees.
    """
    weights = {id(weight) for weight in model.weights}
    states = [variable for variable in model.variables if id(variable) not in weights]
    draws = np.random.default_rng([seed, epoch, LAYER_SEED_STREAM]).integers(1, 2**31, size=len(states))
    for state, draw in zip(states, draws):
        state.assign(np.array([draw, 0], dtype=state.dtype))


def run_trial(
    config: dict,
    *,
    train_data: LabeledImages,
    validation_data: LabeledImages,
    epochs: int,
    cpus: float,
    seed: int,
    mixed_precision: MixedPrecision = False,
    fixed_seed: int | None = None,
) -> None:
    """Tune function trainable. `config` holds one sample of the hyperparameters.

    Reports after every epoch: epoch, train_loss, train_accuracy, val_loss, val_accuracy, images_per_second,
    node_id, trial_seed, dtype_policy (what `mixed_precision` came to on the trial's node:
    stages.training.precision) and end_learning_rate (the next step's); and a checkpoint holding the model with its
    optimizer state, so a retried or restored trial continues where it stopped.

    The learning-rate schedule runs over `epochs`, or with successive halving (RUNGS_KEY in `config`, see
    `split_config`) one cycle per rung, the last ending at the trial's current rung; the trial trains on past it
    until the scheduler pauses (a promotion then restores it with a longer config) or stops it.

    The trial's seed is `fixed_seed`, or else `trial_seed(seed, trial_key(...))`: it sets the initial weights and the
    random layers' seeds (through `keras.utils.set_random_seed` before the model is built), and with the epoch the
    order of the images and the random layers' state in that epoch.

    A checkpoint (a retry, Tuner.restore, or PBT's exploit, which brings another trial's checkpoint and a perturbed
    config) goes into a model built from the trial's current config: see `restore_checkpoint`.

    Determinism: on CPU, the same trial (config, seed, data) with the same number of TensorFlow threads gives
    bit-identical metrics every epoch, whether it ran straight or was restored from a checkpoint. The input pipeline
    is sequential, and the CPU kernels this model uses split their work by thread count, not by timing (checked with
    1 and 2 threads), so `tf.config.experimental.enable_op_determinism` is not needed. Not promised: equality across
    thread counts (`cpus`), across CPUs with other vector instructions (oneDNN picks its kernels by CPU), across
    TensorFlow, Keras or NumPy versions, and on GPUs (cuDNN's convolution gradients are not deterministic without op
    determinism). Mixed precision changes the numbers, but bfloat16 on a CPU repeats bit for bit like float32.
    """
    entered = time.perf_counter()
    import ray
    from ray import tune

    node_id = ray.get_runtime_context().get_node_id()
    configure_tensorflow(cpus)
    import keras

    from stages.training.model import (
        build_model,  # also registers the model's own Keras objects, which checkpoints name
    )

    keras.backend.clear_session()  # a reused process (train.reuse_actors): the last trial's model and state go
    policy = use_dtype_policy(mixed_precision)  # after clear_session, which resets the policy to float32
    context = tune.get_context()
    seed_of_trial = fixed_seed if fixed_seed is not None else trial_seed(
        seed, trial_key(context.get_trial_id(), context.get_trial_dir())
    )
    hp, rungs = split_config(config)
    schedule_epochs = rungs[-1] if rungs else epochs
    threads = max(1, math.floor(cpus))
    steps_per_epoch = math.ceil(len(train_data) / hp.batch_size)
    keras.utils.set_random_seed(seed_of_trial)
    model = build_model(
        hp,
        decay_steps=schedule_epochs * steps_per_epoch,
        cycle_ends=[end * steps_per_epoch for end in rungs[:-1]] if rungs else None,
        steps_per_epoch=steps_per_epoch,
    )
    validation_batches = make_dataset(validation_data, EVAL_BATCH_SIZE, threads=threads)

    first_epoch, reached = 0, None
    checkpoint = tune.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            first_epoch = restore_checkpoint(model, Path(folder), steps_per_epoch=steps_per_epoch)
            if rungs and first_epoch >= rungs[-1]:
                reached = _read_state(Path(folder) / CHECKPOINT_STATE)

    startup_seconds = time.perf_counter() - entered  # TensorFlow's import, the model, the restore
    if reached is not None:
        # restored at the end of its rung (a restored experiment starts every waiting trial): its result again, for
        # successive halving to pause it there rather than train past its cycle
        tune.report({**{key: value for key, value in reached.items() if key not in _STATE_ONLY},
                     "repeated": True, "startup_seconds": startup_seconds})
    checkpoint_seconds = 0.0
    for epoch in range(first_epoch, epochs):
        order = epoch_order(seed_of_trial, epoch, len(train_data))
        train_batches = make_dataset(train_data, hp.batch_size, threads=threads, order=order)
        reseed_random_layers(model, seed_of_trial, epoch)
        started = time.perf_counter()
        history = model.fit(train_batches, epochs=epoch + 1, initial_epoch=epoch, shuffle=False, verbose=0)
        train_seconds = time.perf_counter() - started
        val_loss, val_accuracy = model.evaluate(validation_batches, verbose=0)
        validation_seconds = time.perf_counter() - started - train_seconds
        metrics = {  # in the order Tune's trial table shows them, most important first
            "val_accuracy": float(val_accuracy),
            "val_loss": float(val_loss),
            "train_accuracy": float(history.history["accuracy"][-1]),
            "train_loss": float(history.history["loss"][-1]),
            "epoch": epoch + 1,
            "images_per_second": len(train_data) / train_seconds,
            "node_id": node_id,  # which Ray node trained this epoch (a retried trial may move)
            "trial_seed": seed_of_trial,
            "dtype_policy": policy,  # what train.mixed_precision came to on this node
            "end_learning_rate": float(model.optimizer.learning_rate),  # the next step's: ~0 where a cycle ends
            # where the trial's time goes (benchmarks/ adds them up): the first epoch a process trains carries the
            # process's start-up; checkpoint_seconds is the save of the epoch before (this one's is not over yet)
            "startup_seconds": startup_seconds if epoch == first_epoch else 0.0,
            "train_seconds": train_seconds,
            "validation_seconds": validation_seconds,
            "checkpoint_seconds": checkpoint_seconds,
            "reported_at": time.time(),  # wall clock, to line trials up against each other
        }
        state = {
            "epoch": epoch + 1,
            "steps_per_epoch": steps_per_epoch,  # what the optimizer's iterations count in
            "iterations": int(model.optimizer.iterations),
            "learning_rate": float(model.optimizer.learning_rate),  # the rate of the next step
            **metrics,
        }
        saving = time.perf_counter()
        with tempfile.TemporaryDirectory() as folder:
            model.save(Path(folder) / CHECKPOINT_MODEL)
            (Path(folder) / CHECKPOINT_STATE).write_text(json.dumps(state))
            metrics["checkpoint_bytes"] = sum(file.stat().st_size for file in Path(folder).iterdir())
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
        checkpoint_seconds = time.perf_counter() - saving  # the save, its upload to storage and Tune's round trip


def split_config(config: dict) -> tuple[Hyperparameters, list[int]]:
    """A trial's config as its hyperparameters and its rungs (RUNGS_KEY: the epochs at which successive halving
    decides on it, one learning-rate cycle ending at each; empty: one cycle over train.epochs)."""
    plain = {key: to_python(value) for key, value in config.items()}
    rungs = plain.pop(RUNGS_KEY, None) or []
    if not isinstance(rungs, list) or not all(type(end) is int and end > 0 for end in rungs) or rungs != sorted(
        set(rungs)
    ):
        raise TrainingError(f"{RUNGS_KEY} must be increasing epoch numbers, got {rungs!r}")
    return Hyperparameters.model_validate(plain), rungs


def restore_checkpoint(model, folder: Path, *, steps_per_epoch: int) -> int:
    """Loads a trial checkpoint into `model`, built and compiled from the trial's current hyperparameters, which may
    differ from the checkpoint's (PBT perturbs learning_rate, weight_decay, dropout, batch_size...).

    What carries over: the weights (the architecture must be the same); the optimizer's iteration count, so that a
    learning-rate schedule goes on from where it was; and the optimizer's own state (Adam's moments, momentum) when
    the optimizer is of the same kind, else that state starts afresh; all of it also across precisions (a retry on a
    node where `mixed_precision` comes to another policy), where only float16's loss scale may start afresh. What
    does not: the optimizer's learning rate, schedule and weight decay, which are the current config's.

    A batch_size other than the checkpoint's changes the steps per epoch, and with them the schedule's length (its
    decay_steps are epochs x steps per epoch). The iteration count is then rescaled by new / old steps per epoch, so
    that the schedule stays at the same fraction of the training done (checkpoints are written at the end of an
    epoch: epoch / epochs). Adam's bias correction, which also reads the count, barely moves after the first epoch.

    Loading is safe (no code from the checkpoint runs: `safe_mode=True`) and bounded: state.json and model.keras
    (uncompressed) may be no larger than such a checkpoint of this model can be.

    Args:
      model: the trial's compiled model.
      folder: a checkpoint folder that `run_trial` wrote.
      steps_per_epoch: the training steps per epoch at the current batch_size.

    Returns:
      The number of epochs the checkpoint had finished: the index of the next epoch to train.

    Raises:
      TrainingError: the checkpoint is too large, or its model's weights do not fit `model`.
    """
    import keras

    from stages.training.fused_adam import keras_class

    state = _read_state(folder / CHECKPOINT_STATE)
    model_file = folder / CHECKPOINT_MODEL
    limit = MAX_MODEL_COPIES * 4 * model.count_params() + MAX_MODEL_OVERHEAD_BYTES
    _check_archive(model_file, limit)
    with global_dtype_policy(_loading_policy(model_file)):
        saved = keras.models.load_model(model_file, safe_mode=True)

    shapes, saved_shapes = [tuple(w.shape) for w in model.weights], [tuple(w.shape) for w in saved.weights]
    if shapes != saved_shapes:
        raise TrainingError(
            f"the checkpoint in {folder} holds a model of another architecture ({len(saved_shapes)} weights, "
            f"{saved.count_params()} parameters) than this trial's config builds ({len(shapes)} weights, "
            f"{model.count_params()} parameters); only hyperparameters that keep the architecture can change on a "
            "restore"
        )
    for weight, saved_weight in zip(model.weights, saved.weights):
        weight.assign(saved_weight)

    optimizer, saved_optimizer = model.optimizer, saved.optimizer
    optimizer.build(model.trainable_variables)
    if type(optimizer) is not type(saved_optimizer):
        # float16 training wraps the optimizer in a LossScaleOptimizer: between float16 and another precision, the
        # optimizers inside carry over, the loss scale starts afresh
        optimizer, saved_optimizer = _unwrapped(optimizer), _unwrapped(saved_optimizer)
    slots, saved_slots = _optimizer_slots(optimizer), _optimizer_slots(saved_optimizer)
    # Keras's Adam and our fused one hold the same state (a checkpoint from before the fused update)
    if keras_class(optimizer) is keras_class(saved_optimizer) and [tuple(v.shape) for v in slots] == [
        tuple(v.shape) for v in saved_slots
    ]:
        for slot, saved_slot in zip(slots, saved_slots):
            slot.assign(saved_slot)
    else:
        log.info(
            "the checkpoint's optimizer is %s, this trial's %s: its weights and iteration count carry over, "
            "its optimizer state starts afresh",
            type(saved_optimizer).__name__,
            type(optimizer).__name__,
        )
    saved_iterations = int(saved_optimizer.iterations)
    saved_steps = int(state.get("steps_per_epoch") or steps_per_epoch)  # checkpoints from before it was recorded
    optimizer.iterations.assign(round(saved_iterations * steps_per_epoch / saved_steps))
    return int(state["epoch"])


def _loading_policy(model_file: Path) -> str:
    """The global dtype policy under which Keras rebuilds the checkpoint's optimizer as it was saved.

    A model saved in mixed_float16 names its plain optimizer (Adam...) in its config but holds the variables of the
    LossScaleOptimizer that compile wrapped it in, which Keras recreates only under a mixed_float16 global policy;
    any other model, only outside it. Otherwise the saved optimizer state is silently dropped. (The layers keep the
    policies they were saved with either way.)
    """
    try:
        with zipfile.ZipFile(model_file) as archive:  # its size was checked before
            layers = json.loads(archive.read("config.json"))["config"]["layers"]
        dtypes = [layer["config"].get("dtype") for layer in layers]
        policies = {dtype["config"]["name"] for dtype in dtypes if isinstance(dtype, dict)}
    except (KeyError, TypeError, AttributeError, ValueError, zipfile.BadZipFile):
        return "float32"  # not a model this trial wrote: Keras's own load says what is wrong with it
    return "mixed_float16" if "mixed_float16" in policies else "float32"


def _unwrapped(optimizer):
    """The optimizer a LossScaleOptimizer (mixed_float16) wraps; any other optimizer itself."""
    return getattr(optimizer, "inner_optimizer", optimizer)


def _optimizer_slots(optimizer) -> list:
    """The optimizer's variables that hold its state (moments, momentum...), without the iteration count and the
    learning rate, which a restore sets on its own."""
    fixed = {id(optimizer.iterations), id(optimizer.learning_rate)}
    return [variable for variable in optimizer.variables if id(variable) not in fixed]


def _read_state(path: Path) -> dict:
    with path.open("rb") as file:
        text = file.read(MAX_STATE_BYTES + 1)
    if len(text) > MAX_STATE_BYTES:
        raise TrainingError(f"{path} is larger than {MAX_STATE_BYTES} bytes: not a checkpoint state this trial wrote")
    state = json.loads(text)
    if not isinstance(state, dict) or not isinstance(state.get("epoch"), int) or state["epoch"] < 0:
        raise TrainingError(f"{path} names no finished epoch: not a checkpoint state this trial wrote")
    return state


def _check_archive(path: Path, limit: int) -> None:
    """Refuses a model.keras whose size or contents (uncompressed) exceed `limit` bytes, before Keras opens it."""
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except zipfile.BadZipFile as error:
        raise TrainingError(f"{path} is not a Keras model archive: {error}") from error
    size = max(path.stat().st_size, sum(entry.file_size for entry in entries))
    if size > limit or len(entries) > MAX_MODEL_FILES:
        raise TrainingError(
            f"{path} holds {size} bytes in {len(entries)} files; a checkpoint of this trial's model holds at most "
            f"{limit} bytes in {MAX_MODEL_FILES} files"
        )


def to_python(value):
    """Tune may sample numpy scalars; validated hyperparameters and JSON want Python ones."""
    return value.item() if isinstance(value, np.generic) else value
