"""The classic MNIST convolutional network, built from a trial's hyperparameters.

The defaults build exactly the classic CNN. The other settings add to it: batch normalization, label smoothing,
learning-rate schedules with a warm-up, and light data augmentation by Keras preprocessing layers, which act only
in training (inference, export and evaluate see the images as they are).

A trial that successive halving promotes from rung to rung trains one learning-rate cycle per rung (`cycle_ends`):
each rung ends annealed, so the rung's ranking compares finished models and a promotion never stretches a schedule
that has already decayed; the next cycle warms up again from the rung's weights (SGDR's warm restarts).

The one-cycle and warm-restart schedules, the label-smoothing loss and the fused batch normalization are our own
Keras objects, registered under the package `mnist_pipeline`: a model saved with its optimizer loads
(`keras.models.load_model(..., safe_mode=True)`) in any process that imported this module, and its schedule goes on
from the saved iteration. The exported model holds Keras's own layers only.
"""

from __future__ import annotations

import math
from typing import Sequence

import keras
from keras import layers, ops

from stages.dataset.idx import IMAGE_SHAPE, NUM_CLASSES
from stages.training.fused_adam import FusedAdam, FusedAdamW
from stages.training.fused_batch_norm import PACKAGE, FusedBatchNormalization
from stages.training.hyperparameters import Hyperparameters

ONE_CYCLE_DIV_FACTOR = 25.0  # one_cycle starts at learning_rate / 25 (PyTorch's OneCycleLR default)
ONE_CYCLE_FINAL_DIV_FACTOR = 1e4  # and ends at learning_rate / 25 / 1e4 (ditto)
DEFAULT_BN_MOMENTUM = 0.99  # Keras's
MIN_BN_MOMENTUM = 0.5  # an epoch of fewer than 8 steps averages over 2


def build_model(
    hp: Hyperparameters,
    *,
    decay_steps: int | None = None,
    cycle_ends: Sequence[int] | None = None,
    steps_per_epoch: int | None = None,
) -> keras.Model:
    """conv 5x5x32 → maxpool → conv 5x5x64 → maxpool → dense 1024 → dense 10, compiled.

    Args:
      hp: the trial's hyperparameters (filters, units, dropout, optimizer, schedule, augmentation...).
      decay_steps: the training's total steps, over which a schedule other than "constant" runs its course;
        needed unless hp.lr_schedule is "constant".
      cycle_ends: steps at which a learning-rate cycle ends and the next begins (warm restarts, WarmRestarts),
        before decay_steps, which ends the last; None: the plain schedule over decay_steps. Successive halving's
        trials always cycle (an empty list for their first rung), so a promoted trial's first cycle is computed
        exactly as it was before its promotion.
      steps_per_epoch: training steps per epoch, which sets batch normalization's momentum (`bn_momentum`); None:
        Keras's default momentum.

    Returns:
      A compiled model taking uint8 images of shape (n, 28, 28) and returning class probabilities.
    """
    inputs = keras.Input(shape=IMAGE_SHAPE, dtype="uint8", name="image")
    x = layers.Rescaling(1.0 / 255)(inputs)  # scaling lives in the model, so data stays uint8 everywhere else
    x = layers.Reshape((*IMAGE_SHAPE, 1))(x)
    for augment in augmentation_layers(hp):
        x = augment(x)
    norm = bn_momentum(steps_per_epoch) if hp.batch_norm else None
    x = _with_relu(x, layers.Conv2D, hp.conv1_filters, hp.kernel_size, padding="same", batch_norm=norm)
    x = layers.MaxPooling2D(2)(x)
    x = _with_relu(x, layers.Conv2D, hp.conv2_filters, hp.kernel_size, padding="same", batch_norm=norm)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Flatten()(x)
    x = layers.Dropout(hp.dropout)(x)
    x = _with_relu(x, layers.Dense, hp.dense_units, batch_norm=norm)
    x = layers.Dropout(hp.dropout)(x)
    # float32 output keeps the loss stable under a mixed-precision policy
    outputs = layers.Dense(NUM_CLASSES, activation="softmax", dtype="float32", name="probabilities")(x)
    model = keras.Model(inputs, outputs, name="mnist_cnn")
    model.compile(
        optimizer=make_optimizer(hp, decay_steps=decay_steps, cycle_ends=cycle_ends),
        loss=make_loss(hp),
        metrics=["accuracy"],
    )
    return model


def bn_momentum(steps_per_epoch: int | None) -> float:
    """Batch normalization's moving-average momentum for epochs of `steps_per_epoch` steps.

    Keras's 0.99 averages over ~100 steps. On a slice of MNIST an epoch is a few dozen steps, so after an epoch or two
    the moving mean and variance used for validation still hold mostly their initial values while the weights have
    moved far (with a one-cycle peak): validation accuracy collapsed to ~0.15 while training accuracy rose. With at
    most a quarter of an epoch's steps as the averaging window the statistics follow the weights on any data size;
    full MNIST epochs (430 steps of 128) keep Keras's 0.99.
    """
    if not steps_per_epoch:
        return DEFAULT_BN_MOMENTUM
    return min(DEFAULT_BN_MOMENTUM, max(MIN_BN_MOMENTUM, 1.0 - 4.0 / steps_per_epoch))


def _with_relu(x, layer_class, *args, batch_norm: float | None, **kwargs):
    """`layer_class(*args, activation="relu")` applied to x; with batch_norm (its momentum), the layer without its
    bias (the normalization's offset takes its place), then batch normalization (fused over the convolutions'
    images), then the ReLU."""
    if batch_norm is None:
        return layer_class(*args, activation="relu", **kwargs)(x)
    x = layer_class(*args, use_bias=False, **kwargs)(x)
    x = FusedBatchNormalization(momentum=batch_norm)(x)
    return layers.ReLU()(x)


def augmentation_layers(hp: Hyperparameters) -> list[keras.layers.Layer]:
    """The random transformations of training images the hyperparameters ask for; none for a setting of 0.

    Keras's random layers transform only when called with training=True, and draw their seeds from Keras's global
    random state: after `keras.utils.set_random_seed`, a build and its training repeat exactly. What a transform
    moves in from outside the image is black (0), like MNIST's background.
    """
    fill = {"fill_mode": "constant", "fill_value": 0.0}
    augment = []
    if hp.augment_rotation:
        augment.append(layers.RandomRotation(hp.augment_rotation / 360, **fill, name="augment_rotation"))
    if hp.augment_zoom:
        augment.append(layers.RandomZoom(hp.augment_zoom, **fill, name="augment_zoom"))
    if hp.augment_shift:
        augment.append(layers.RandomTranslation(hp.augment_shift, hp.augment_shift, **fill, name="augment_shift"))
    return augment


def make_loss(hp: Hyperparameters) -> str | keras.losses.Loss:
    """Cross-entropy against the sparse labels, smoothed when hp.label_smoothing is not 0."""
    if not hp.label_smoothing:
        return "sparse_categorical_crossentropy"
    return SparseCategoricalCrossentropyWithSmoothing(label_smoothing=hp.label_smoothing)


def make_optimizer(
    hp: Hyperparameters, *, decay_steps: int | None = None, cycle_ends: Sequence[int] | None = None
) -> keras.optimizers.Optimizer:
    """The optimizer hp names, at hp's learning rate or schedule, with hp's decoupled weight decay (Adam and AdamW
    in TensorFlow's fused update: see stages.training.fused_adam)."""
    learning_rate = make_learning_rate(hp, decay_steps=decay_steps, cycle_ends=cycle_ends)
    weight_decay = hp.weight_decay or None
    if hp.optimizer == "adam":
        return FusedAdam(learning_rate, weight_decay=weight_decay)
    if hp.optimizer == "adamw":
        return FusedAdamW(learning_rate, weight_decay=hp.weight_decay)
    if hp.optimizer == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate, weight_decay=weight_decay)
    return keras.optimizers.SGD(learning_rate, momentum=0.9, nesterov=True, weight_decay=weight_decay)


def make_learning_rate(
    hp: Hyperparameters, *, decay_steps: int | None = None, cycle_ends: Sequence[int] | None = None
) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """hp.learning_rate itself, or the schedule hp.lr_schedule names over `decay_steps` training steps; with
    `cycle_ends`, one such schedule per cycle (WarmRestarts).

    Each schedule is a function of the optimizer's iteration counter, so a model loaded from a checkpoint goes on
    where it stopped; past decay_steps it keeps its final rate.
    """
    if hp.lr_schedule == "constant":
        return hp.learning_rate
    if not decay_steps:
        raise ValueError(f"a {hp.lr_schedule} learning-rate schedule needs decay_steps (the training's total steps)")
    if cycle_ends is not None:
        ends = sorted({int(end) for end in cycle_ends if 0 < end < decay_steps})
        return WarmRestarts(hp.lr_schedule, hp.learning_rate, [0, *ends, decay_steps], hp.warmup_fraction)
    if hp.lr_schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(hp.learning_rate, decay_steps)
    warmup_steps = round(hp.warmup_fraction * decay_steps)  # at most half of decay_steps: the decay keeps >= 1 step
    if hp.lr_schedule == "warmup_cosine":
        # CosineDecay's decay_steps count from the end of its warm-up
        return keras.optimizers.schedules.CosineDecay(
            0.0, decay_steps - warmup_steps, warmup_target=hp.learning_rate, warmup_steps=warmup_steps
        )
    return OneCycle(hp.learning_rate, decay_steps, warmup_steps)


@keras.saving.register_keras_serializable(package=PACKAGE)
class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
    """Smith's 1cycle learning rate, as PyTorch's OneCycleLR with cosine annealing (without its momentum cycle).

    Cosine from max_learning_rate / div_factor up to max_learning_rate over the first warmup_steps, then cosine down
    to max_learning_rate / div_factor / final_div_factor at total_steps, where it stays.
    """

    def __init__(
        self,
        max_learning_rate: float,
        total_steps: int,
        warmup_steps: int,
        div_factor: float = ONE_CYCLE_DIV_FACTOR,
        final_div_factor: float = ONE_CYCLE_FINAL_DIV_FACTOR,
    ) -> None:
        super().__init__()
        if not 0 <= warmup_steps < total_steps:
            raise ValueError(f"OneCycle needs 0 <= warmup_steps < total_steps, got {warmup_steps} and {total_steps}")
        self.max_learning_rate = max_learning_rate
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.div_factor = div_factor
        self.final_div_factor = final_div_factor

    def __call__(self, step):
        initial = self.max_learning_rate / self.div_factor
        final = initial / self.final_div_factor
        step = ops.minimum(ops.cast(step, "float32"), float(self.total_steps))
        rising = _cosine_between(initial, self.max_learning_rate, step / max(self.warmup_steps, 1))
        falling = _cosine_between(
            self.max_learning_rate, final, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        )
        return ops.where(step < self.warmup_steps, rising, falling)

    def get_config(self) -> dict:
        return {
            "max_learning_rate": self.max_learning_rate,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "div_factor": self.div_factor,
            "final_div_factor": self.final_div_factor,
        }


@keras.saving.register_keras_serializable(package=PACKAGE)
class WarmRestarts(keras.optimizers.schedules.LearningRateSchedule):
    """One cycle of `shape` (cosine, warmup_cosine or one_cycle, as make_learning_rate builds them over a whole
    training) between each pair of consecutive `boundaries` (steps, from 0 to the training's total): at every
    boundary the rate starts its cycle again, warm-up included, scaled to that cycle's length."""

    def __init__(self, shape: str, peak: float, boundaries: list[int], warmup_fraction: float) -> None:
        super().__init__()
        if shape not in ("cosine", "warmup_cosine", "one_cycle"):
            raise ValueError(f"WarmRestarts cycles cosine, warmup_cosine or one_cycle, got {shape!r}")
        if len(boundaries) < 2 or boundaries[0] != 0 or any(a >= b for a, b in zip(boundaries, boundaries[1:])):
            raise ValueError(f"WarmRestarts needs increasing boundaries from 0, got {boundaries}")
        self.shape = shape
        self.peak = peak
        self.boundaries = [int(boundary) for boundary in boundaries]
        self.warmup_fraction = warmup_fraction

    def __call__(self, step):
        bounds = ops.convert_to_tensor(self.boundaries, dtype="float32")
        step = ops.minimum(ops.cast(step, "float32"), bounds[-1])
        cycle = ops.sum(ops.cast(step >= bounds[1:-1], "int32"))  # interior boundaries passed
        start, end = ops.take(bounds, cycle), ops.take(bounds, cycle + 1)
        length, local = end - start, step - start
        if self.shape == "cosine":
            return _cosine_between(self.peak, 0.0, local / length)
        warmup = ops.round(self.warmup_fraction * length)
        if self.shape == "warmup_cosine":
            rising = self.peak * local / ops.maximum(warmup, 1.0)
            falling = _cosine_between(self.peak, 0.0, (local - warmup) / (length - warmup))
        else:
            initial = self.peak / ONE_CYCLE_DIV_FACTOR
            rising = _cosine_between(initial, self.peak, local / ops.maximum(warmup, 1.0))
            falling = _cosine_between(
                self.peak, initial / ONE_CYCLE_FINAL_DIV_FACTOR, (local - warmup) / (length - warmup)
            )
        return ops.where(local < warmup, rising, falling)

    def get_config(self) -> dict:
        return {
            "shape": self.shape,
            "peak": self.peak,
            "boundaries": self.boundaries,
            "warmup_fraction": self.warmup_fraction,
        }


def _cosine_between(start: float, end: float, fraction):
    """From start (fraction 0) to end (fraction 1) along half a cosine wave, as PyTorch's cosine annealing."""
    return end + (start - end) / 2 * (ops.cos(math.pi * fraction) + 1)


@keras.saving.register_keras_serializable(package=PACKAGE)
class SparseCategoricalCrossentropyWithSmoothing(keras.losses.Loss):
    """Cross-entropy of probabilities against integer labels, each label smoothed: the true class gets
    1 - label_smoothing + label_smoothing / classes, every other class label_smoothing / classes.

    Keras 3's SparseCategoricalCrossentropy has no label_smoothing; this one-hot encodes the labels inside the loss,
    so the data stays sparse uint8 (and the "accuracy" metric stays the sparse one).
    """

    def __init__(
        self,
        label_smoothing: float = 0.0,
        reduction: str = "sum_over_batch_size",
        name: str = "sparse_categorical_crossentropy_with_smoothing",
        dtype=None,
    ) -> None:
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.label_smoothing = label_smoothing

    def call(self, y_true, y_pred):
        labels = ops.cast(y_true, "int32")
        if len(labels.shape) == len(y_pred.shape):  # labels shaped (n, 1)
            labels = ops.squeeze(labels, axis=-1)
        one_hot = ops.one_hot(labels, ops.shape(y_pred)[-1], dtype=y_pred.dtype)
        return keras.losses.categorical_crossentropy(one_hot, y_pred, label_smoothing=self.label_smoothing)

    def get_config(self) -> dict:
        return {**super().get_config(), "label_smoothing": self.label_smoothing}
