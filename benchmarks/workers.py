"""The plain-TensorFlow side of the throughput suite, one training process per call:

    python -m benchmarks.workers {keras,tf1} DATASET_NPZ EPOCHS THREADS

Prints one JSON line: the images/second of every epoch. Both train the classic CNN (conv 5x5x32, pool, conv 5x5x64,
pool, dense 1024, dense 10; Adam 1e-3, batch 128) on the dataset's training split, shuffled every epoch.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

BATCH_SIZE, LEARNING_RATE = 128, 1e-3


def keras_rates(images: np.ndarray, labels: np.ndarray, epochs: int, threads: int) -> list[float]:
    """Plain Keras `fit` on in-memory arrays: the pipeline's model, none of its machinery."""
    from stages.training.trial import configure_tensorflow

    configure_tensorflow(threads)
    import keras

    from stages.training.hyperparameters import Hyperparameters
    from stages.training.model import build_model

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            rates.append(len(labels) / (time.perf_counter() - self.started))

    rates: list[float] = []
    keras.utils.set_random_seed(0)
    model = build_model(Hyperparameters())
    model.fit(images, labels, batch_size=BATCH_SIZE, epochs=epochs, shuffle=True, verbose=0, callbacks=[EpochTimer()])
    return rates


def tf1_rates(images: np.ndarray, labels: np.ndarray, epochs: int, threads: int) -> list[float]:
    """The seed project's loop, recreated: TF1 graph mode, placeholders, feed_dict and a Session."""
    import tensorflow as tf

    v1 = tf.compat.v1
    v1.disable_eager_execution()
    v1.set_random_seed(0)
    init = v1.glorot_uniform_initializer()

    def variable(name, shape):
        return v1.get_variable(name, shape, initializer=init if len(shape) > 1 else v1.zeros_initializer())

    x = v1.placeholder(tf.uint8, [None, 28, 28])
    y = v1.placeholder(tf.int64, [None])
    net = tf.reshape(tf.cast(x, tf.float32) / 255.0, [-1, 28, 28, 1])
    for index, (inputs, filters) in enumerate([(1, 32), (32, 64)]):
        kernel, bias = variable(f"conv{index}/w", [5, 5, inputs, filters]), variable(f"conv{index}/b", [filters])
        net = tf.nn.relu(tf.nn.conv2d(net, kernel, strides=1, padding="SAME") + bias)
        net = tf.nn.max_pool2d(net, ksize=2, strides=2, padding="SAME")
    net = tf.reshape(net, [-1, 7 * 7 * 64])
    net = tf.nn.relu(tf.matmul(net, variable("dense/w", [7 * 7 * 64, 1024])) + variable("dense/b", [1024]))
    logits = tf.matmul(net, variable("logits/w", [1024, 10])) + variable("logits/b", [10])
    loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits))
    step = v1.train.AdamOptimizer(LEARNING_RATE).minimize(loss)

    session_config = v1.ConfigProto(intra_op_parallelism_threads=threads, inter_op_parallelism_threads=threads)
    rates = []
    rng = np.random.default_rng(0)
    with v1.Session(config=session_config) as session:
        session.run(v1.global_variables_initializer())
        for _ in range(epochs):
            started = time.perf_counter()
            order = rng.permutation(len(labels))
            for start in range(0, len(order), BATCH_SIZE):
                batch = order[start : start + BATCH_SIZE]
                session.run(step, feed_dict={x: images[batch], y: labels[batch]})
            rates.append(len(labels) / (time.perf_counter() - started))
    return rates


WORKERS = {"keras": keras_rates, "tf1": tf1_rates}


def main(argv: list[str]) -> None:
    kind, dataset, epochs, threads = argv
    with np.load(dataset) as arrays:
        images, labels = arrays["train_images"], arrays["train_labels"]
    print(json.dumps(WORKERS[kind](images, labels.astype(np.int64), int(epochs), int(threads))))


if __name__ == "__main__":
    main(sys.argv[1:])
