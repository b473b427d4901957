"""The classic CNN: its shapes, parameter count and optimizers."""

import numpy as np
import pytest

from stages.hyperparameters import Hyperparameters
from stages.model import build_model


def test_classic_architecture():
    model = build_model(Hyperparameters())
    assert model.input_shape == (None, 28, 28)
    assert model.output_shape == (None, 10)
    # conv 5x5x1x32 + conv 5x5x32x64 + dense 3136x1024 + dense 1024x10, with biases
    assert model.count_params() == (800 + 32) + (51200 + 64) + (3136 * 1024 + 1024) + (10240 + 10) == 3274634
    kinds = [layer.__class__.__name__ for layer in model.layers]
    assert kinds.count("Conv2D") == 2 and kinds.count("MaxPooling2D") == 2 and kinds.count("Dense") == 2


def test_uint8_images_in_probabilities_out():
    model = build_model(Hyperparameters(conv1_filters=4, conv2_filters=4, dense_units=8))
    probabilities = model.predict(np.full((3, 28, 28), 255, np.uint8), verbose=0)
    assert probabilities.shape == (3, 10)
    assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd", "rmsprop"])
def test_every_optimizer_trains_a_step(optimizer):
    hp = Hyperparameters(conv1_filters=4, conv2_filters=4, dense_units=8, optimizer=optimizer, lr_schedule="cosine")
    model = build_model(hp, decay_steps=10)
    history = model.fit(np.zeros((8, 28, 28), np.uint8), np.arange(8, dtype=np.uint8), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_cosine_schedule_needs_its_length():
    with pytest.raises(ValueError, match="decay_steps"):
        build_model(Hyperparameters(lr_schedule="cosine"))


def test_mixed_precision_computes_in_float16_with_float32_weights_and_output():
    import keras

    from stages.trial import configure_tensorflow

    try:
        configure_tensorflow(1, mixed_precision=True)
        model = build_model(Hyperparameters(conv1_filters=4, conv2_filters=4, dense_units=8))
        conv = next(layer for layer in model.layers if layer.__class__.__name__ == "Conv2D")
        assert conv.compute_dtype == "float16" and conv.variable_dtype == "float32"
        assert model.output.dtype == "float32"
        history = model.fit(np.zeros((8, 28, 28), np.uint8), np.arange(8, dtype=np.uint8), epochs=1, verbose=0)
        assert np.isfinite(history.history["loss"][0])
    finally:
        keras.mixed_precision.set_global_policy("float32")
