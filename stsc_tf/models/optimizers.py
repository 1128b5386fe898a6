"""FusedAdam: Keras' Adam whose per-variable update is TensorFlow's fused `ResourceApplyAdam` kernel.

Keras 3's Adam builds about fifteen ops per variable and step (the bias-corrected step size, two moment updates, the
parameter update); DenseNet-121 has 364 trainable variables, so the optimizer is a large part of tracing the first
step and a pass over the weights several times a step. The fused kernel does the same arithmetic in one op:

    alpha = lr sqrt(1 - beta_2^t) / (1 - beta_1^t)
    m <- beta_1 m + (1 - beta_1) g;   v <- beta_2 v + (1 - beta_2) g^2;   w <- w - alpha m / (sqrt(v) + epsilon)

(exactly Keras' Adam; PyTorch's Adam puts epsilon inside the bias correction, a difference of order epsilon). The
slot variables are Keras' own, so checkpoints are interchangeable with `keras.optimizers.Adam`. The fused kernel is
used on a single device; under a distribution strategy, for sparse gradients or with amsgrad, Keras' own update runs.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from stsc_tf.models.keras_internals import adam_slots


@keras.saving.register_keras_serializable(package="stsc_tf")
class FusedAdam(keras.optimizers.Adam):
    """`keras.optimizers.Adam` (same arguments, slots and results) with a one-kernel update per variable."""

    def update_step(self, gradient, variable, learning_rate):
        if (self.amsgrad or isinstance(gradient, tf.IndexedSlices) or tf.distribute.has_strategy()
                or not hasattr(variable, "handle")):
            return super().update_step(gradient, variable, learning_rate)
        m, v = adam_slots(self, variable)
        dtype = variable.dtype
        step = tf.cast(self.iterations + 1, dtype)
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle, m=m.value.handle, v=v.value.handle,
            beta1_power=tf.pow(tf.cast(self.beta_1, dtype), step),
            beta2_power=tf.pow(tf.cast(self.beta_2, dtype), step), lr=tf.cast(learning_rate, dtype),
            beta1=tf.cast(self.beta_1, dtype), beta2=tf.cast(self.beta_2, dtype),
            epsilon=tf.cast(self.epsilon, dtype), grad=tf.cast(gradient, dtype), use_locking=False)
