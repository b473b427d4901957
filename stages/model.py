"""The classic MNIST convolutional network, built from a trial's hyperparameters."""

from __future__ import annotations

import keras
from keras import layers

from stages.hyperparameters import Hyperparameters
from stages.idx import IMAGE_SHAPE, NUM_CLASSES


def build_model(hp: Hyperparameters, *, decay_steps: int | None = None) -> keras.Model:
    """conv 5x5x32 → maxpool → conv 5x5x64 → maxpool → dense 1024 → dense 10, compiled.

    Args:
      hp: the trial's hyperparameters (filters, units, dropout, optimizer...).
      decay_steps: training steps over which a cosine schedule decays to zero; needed when hp.lr_schedule is
        "cosine".

    Returns:
      A compiled model taking uint8 images of shape (n, 28, 28) and returning class probabilities.
    """
    inputs = keras.Input(shape=IMAGE_SHAPE, dtype="uint8", name="image")
    x = layers.Rescaling(1.0 / 255)(inputs)  # scaling lives in the model, so data stays uint8 everywhere else
    x = layers.Reshape((*IMAGE_SHAPE, 1))(x)
    x = layers.Conv2D(hp.conv1_filters, hp.kernel_size, padding="same", activation="relu")(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Conv2D(hp.conv2_filters, hp.kernel_size, padding="same", activation="relu")(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Flatten()(x)
    x = layers.Dropout(hp.dropout)(x)
    x = layers.Dense(hp.dense_units, activation="relu")(x)
    x = layers.Dropout(hp.dropout)(x)
    # float32 output keeps the loss stable under a mixed-precision policy
    outputs = layers.Dense(NUM_CLASSES, activation="softmax", dtype="float32", name="probabilities")(x)
    model = keras.Model(inputs, outputs, name="mnist_cnn")
    model.compile(
        optimizer=make_optimizer(hp, decay_steps=decay_steps),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def make_optimizer(hp: Hyperparameters, *, decay_steps: int | None = None) -> keras.optimizers.Optimizer:
    learning_rate = hp.learning_rate
    if hp.lr_schedule == "cosine":
        if not decay_steps:
            raise ValueError("a cosine learning-rate schedule needs decay_steps")
        learning_rate = keras.optimizers.schedules.CosineDecay(hp.learning_rate, decay_steps)
    weight_decay = hp.weight_decay or None
    if hp.optimizer == "adam":
        return keras.optimizers.Adam(learning_rate, weight_decay=weight_decay)
    if hp.optimizer == "adamw":
        return keras.optimizers.AdamW(learning_rate, weight_decay=hp.weight_decay)
    if hp.optimizer == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate, weight_decay=weight_decay)
    return keras.optimizers.SGD(learning_rate, momentum=0.9, nesterov=True, weight_decay=weight_decay)
