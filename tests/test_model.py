"""The CNN: the classic architecture as the default, and what each other hyperparameter adds to it."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from stages.training.hyperparameters import Hyperparameters, parameter_count, step_bytes
from stages.training.model import build_model
from stages.training.precision import cpu_runs_bfloat16

REPO = Path(__file__).resolve().parent.parent
TINY = {"conv1_filters": 4, "conv2_filters": 4, "dense_units": 8}  # seconds to train, same layers as the classic
AUGMENT = {"augment_shift": 0.1, "augment_rotation": 10.0, "augment_zoom": 0.1}
NEEDS_BFLOAT16 = pytest.mark.skipif(not cpu_runs_bfloat16(), reason="this CPU runs no bfloat16 kernels (no AVX-512)")
CLASSIC_LAYERS = [
    "InputLayer", "Rescaling", "Reshape", "Conv2D", "MaxPooling2D", "Conv2D", "MaxPooling2D", "Flatten", "Dropout",
    "Dense", "Dropout", "Dense",
]


@pytest.fixture(scope="module")
def digits(raw_files):
    """The first 256 real MNIST training images (uint8, (n, 28, 28)) and their labels."""
    from stages.dataset.idx import read_labeled_images

    images, labels = read_labeled_images(raw_files.train_images, raw_files.train_labels)
    return images[:256].copy(), labels[:256].copy()


def kinds(model) -> list[str]:
    return [layer.__class__.__name__ for layer in model.layers]


def learning_rate_now(optimizer) -> float:
    """The optimizer's learning rate at its iteration counter (a schedule's value there)."""
    from keras import ops

    return float(ops.convert_to_numpy(optimizer.learning_rate))


def weights_after_training(hp: Hyperparameters, images, labels, *, seed: int, epochs: int = 1) -> list[np.ndarray]:
    import keras

    keras.utils.set_random_seed(seed)
    model = build_model(hp, decay_steps=epochs * math.ceil(len(labels) / hp.batch_size))
    model.fit(images, labels, batch_size=hp.batch_size, epochs=epochs, shuffle=True, verbose=0)
    return model.get_weights()


def test_classic_architecture():
    model = build_model(Hyperparameters())
    assert model.input_shape == (None, 28, 28)
    assert model.output_shape == (None, 10)
    # conv 5x5x1x32 + conv 5x5x32x64 + dense 3136x1024 + dense 1024x10, with biases
    assert model.count_params() == (800 + 32) + (51200 + 64) + (3136 * 1024 + 1024) + (10240 + 10) == 3274634
    assert kinds(model) == CLASSIC_LAYERS  # no batch normalization, no augmentation layer
    assert all(layer.activation.__name__ == "relu" for layer in model.layers[3:6:2] + [model.layers[9]])
    assert all(layer.use_bias for layer in model.layers if hasattr(layer, "use_bias"))
    assert model.layers[8].rate == model.layers[10].rate == 0.0
    # Adam at a constant 1e-3 without weight decay, plain sparse cross-entropy
    optimizer = model.optimizer.get_config()
    assert model.optimizer.__class__.__name__ == "FusedAdam"  # Keras's Adam in one fused op (see below)
    assert optimizer["learning_rate"] == pytest.approx(1e-3) and optimizer["weight_decay"] is None
    assert model.loss == "sparse_categorical_crossentropy"


def test_uint8_images_in_probabilities_out():
    model = build_model(Hyperparameters(**TINY))
    probabilities = model.predict(np.full((3, 28, 28), 255, np.uint8), verbose=0)
    assert probabilities.shape == (3, 10)
    assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd", "rmsprop"])
def test_every_optimizer_trains_a_step(optimizer):
    hp = Hyperparameters(**TINY, optimizer=optimizer, lr_schedule="cosine")
    model = build_model(hp, decay_steps=10)
    history = model.fit(np.zeros((8, 28, 28), np.uint8), np.arange(8, dtype=np.uint8), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


@pytest.mark.parametrize("schedule", ["cosine", "warmup_cosine", "one_cycle"])
def test_a_schedule_needs_its_length(schedule):
    with pytest.raises(ValueError, match="decay_steps"):
        build_model(Hyperparameters(lr_schedule=schedule))


def _cosine(start, end, fraction):
    """From start to end along half a cosine wave (PyTorch's cosine annealing)."""
    return end + (start - end) / 2 * (math.cos(math.pi * fraction) + 1)


LR, PEAK = 0.01, 0.01 / 25  # learning_rate, and one_cycle's start
STEPS = [0, 5, 20, 60, 100, 150]  # start, mid warm-up, end of warm-up (20% of 100), mid decay, decay_steps, past it
EXPECTED_RATES = {
    "constant": [LR] * 6,
    "cosine": [LR, _cosine(LR, 0, 0.05), _cosine(LR, 0, 0.2), _cosine(LR, 0, 0.6), 0.0, 0.0],
    "warmup_cosine": [0.0, LR / 4, LR, LR / 2, 0.0, 0.0],  # linear up over 20 steps, cosine down over the other 80
    "one_cycle": [PEAK, _cosine(PEAK, LR, 0.25), LR, _cosine(LR, PEAK / 1e4, 0.5), PEAK / 1e4, PEAK / 1e4],
}


@pytest.mark.parametrize("schedule", sorted(EXPECTED_RATES))
def test_learning_rate_follows_the_schedule_of_the_optimizers_iterations(schedule):
    # warmup_fraction 0.2, not the default 0.1, and 100 steps: ignoring either moves the peak or the end
    hp = Hyperparameters(**TINY, learning_rate=LR, lr_schedule=schedule, warmup_fraction=0.2)
    optimizer = build_model(hp, decay_steps=100).optimizer
    rates = []
    for step in STEPS:
        optimizer.iterations.assign(step)
        rates.append(learning_rate_now(optimizer))
    np.testing.assert_allclose(rates, EXPECTED_RATES[schedule], rtol=1e-5, atol=1e-10)


@pytest.mark.parametrize("schedule", ["warmup_cosine", "one_cycle"])
def test_a_saved_model_goes_on_with_its_schedule_its_loss_and_its_state(schedule, digits, tmp_path):
    import keras

    images, labels = digits[0][:32], digits[1][:32]
    hp = Hyperparameters(
        **TINY, lr_schedule=schedule, warmup_fraction=0.5, label_smoothing=0.1, batch_norm=True, batch_size=8
    )
    keras.utils.set_random_seed(0)
    model = build_model(hp, decay_steps=10)  # warm-up 5 steps
    model.fit(images, labels, batch_size=8, shuffle=False, verbose=0)  # 4 steps: still warming up
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras", safe_mode=True)

    assert int(loaded.optimizer.iterations) == 4
    rate = learning_rate_now(loaded.optimizer)
    assert rate == pytest.approx(learning_rate_now(model.optimizer))
    loaded.optimizer.iterations.assign(0)
    assert learning_rate_now(loaded.optimizer) < rate / 2  # the position, not just the schedule
    loaded.optimizer.iterations.assign(4)
    assert loaded.loss.get_config() == model.loss.get_config()
    # one more epoch from the same state gives the same weights
    model.fit(images, labels, batch_size=8, shuffle=False, verbose=0)
    loaded.fit(images, labels, batch_size=8, shuffle=False, verbose=0)
    for kept, resumed in zip(model.get_weights(), loaded.get_weights(), strict=True):
        np.testing.assert_allclose(resumed, kept, rtol=1e-5, atol=1e-6)


def test_a_checkpoint_loads_in_a_fresh_process_that_imported_the_model_module(digits, tmp_path):
    images, labels = digits[0][:16], digits[1][:16]
    hp = Hyperparameters(**TINY, lr_schedule="one_cycle", label_smoothing=0.2, batch_size=8)
    model = build_model(hp, decay_steps=10)
    model.fit(images, labels, batch_size=8, verbose=0)
    model.save(tmp_path / "model.keras")
    np.savez(tmp_path / "batch.npz", images=images, labels=labels)
    script = """
import json, sys
import keras, numpy as np
import stages.training.model  # registers our schedule and loss, as stages.training.trial does before restoring
model = keras.models.load_model(sys.argv[1] + "/model.keras", safe_mode=True)
before = int(model.optimizer.iterations), float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
batch = np.load(sys.argv[1] + "/batch.npz")
model.fit(batch["images"], batch["labels"], batch_size=8, verbose=0)
print(json.dumps({"before": before, "after": int(model.optimizer.iterations), "loss": type(model.loss).__name__,
                  "smoothing": model.loss.label_smoothing, "schedule": type(model.optimizer._learning_rate).__name__}))
"""
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["before"] == [2, pytest.approx(learning_rate_now(model.optimizer))]
    assert report["after"] == 4
    assert report["loss"] == "SparseCategoricalCrossentropyWithSmoothing" and report["smoothing"] == 0.2
    assert report["schedule"] == "OneCycle"


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd", "rmsprop"])
def test_weight_decay_reaches_the_optimizer_and_shrinks_the_weights(optimizer, digits):
    import keras

    images, labels = digits[0][:16], digits[1][:16]
    models = {}
    for decay in (0.0, 0.1):
        keras.utils.set_random_seed(0)
        hp = Hyperparameters(**TINY, optimizer=optimizer, learning_rate=0.01, weight_decay=decay)
        models[decay] = build_model(hp)
    assert models[0.1].optimizer.weight_decay == pytest.approx(0.1)
    initial = models[0.1].get_weights()
    for model in models.values():
        model.train_on_batch(images, labels)
    # decoupled decay: the same gradient step, and every weight w shrunk by learning_rate * weight_decay * w
    for plain, decayed, start in zip(models[0.0].get_weights(), models[0.1].get_weights(), initial, strict=True):
        np.testing.assert_allclose(plain - decayed, 0.01 * 0.1 * start, rtol=1e-3, atol=1e-7)
    assert any(np.abs(start).max() > 0.01 for start in initial)  # the comparison above is not between zeros


def test_label_smoothing_changes_the_loss_of_a_fixed_batch(digits):
    images, labels = digits[0][:32], digits[1][:32]
    plain = build_model(Hyperparameters(**TINY))
    smoothed = build_model(Hyperparameters(**TINY, label_smoothing=0.2))
    smoothed.set_weights(plain.get_weights())
    probabilities = np.clip(plain.predict(images, verbose=0).astype(np.float64), 1e-7, 1)
    one_hot = np.eye(10)[labels]
    losses = {}
    for name, model, targets in [("plain", plain, one_hot), ("smoothed", smoothed, one_hot * 0.8 + 0.2 / 10)]:
        loss, accuracy = model.evaluate(images, labels, verbose=0)
        assert loss == pytest.approx(np.mean(-(targets * np.log(probabilities)).sum(axis=1)), rel=1e-4)
        assert accuracy == pytest.approx(np.mean(probabilities.argmax(axis=1) == labels))  # still sparse accuracy
        losses[name] = loss
    assert abs(losses["smoothed"] - losses["plain"]) > 1e-3
    assert np.isfinite(smoothed.train_on_batch(images, labels)[0])


def test_batch_norm_normalizes_each_hidden_layer_and_trains(digits):
    import keras

    images, labels = digits
    keras.utils.set_random_seed(0)
    model = build_model(Hyperparameters(**TINY, batch_norm=True, learning_rate=0.01, batch_size=32))
    assert kinds(model)[3:] == [
        "Conv2D", "FusedBatchNormalization", "ReLU", "MaxPooling2D", "Conv2D", "FusedBatchNormalization", "ReLU",
        "MaxPooling2D", "Flatten", "Dropout", "Dense", "FusedBatchNormalization", "ReLU", "Dropout", "Dense",
    ]
    normalized = [model.layers[i] for i in (3, 7, 13)]
    assert not any(layer.use_bias for layer in normalized)
    history = model.fit(images, labels, batch_size=32, epochs=3, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    batch_norm = model.layers[4]
    assert np.abs(batch_norm.moving_mean.numpy()).max() > 0  # the statistics of the training batches
    # inference normalizes with those moving statistics, training with the batch's own
    assert not np.allclose(model(images[:32], training=True), model(images[:32], training=False), atol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=NEEDS_BFLOAT16)])
def test_fused_batch_norm_computes_what_keras_batch_norm_does(dtype):
    """Training output, gradients, moving statistics and inference of the fused layer against Keras's own, from the
    same weights on the same images (channels last); a 2-D input takes Keras's path."""
    import keras
    import tensorflow as tf

    from stages.training.fused_batch_norm import FusedBatchNormalization, keras_layer

    rng = np.random.default_rng(0)
    images = tf.cast(rng.normal(3.0, 2.0, (4, 3, 3, 5)), dtype)  # 36 values a channel: n / (n - 1) shows
    fused, plain = FusedBatchNormalization(momentum=0.9), keras.layers.BatchNormalization(momentum=0.9)
    for layer in (fused, plain):
        layer.build(images.shape)
    fused.set_weights([rng.normal(1, 0.3, 5), rng.normal(0, 0.3, 5), rng.normal(3, 1, 5), rng.uniform(1, 5, 5)])
    plain.set_weights(fused.get_weights())
    tolerance = {"float32": 1e-5, "bfloat16": 2e-2}[dtype]
    upstream = rng.normal(size=images.shape).astype("float32")  # a loss whose gradients are not ~0 by symmetry
    outputs, gradients = [], []
    for layer in (fused, plain):
        with tf.GradientTape() as tape:
            tape.watch(images)
            output = layer(images, training=True)
            loss = tf.reduce_sum(tf.cast(output, "float32") * upstream)
        outputs.append(output)
        gradients.append(tape.gradient(loss, [images, layer.gamma.value, layer.beta.value]))
    np.testing.assert_allclose(*(np.asarray(tf.cast(o, "float32")) for o in outputs), atol=tolerance)
    for ours, keras_own in zip(*gradients, strict=True):
        np.testing.assert_allclose(np.asarray(tf.cast(ours, "float32")), np.asarray(tf.cast(keras_own, "float32")),
                                   atol=tolerance * 10, rtol=tolerance)
    for ours, keras_own in zip(fused.get_weights(), plain.get_weights(), strict=True):
        np.testing.assert_allclose(ours, keras_own, rtol=1e-4 if dtype == "float32" else 1e-2)
    inference = [np.asarray(tf.cast(layer(images, training=False), "float32")) for layer in (fused, plain)]
    np.testing.assert_allclose(*inference, atol=tolerance)
    # the class swap for export: Keras's own class, the same config
    swapped = keras_layer(fused)
    assert type(swapped) is keras.layers.BatchNormalization and swapped.get_config() == fused.get_config()
    flat = tf.cast(rng.normal(3.0, 2.0, (8, 5)), dtype)
    dense_fused, dense_plain = FusedBatchNormalization(), keras.layers.BatchNormalization()
    np.testing.assert_allclose(np.asarray(tf.cast(dense_fused(flat, training=True), "float32")),
                               np.asarray(tf.cast(dense_plain(flat, training=True), "float32")), atol=tolerance)


@pytest.mark.parametrize("optimizer, weight_decay", [("adam", 0.0), ("adam", 0.01), ("adamw", 0.05)])
def test_fused_adam_updates_what_keras_adam_does_in_one_op(optimizer, weight_decay):
    """Five steps of random gradients on a matrix and a vector, under a one-cycle schedule: the fused optimizer
    against Keras's own, from the same weights; and its step is TensorFlow's ResourceApplyAdam, not Keras's ops."""
    import keras
    import tensorflow as tf

    from stages.training.model import make_optimizer

    hp = Hyperparameters(optimizer=optimizer, weight_decay=weight_decay, lr_schedule="one_cycle", learning_rate=0.01)
    fused = make_optimizer(hp, decay_steps=10)
    keras_own = {"adam": keras.optimizers.Adam, "adamw": keras.optimizers.AdamW}[optimizer].from_config(
        fused.get_config()
    )
    assert type(fused).__name__ == {"adam": "FusedAdam", "adamw": "FusedAdamW"}[optimizer]
    rng = np.random.default_rng(0)
    start = [rng.normal(size=(64, 32)).astype("float32"), rng.normal(size=32).astype("float32")]
    variables = {id(opt): [keras.Variable(value) for value in start] for opt in (fused, keras_own)}
    for step in range(5):
        gradients = [rng.normal(size=value.shape).astype("float32") for value in start]
        for opt in (fused, keras_own):
            opt.apply_gradients(zip([tf.constant(g) for g in gradients], variables[id(opt)]))
    for ours, theirs in zip(variables[id(fused)], variables[id(keras_own)], strict=True):
        assert not np.array_equal(np.asarray(ours), start[0] if ours.shape == start[0].shape else start[1])
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(fused.variables, keras_own.variables, strict=True):  # the moments too
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-5, atol=1e-7)

    step = tf.function(lambda grads: fused.apply_gradients(zip(grads, variables[id(fused)])))
    graph = step.get_concrete_function([tf.TensorSpec(value.shape, "float32") for value in start]).graph
    ops = {op.type for op in graph.get_operations()}
    assert "ResourceApplyAdam" in ops, sorted(ops)


def test_an_exported_batch_norm_model_loads_in_plain_keras(digits, tmp_path):
    """Training uses our fused batch normalization, fused Adam, schedules and smoothed loss; the model evaluate
    exports holds Keras's own layers only and no training config, so it loads where this package is not imported,
    and predicts what the trained model predicts."""
    from stages.evaluate import export_model
    from stages.training.precision import in_float32

    images, labels = digits
    hp = Hyperparameters(**TINY, batch_norm=True, batch_size=32, optimizer="adamw", weight_decay=0.01,
                         lr_schedule="one_cycle", label_smoothing=0.1)
    model = build_model(hp, decay_steps=8)
    model.fit(images, labels, batch_size=32, epochs=1, verbose=0)
    export_model(in_float32(model), {}, str(tmp_path))
    np.save(tmp_path / "images.npy", images[:32])
    script = (
        "import sys, keras, numpy as np\n"
        "model = keras.models.load_model(sys.argv[1] + '/model.keras', safe_mode=True)\n"
        "assert not [name for name in sys.modules if name.startswith('stages')]\n"
        "np.save(sys.argv[1] + '/predicted.npy', model.predict(np.load(sys.argv[1] + '/images.npy'), verbose=0))\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "predicted.npy"), model.predict(images[:32], verbose=0), atol=1e-5)


@pytest.mark.parametrize("field", sorted(AUGMENT))
def test_augmentation_changes_training_inputs_but_not_inference(field, digits):
    import keras

    images = digits[0][:16]
    model = build_model(Hyperparameters(**TINY, **{field: AUGMENT[field]}))
    assert kinds(model).count("Reshape") == 1 and len(model.layers) == len(CLASSIC_LAYERS) + 1
    augmented = keras.Model(model.input, model.get_layer(field).output)
    seen = keras.Model(model.input, model.get_layer(field).input)(images)  # scaled to [0, 1], shaped (28, 28, 1)
    assert not np.allclose(augmented(images, training=True), seen, atol=1e-3)
    np.testing.assert_array_equal(augmented(images, training=False), seen)
    # the whole model: training differs (no dropout, no batch norm: only the augmentation), inference is the plain
    # model's with the same weights
    plain = build_model(Hyperparameters(**TINY))
    plain.set_weights(model.get_weights())
    np.testing.assert_array_equal(model(images, training=False), plain(images, training=False))
    assert not np.allclose(model(images, training=True), plain(images, training=True), atol=1e-6)


def test_augmented_training_repeats_exactly_after_the_same_seed(digits):
    images, labels = digits[0][:64], digits[1][:64]
    hp = Hyperparameters(**TINY, **AUGMENT, batch_size=16)
    first = weights_after_training(hp, images, labels, seed=7)
    again = weights_after_training(hp, images, labels, seed=7)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"batch_norm": True},
        {"conv1_filters": 3, "conv2_filters": 5, "kernel_size": 3, "dense_units": 7, "batch_norm": True, **AUGMENT},
        {"conv1_filters": 2, "conv2_filters": 3, "kernel_size": 4, "dense_units": 5, "label_smoothing": 0.1},
        {"conv1_filters": 1, "conv2_filters": 1, "kernel_size": 1, "dense_units": 1, "batch_norm": True},
    ],
)
def test_parameter_count_is_what_keras_counts(settings):
    hp = Hyperparameters(**settings)
    assert parameter_count(hp) == build_model(hp).count_params()


def test_step_bytes_grow_with_batch_norm_and_augmentation():
    classic = Hyperparameters()
    per_image = 28 * 28 * 32 + 14 * 14 * 32 + 14 * 14 * 64 + 7 * 7 * 64 + 1024 + 10
    assert step_bytes(classic) == 128 * per_image * 4 * 3
    assert step_bytes(Hyperparameters(batch_norm=True)) > step_bytes(classic)
    assert step_bytes(Hyperparameters(augment_rotation=5.0)) > step_bytes(classic)


@pytest.mark.parametrize(
    "settings",
    [
        {"warmup_fraction": 0.6}, {"warmup_fraction": -0.1}, {"label_smoothing": 0.5}, {"augment_shift": 0.31},
        {"augment_rotation": 46.0}, {"augment_zoom": -0.1}, {"lr_schedule": "step"}, {"batch_norm": 1},
    ],
)
def test_new_hyperparameters_are_bounded(settings):
    with pytest.raises(ValidationError):
        Hyperparameters(**settings)


@pytest.mark.parametrize(
    "mixed_precision, compute", [("float16", "float16"), pytest.param("bfloat16", "bfloat16", marks=NEEDS_BFLOAT16)]
)
def test_mixed_precision_computes_in_16_bits_with_float32_weights_and_output(mixed_precision, compute):
    import keras

    from stages.training.precision import in_float32, use_dtype_policy

    try:
        assert use_dtype_policy(mixed_precision) == f"mixed_{compute}"
        model = build_model(Hyperparameters(**TINY, batch_norm=True, label_smoothing=0.1, **AUGMENT))
        conv = next(layer for layer in model.layers if layer.__class__.__name__ == "Conv2D")
        assert conv.compute_dtype == compute and conv.variable_dtype == "float32"
        assert model.output.dtype == "float32"
        images = np.random.default_rng(0).integers(0, 256, (8, 28, 28), dtype=np.uint8)
        history = model.fit(images, np.arange(8, dtype=np.uint8), epochs=1, verbose=0)
        assert np.isfinite(history.history["loss"][0])
    finally:
        keras.mixed_precision.set_global_policy("float32")
    # the float32 copy (evaluate, export): the same weights, the same predictions to 16-bit rounding, Keras's layers
    copy = in_float32(model)
    assert {layer.dtype_policy.name for layer in copy.layers} == {"float32"}
    assert "FusedBatchNormalization" not in kinds(copy) and "BatchNormalization" in kinds(copy)
    assert copy.input.dtype == "uint8" and [w.dtype for w in copy.weights] == [w.dtype for w in model.weights]
    np.testing.assert_array_equal(copy.get_weights()[0], model.get_weights()[0])
    np.testing.assert_allclose(copy.predict(images, verbose=0), model.predict(images, verbose=0), atol=0.05)
    plain = build_model(Hyperparameters(**TINY))
    assert in_float32(plain) is plain


AMD_ZEN4 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\nbugs\t\t: none\n"
INTEL_SPR = "flags\t\t: fpu avx2 avx512f amx_tile amx_bf16 amx_int8\n"
SKYLAKE = (
    "flags\t\t: fpu avx2 avx512f avx512dq avx512cd avx512bw avx512vl\n"
    "bugs\t\t: spectre_v1 avx512_bf16_is_not_a_flag_here\n"
)


@pytest.mark.parametrize(
    "cpuinfo, isa_cap, native",
    [
        (AMD_ZEN4, "", True), (INTEL_SPR, "", True), (SKYLAKE, "", False), ("", "", False),
        # ONEDNN_MAX_CPU_ISA below bfloat16 makes oneDNN emulate it
        (AMD_ZEN4, "AVX512_CORE", False), (INTEL_SPR, "avx2", False), (AMD_ZEN4, "AVX512_CORE_BF16", True),
        (INTEL_SPR, "ALL", True),
    ],
)
def test_native_bfloat16_is_read_from_the_cpu_flags_and_onednns_cap(cpuinfo, isa_cap, native):
    from stages.training.precision import cpu_computes_bfloat16, cpu_runs_bfloat16

    assert cpu_computes_bfloat16(cpuinfo, isa_cap) is native
    # emulated with AVX-512 (Skylake, or a cap at AVX512_CORE), not at all below it
    assert cpu_runs_bfloat16(cpuinfo, isa_cap) is (bool(cpuinfo) and isa_cap.upper() not in ("AVX2",))


@pytest.mark.parametrize(
    "isa_cap, mixed_precision, outcome",
    [("AVX2", "bfloat16", "error"), ("AVX2", True, "float32"), ("AVX512_CORE", True, "float32")],
)
def test_a_trial_process_under_a_cpu_cap_keeps_float32_or_refuses_bfloat16(isa_cap, mixed_precision, outcome):
    """What a CPU without bfloat16 (or without AVX-512) does, made real on this one with oneDNN's own cap."""
    script = (
        "import sys\n"
        "from stages.common.errors import TrainingError\n"
        "from stages.training.precision import use_dtype_policy\n"
        "try:\n"
        f"    print(use_dtype_policy({mixed_precision!r}))\n"
        "except TrainingError as error:\n"
        "    print('error:', error)\n"
    )
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": isa_cap, "TF_CPP_MIN_LOG_LEVEL": "3"}
    finished = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    printed = finished.stdout.strip().splitlines()[-1]
    if outcome == "error":
        assert printed.startswith("error: train.mixed_precision: bfloat16 cannot run on this node's CPU")
    else:
        assert printed == outcome


@pytest.mark.parametrize(
    "mixed_precision, gpus, native_cpu, policy",
    [
        (False, [], True, "float32"), (False, [(9, 0)], True, "float32"),
        (True, [], True, "mixed_bfloat16"), (True, [], False, "float32"),
        (True, [(9, 0), (8, 0)], False, "mixed_float16"), (True, [(9, 0), (6, 1)], True, "float32"),
        ("float16", [], False, "mixed_float16"), ("bfloat16", [], False, "mixed_bfloat16"),
        ("bfloat16", [(9, 0)], False, "mixed_bfloat16"),
    ],
)
def test_true_asks_for_16_bits_where_the_hardware_computes_them(monkeypatch, mixed_precision, gpus, native_cpu,
                                                                    policy):
    from stages.training import precision

    # the CPU's answer (read from its flags, tested above) stands in for another machine's
    monkeypatch.setattr(precision, "cpu_computes_bfloat16", lambda: native_cpu)
    assert precision.dtype_policy(mixed_precision, gpu_compute_capabilities=gpus) == policy


@pytest.fixture(scope="module")
def slice_2500(raw_data):
    """A slice as users try things on first: 2,500 training and 500 validation images of real MNIST."""
    from stages.preprocess import preprocess

    splits = preprocess(raw_data, validation_size=500, seed=0, max_train_images=3000, max_test_images=10)
    return splits.train, splits.validation


def test_batch_norm_statistics_keep_up_with_two_epochs_on_a_slice(slice_2500):
    """The quick config's batch-norm CNN, 2 epochs on 2,500 images (20 steps an epoch): with Keras's momentum of 0.99
    the moving statistics lagged so far behind the weights that validation accuracy fell to 0.12-0.17 at epoch 2
    while training accuracy rose; the momentum now follows the steps per epoch."""
    import keras

    from stages.training.model import bn_momentum

    train, validation = slice_2500
    assert len(train) == 2500
    hp = Hyperparameters(batch_norm=True, lr_schedule="one_cycle", warmup_fraction=0.2, dropout=0.3,
                         learning_rate=3e-3)
    steps = math.ceil(len(train) / hp.batch_size)
    assert bn_momentum(steps) == pytest.approx(0.8) and bn_momentum(430) == 0.99 and bn_momentum(None) == 0.99
    keras.utils.set_random_seed(0)
    model = build_model(hp, decay_steps=2 * steps, steps_per_epoch=steps)
    assert {layer.momentum for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)} == {0.8}
    accuracies = []
    for epoch in range(2):
        model.fit(train.images, train.labels, batch_size=hp.batch_size, epochs=epoch + 1, initial_epoch=epoch,
                  verbose=0)
        accuracies.append(model.evaluate(validation.images, validation.labels, verbose=0)[1])
    assert accuracies[0] > 0.7 and accuracies[1] > 0.9 and accuracies[1] > accuracies[0], accuracies


@pytest.mark.parametrize("shape", ["one_cycle", "warmup_cosine", "cosine"])
def test_warm_restarts_run_one_whole_cycle_per_rung(shape):
    """Successive halving's schedule: cycles ending at steps 10 and 40, each warming up (20 %) and decaying over
    its own length; a promoted trial's first cycle is the one it trained before its promotion."""
    from stages.training.model import ONE_CYCLE_DIV_FACTOR, ONE_CYCLE_FINAL_DIV_FACTOR, make_learning_rate

    peak = 1e-3
    hp = Hyperparameters(lr_schedule=shape, learning_rate=peak, warmup_fraction=0.2)
    promoted = make_learning_rate(hp, decay_steps=40, cycle_ends=[10])
    before = make_learning_rate(hp, decay_steps=10, cycle_ends=[])
    rate = {step: float(promoted(step)) for step in (0, 2, 9, 10, 16, 28, 39, 40, 50)}
    assert [float(before(step)) for step in range(10)] == [float(promoted(step)) for step in range(10)]
    start = {"one_cycle": peak / ONE_CYCLE_DIV_FACTOR, "warmup_cosine": 0.0, "cosine": peak}[shape]
    end = {"one_cycle": start / ONE_CYCLE_FINAL_DIV_FACTOR, "warmup_cosine": 0.0, "cosine": 0.0}[shape]
    assert rate[0] == pytest.approx(start, rel=1e-5) and rate[10] == pytest.approx(start, rel=1e-5)  # afresh
    if shape != "cosine":
        assert rate[2] == pytest.approx(peak, rel=1e-5) and rate[16] == pytest.approx(peak, rel=1e-5)  # warm-ups: 2, 6
    assert rate[9] < 0.05 * peak, "the first cycle has decayed by the end of its rung"
    assert rate[16] > rate[28] > rate[39]
    assert rate[40] == pytest.approx(end, abs=1e-12) and rate[50] == pytest.approx(end, abs=1e-12)
