"""Adam's update in TensorFlow's fused kernel (ResourceApplyAdam), as Keras 2's optimizers did it.

Keras 3's Adam writes its update as a dozen element-wise ops per variable (casts, both moments, the square root, the
division, three assignments). On a CPU each one walks the whole variable, and this CNN's dense layer holds 3.2M of
its 3.3M weights. ResourceApplyAdam does the same arithmetic in one pass. Measured 2026-12-08, back to back (2 CPUs
of an Intel Xeon, the classic CNN, 12,800-image epochs, img/s): float32 +5 % (2 processes x 1 thread) to +10-19 %
(1 process x 2 threads); bfloat16 compute about 1.4x, the update being a larger share of a faster step
(benchmarks/README.md).

Same algorithm and hyperparameters; same variables (momentums, velocities, iterations), so a checkpoint's optimizer
state carries over between this class and Keras's (`keras_class`); same decoupled weight decay, which Keras applies
before `update_step`. The kernel orders its float operations differently from Keras's graph, so the two agree to
rounding (training losses ~2e-4 apart after two epochs), not bit for bit; each is bit-for-bit repeatable on its own.
"""

from __future__ import annotations

import keras
from keras import ops

from stages.training.fused_batch_norm import PACKAGE


class _FusedAdamUpdate:
    """update_step of keras.optimizers.Adam (and AdamW, which only adds weight decay) in one TensorFlow op, where
    that op computes the same: TensorFlow's backend, a dense gradient, no AMSGrad; else Keras's own update."""

    def update_step(self, gradient, variable, learning_rate):
        import tensorflow as tf

        if keras.backend.backend() != "tensorflow" or self.amsgrad or isinstance(gradient, tf.IndexedSlices):
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        step = ops.cast(self.iterations + 1, dtype)
        index = self._get_variable_index(variable)
        beta_1, beta_2 = ops.cast(self.beta_1, dtype), ops.cast(self.beta_2, dtype)
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle,
            m=self._momentums[index].handle,
            v=self._velocities[index].handle,
            beta1_power=ops.power(beta_1, step),
            beta2_power=ops.power(beta_2, step),
            lr=ops.cast(learning_rate, dtype),
            beta1=beta_1,
            beta2=beta_2,
            epsilon=ops.cast(self.epsilon, dtype),
            grad=ops.cast(gradient, dtype),
        )


@keras.saving.register_keras_serializable(package=PACKAGE)
class FusedAdam(_FusedAdamUpdate, keras.optimizers.Adam):
    """keras.optimizers.Adam, its update in one fused op."""


@keras.saving.register_keras_serializable(package=PACKAGE)
class FusedAdamW(_FusedAdamUpdate, keras.optimizers.AdamW):
    """keras.optimizers.AdamW, its update in one fused op."""


def keras_class(optimizer: keras.optimizers.Optimizer) -> type:
    """The Keras optimizer class whose algorithm and state `optimizer` has: Adam for FusedAdam, AdamW for FusedAdamW,
    any other optimizer's own class."""
    for keras_optimizer in (keras.optimizers.AdamW, keras.optimizers.Adam):  # AdamW first: it subclasses Adam
        if isinstance(optimizer, keras_optimizer):
            return keras_optimizer
    return type(optimizer)
