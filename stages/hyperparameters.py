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
