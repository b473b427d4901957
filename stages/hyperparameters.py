"""The hyperparameters of one trial: the classic MNIST CNN's settings are the defaults."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


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
    dropout: Real = Field(0.0, ge=0.0, lt=1.0, description="dropout rate before each dense layer")
    optimizer: Literal["adam", "adamw", "sgd", "rmsprop"] = Field(
        "adam", description="adam, adamw, sgd (Nesterov momentum 0.9) or rmsprop"
    )
    learning_rate: Real = Field(1e-3, gt=0.0, le=1.0, description="initial learning rate")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="constant, or cosine decay to zero over train.epochs"
    )
    weight_decay: Real = Field(0.0, ge=0.0, le=1.0, description="decoupled weight decay of the optimizer (0: none)")
    batch_size: int = Field(128, ge=1, le=65536, description="images per training step")


SIZE_FIELDS = ("conv1_filters", "conv2_filters", "kernel_size", "dense_units", "batch_size")  # what decides memory


def parameter_count(hp: Hyperparameters) -> int:
    """Weights of the CNN `stages.model` builds from `hp` ('same' padding: 28x28, then 14x14, then 7x7 after pools)."""
    k2, c1, c2, d = hp.kernel_size**2, hp.conv1_filters, hp.conv2_filters, hp.dense_units
    return (k2 * c1 + c1) + (k2 * c1 * c2 + c2) + (7 * 7 * c2 * d + d) + (d * 10 + 10)


def step_bytes(hp: Hyperparameters) -> int:
    """About the memory one training step takes for its activations: each layer's output per image, float32, kept
    for the backward pass and matched by its gradient (3x covers both and the framework's temporaries)."""
    c1, c2, d = hp.conv1_filters, hp.conv2_filters, hp.dense_units
    per_image = 28 * 28 * c1 + 14 * 14 * c1 + 14 * 14 * c2 + 7 * 7 * c2 + d + 10
    return hp.batch_size * per_image * 4 * 3
