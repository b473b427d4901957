"""The hyperparameters of one trial: the classic MNIST CNN's settings are the defaults.

Every field is one setting of the `model:` config section and one dimension Tune can search. The defaults build
exactly the classic CNN and train it exactly as it always was: no batch normalization, no label smoothing, no
augmentation, Adam at a constant 1e-3. `parameter_count` and `step_bytes` size a model from these fields alone,
without TensorFlow, so that a config can be refused before any trial starts.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from stages.dataset.idx import NUM_CLASSES


def _plus_zero(value: float) -> float:
    """-0.0 passes `ge=0` but would show as -0.0 in the saved config and in what Ray and Keras receive."""
    return value + 0.0  # -0.0 + 0.0 is 0.0; every other float is unchanged


Real = Annotated[float, AfterValidator(_plus_zero)]
"""A float setting: with `allow_inf_nan=False` on the model, finite, and never a negative zero."""


class Hyperparameters(BaseModel):
    """Everything that defines one trial's model and training; Tune searches over any of these fields."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    conv1_filters: int = Field(32, ge=1, le=1024, description="filters of the first 5x5 convolution")
    conv2_filters: int = Field(64, ge=1, le=1024, description="filters of the second 5x5 convolution")
    kernel_size: int = Field(5, ge=1, le=13, description="side of both convolution kernels")
    dense_units: int = Field(1024, ge=1, le=16384, description="units of the hidden dense layer")
    batch_norm: bool = Field(
        False, description="batch normalization after each convolution and the hidden dense layer, before its ReLU"
    )
    dropout: Real = Field(0.0, ge=0.0, lt=1.0, description="dropout rate before each dense layer")
    optimizer: Literal["adam", "adamw", "sgd", "rmsprop"] = Field(
        "adam", description="adam, adamw, sgd (Nesterov momentum 0.9) or rmsprop"
    )
    learning_rate: Real = Field(1e-3, gt=0.0, le=1.0, description="initial (peak, with a warm-up) learning rate")
    lr_schedule: Literal["constant", "cosine", "warmup_cosine", "one_cycle"] = Field(
        "constant",
        description="constant; cosine: decay to zero over the training; warmup_cosine: linear warm-up from zero, then "
        "cosine decay to zero; one_cycle: cosine from learning_rate/25 up to learning_rate, then down to "
        "learning_rate/25/1e4 (1cycle)",
    )
    warmup_fraction: Real = Field(
        0.1, ge=0.0, le=0.5, description="warmup_cosine and one_cycle: share of the training steps spent warming up"
    )
    weight_decay: Real = Field(0.0, ge=0.0, le=1.0, description="decoupled weight decay of the optimizer (0: none)")
    label_smoothing: Real = Field(
        0.0, ge=0.0, lt=0.5, description="share of each label's probability spread over all ten classes (0: none)"
    )
    batch_size: int = Field(128, ge=1, le=65536, description="images per training step")
    augment_shift: Real = Field(
        0.0, ge=0.0, le=0.3, description="random shift of training images, at most this fraction of a side (0: none)"
    )
    augment_rotation: Real = Field(
        0.0, ge=0.0, le=45.0, description="random rotation of training images, at most this many degrees (0: none)"
    )
    augment_zoom: Real = Field(
        0.0, ge=0.0, le=0.3, description="random zoom in or out of training images, at most this fraction (0: none)"
    )


# what decides memory; batch_norm is a bool, which the largest-model check reads as 0 or 1
SIZE_FIELDS = ("conv1_filters", "conv2_filters", "kernel_size", "dense_units", "batch_size", "batch_norm")
AUGMENT_FIELDS = ("augment_shift", "augment_rotation", "augment_zoom")  # each adds one layer when it is not 0


def parameter_count(hp: Hyperparameters) -> int:
    """Weights of the CNN `stages.training.model` builds from `hp` ('same' padding: 28x28, then 14x14, then 7x7
    after pools), as `model.count_params()` counts them.

    With batch_norm, the layers it follows lose their biases and each batch normalization holds four weights per
    channel or unit (scale, offset, moving mean, moving variance). Augmentation layers hold none.
    """
    k2, c1, c2, d = hp.kernel_size**2, hp.conv1_filters, hp.conv2_filters, hp.dense_units
    per_channel = 4 if hp.batch_norm else 1  # batch normalization's four weights, or the bias
    conv1 = k2 * c1 + per_channel * c1
    conv2 = k2 * c1 * c2 + per_channel * c2
    hidden = 7 * 7 * c2 * d + per_channel * d
    return conv1 + conv2 + hidden + (d * NUM_CLASSES + NUM_CLASSES)


def step_bytes(hp: Hyperparameters) -> int:
    """About the memory one training step takes for its activations: each layer's output per image, float32, kept
    for the backward pass and matched by its gradient (3x covers both and the framework's temporaries).

    With batch_norm, a convolution or the hidden dense layer, its normalization and its ReLU are three outputs
    instead of one; each augmentation layer outputs one 28x28 image.
    """
    c1, c2, d = hp.conv1_filters, hp.conv2_filters, hp.dense_units
    per_image = 28 * 28 * c1 + 14 * 14 * c1 + 14 * 14 * c2 + 7 * 7 * c2 + d + 10
    if hp.batch_norm:
        per_image += 2 * (28 * 28 * c1 + 14 * 14 * c2 + d)
    per_image += 28 * 28 * sum(1 for name in AUGMENT_FIELDS if getattr(hp, name))
    return hp.batch_size * per_image * 4 * 3
