"""One Tune trial: train the CNN epoch by epoch, report metrics and checkpoint through Tune after each epoch."""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from pathlib import Path

import numpy as np

from stages.hyperparameters import Hyperparameters
from stages.preprocess import LabeledImages

log = logging.getLogger(__name__)

CHECKPOINT_MODEL = "model.keras"
CHECKPOINT_STATE = "state.json"
EVAL_BATCH_SIZE = 1000


def configure_tensorflow(cpus: float, *, mixed_precision: bool = False) -> None:
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
    if mixed_precision:
        import keras

        keras.mixed_precision.set_global_policy("mixed_float16")


def make_dataset(data: LabeledImages, batch_size: int, *, threads: int, shuffle_seed: int | None = None):
    """A tf.data pipeline of (uint8 images, labels) batches that reads `data` in place.

    The arrays may be read-only views into Ray's object store; batches are gathered from them by index, so no
    trial ever copies the whole dataset.
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

    dataset = tf.data.Dataset.range(len(labels))
    if shuffle_seed is not None:
        dataset = dataset.shuffle(len(labels), seed=shuffle_seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size).map(gather_batch).prefetch(2)
    options = tf.data.Options()
    options.threading.private_threadpool_size = threads
    options.threading.max_intra_op_parallelism = 1
    return dataset.with_options(options)


def run_trial(
    config: dict,
    *,
    train_data: LabeledImages,
    validation_data: LabeledImages,
    epochs: int,
    cpus: float,
    seed: int,
    mixed_precision: bool = False,
) -> None:
    """Tune function trainable. `config` holds one sample of the hyperparameters.

    Reports after every epoch: epoch, train_loss, train_accuracy, val_loss, val_accuracy, images_per_second; and a
    checkpoint holding the model with its optimizer state, so a retried trial continues where it stopped.
    """
    import ray
    from ray import tune

    node_id = ray.get_runtime_context().get_node_id()
    configure_tensorflow(cpus, mixed_precision=mixed_precision)
    import keras

    from stages.model import build_model

    hp = Hyperparameters.model_validate({key: to_python(value) for key, value in config.items()})
    keras.utils.set_random_seed(seed)
    threads = max(1, math.floor(cpus))
    train_batches = make_dataset(train_data, hp.batch_size, threads=threads, shuffle_seed=seed)
    validation_batches = make_dataset(validation_data, EVAL_BATCH_SIZE, threads=threads)

    first_epoch = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            model = keras.models.load_model(Path(folder) / CHECKPOINT_MODEL, safe_mode=True)
            first_epoch = json.loads((Path(folder) / CHECKPOINT_STATE).read_text())["epoch"]
    else:
        model = build_model(hp, decay_steps=epochs * math.ceil(len(train_data) / hp.batch_size))

    for epoch in range(first_epoch, epochs):
        started = time.perf_counter()
        history = model.fit(train_batches, epochs=epoch + 1, initial_epoch=epoch, shuffle=False, verbose=0)
        train_seconds = time.perf_counter() - started
        val_loss, val_accuracy = model.evaluate(validation_batches, verbose=0)
        metrics = {  # in the order Tune's trial table shows them, most important first
            "val_accuracy": float(val_accuracy),
            "val_loss": float(val_loss),
            "train_accuracy": float(history.history["accuracy"][-1]),
            "train_loss": float(history.history["loss"][-1]),
            "epoch": epoch + 1,
            "images_per_second": len(train_data) / train_seconds,
            "node_id": node_id,  # which Ray node trained this epoch (a retried trial may move)
        }
        with tempfile.TemporaryDirectory() as folder:
            model.save(Path(folder) / CHECKPOINT_MODEL)
            (Path(folder) / CHECKPOINT_STATE).write_text(json.dumps({"epoch": epoch + 1, **metrics}))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


def to_python(value):
    """Tune may sample numpy scalars; validated hyperparameters and JSON want Python ones."""
    return value.item() if isinstance(value, np.generic) else value
