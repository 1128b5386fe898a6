"""FusedBatchNormalization: Keras 3's BatchNormalization computed by TensorFlow's fused kernel.

Keras 3's `keras.layers.BatchNormalization` on the TensorFlow backend is unfused: moments, then several element-wise
ops, forward and backward, for every layer. `FusedBatchNormalization` is the same layer (constructor, variables,
`get_config`, training/inference rule, moving-statistics update) whose `call` runs `tf.raw_ops.FusedBatchNormV3`
and its registered gradient `FusedBatchNormGradV3` instead (a DenseNet-121 supervised CPU step takes 0.75x the time,
the STSC step 0.72x; `benchmarks/fused_bn.py` and BUILD.md). `fuse_batchnorm(model)` swaps every plain
BatchNormalization of a functional or Sequential model for it.

The fused kernel is used where it applies: TensorFlow backend, 4-D input with the channel axis last (axis -1 or 3,
NHWC) or first (axis 1 or -3, NCHW), input dtype float32, float16 or bfloat16, no mask, `synchronized=False`,
`renorm=False`. Anything else falls back to Keras' own `call` (same results, unfused): other ranks or axes,
float64, a mask (the masked moments), `synchronized=True` (the cross-replica moments), batch renormalization.

Variance: in training, the kernel returns the batch variance with Bessel's correction, n / (n - 1) with
n = B * H * W (the variance TensorFlow's own moving average uses), while it normalises with the biased variance.
Keras 3 uses the biased variance for both, so the returned variance is multiplied by (n - 1) / n before the
moving-variance update: after any number of training calls the moving statistics equal Keras' layer's.

Weights: the variables are created by Keras' `build` (gamma, beta, moving_mean, moving_variance; same names, same
order, gamma/beta absent under scale=False/center=False), and the class's `__name__` is Keras' "BatchNormalization"
(Keras keys weights files by class name; the Python name and the registered name stay FusedBatchNormalization), so a
`.weights.h5` file saved from a model with either layer loads into the same model with the other, and
`fuse_batchnorm` copies weights one for one. `model.summary()` therefore lists the layer as BatchNormalization;
`repr(layer)` and `isinstance` tell them apart.

Mixed precision: float16/bfloat16 inputs go to the kernel as they are, with float32 scale, offset and statistics
(the kernel's float16 and bfloat16 forms compute in float32 internally and return the input's dtype, the same
arithmetic as Keras' upcast-compute-downcast, without the two casts). NCHW (channel-first) inputs go to the kernel
as NCHW, with no transpose around them. All of these run eagerly, under tf.function and under XLA, in training and
inference, gradients included (checked with TensorFlow 2.21 on CPU; not checked on a GPU).
"""

from __future__ import annotations

import logging

import keras
import tensorflow as tf

log = logging.getLogger("stsc_tf")

# Input dtypes the fused kernel takes (each ran on CPU and under XLA with TF 2.21); float64 falls back to Keras' path.
_FUSED_DTYPES = ("float32", "float16", "bfloat16")
# Channel axis (normalised to 0..3) of a 4-D input -> the kernel's data_format.
_DATA_FORMATS = {3: "NHWC", 1: "NCHW"}


@keras.saving.register_keras_serializable(package="stsc_tf")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """`keras.layers.BatchNormalization` computed by TensorFlow's fused kernel where it applies.

    Takes exactly Keras' constructor arguments and has Keras' variables and config; see the module docstring for
    when the fused kernel is used and when the call falls back to Keras' own (unfused) computation.

    Training mode is Keras' rule, `training and self.trainable`: normalise with the batch statistics and update
    `moving = moving * momentum + batch_stat * (1 - momentum)` (biased batch variance, as Keras) through the same
    `Variable.assign` Keras' layer uses, so the update behaves identically under a `tf.distribute` strategy.
    Otherwise the moving statistics normalise.
    """

    def call(self, inputs, training=None, mask=None):
        data_format = self._fused_data_format(inputs, mask)
        if data_format is None:
            return super().call(inputs, training=training, mask=mask)
        channels = self.moving_mean.shape[0]
        # The kernel takes float32 scale/offset/statistics for float16, bfloat16 and float32 inputs alike.
        scale = tf.cast(self.gamma, tf.float32) if self.scale else tf.ones([channels], tf.float32)  # [C]
        offset = tf.cast(self.beta, tf.float32) if self.center else tf.zeros([channels], tf.float32)  # [C]
        moving_mean = tf.cast(self.moving_mean, tf.float32)  # [C]
        moving_variance = tf.cast(self.moving_variance, tf.float32)  # [C]
        if training and self.trainable:
            # Empty mean/variance with exponential_avg_factor=1: the kernel returns the plain batch statistics and
            # the moving average is done here, with Keras' formula and Keras' assign.
            empty = tf.constant([], tf.float32)
            outputs, batch_mean, batch_variance, _, _, _ = tf.raw_ops.FusedBatchNormV3(
                x=inputs, scale=scale, offset=offset, mean=empty, variance=empty, epsilon=self.epsilon,
                exponential_avg_factor=1.0, data_format=data_format, is_training=True)  # y like inputs; [C], [C]
            count = tf.cast(tf.size(inputs, out_type=tf.int64) // channels, tf.float32)  # n = B * H * W
            # Undo Bessel's correction: Keras averages the biased variance. n = 1 gives 0, the biased variance of
            # one value; n = 0 (an empty batch) is kept from dividing by zero.
            variance = batch_variance * ((count - 1.0) / tf.maximum(count, 1.0))  # [C]
            self.moving_mean.assign(moving_mean * self.momentum + batch_mean * (1.0 - self.momentum))
            self.moving_variance.assign(moving_variance * self.momentum + variance * (1.0 - self.momentum))
        else:
            outputs, _, _, _, _, _ = tf.raw_ops.FusedBatchNormV3(
                x=inputs, scale=scale, offset=offset, mean=moving_mean, variance=moving_variance,
                epsilon=self.epsilon, exponential_avg_factor=1.0, data_format=data_format,
                is_training=False)  # like inputs
        return tf.cast(outputs, self.compute_dtype)

    def __repr__(self):
        return f"<FusedBatchNormalization name={self.name}, built={self.built}>"

    def _fused_data_format(self, inputs, mask) -> str | None:
        """The kernel's data_format ("NHWC"/"NCHW") where the fused kernel applies to this call, else None."""
        if keras.backend.backend() != "tensorflow" or mask is not None or self.synchronized or self.renorm:
            return None
        if len(inputs.shape) != 4 or keras.backend.standardize_dtype(inputs.dtype) not in _FUSED_DTYPES:
            return None
        return _DATA_FORMATS.get(self.axis % 4)


# Keras keys each layer's weights in `.weights.h5` and `.keras` files by its snake-cased class name, numbered in
# layer order ("batch_normalization", "batch_normalization_1", ...). Under its own name the fused layer would be
# keyed "fused_batch_normalization", and a file saved from one form would put BN weights into the wrong layers (or
# miss them) in the other. So the class carries Keras' name; it is still found on loading by its registered name,
# "stsc_tf>FusedBatchNormalization" (given by the decorator above, before this renaming).
FusedBatchNormalization.__name__ = "BatchNormalization"


def fuse_batchnorm(model: keras.Model) -> keras.Model:
    """The same network with every plain BatchNormalization replaced by `FusedBatchNormalization`.

    Works on functional and Sequential models, including functional/Sequential models nested in them (rewritten
    recursively): the config is rewritten, rebuilt with `from_config`, and every weight copied, so layer names,
    weight order, inputs and outputs (several outputs included) are unchanged. Left as they are: synchronized and
    batch-renormalization layers, and subclasses of BatchNormalization.

    Args:
        model: a functional or Sequential `keras.Model`, built or not.

    Returns:
        A new, uncompiled model (compile it after fusing); `model` itself where it has no BatchNormalization to
        fuse, or where it is a subclassed model (no functional config; logged at INFO on the "stsc_tf" logger).
    """
    try:
        config = model.get_config()
    except NotImplementedError:
        config = {}
    if "layers" not in config:
        log.info("fuse_batchnorm: %r is a subclassed model (no functional config); returned unchanged", model.name)
        return model
    if not _fuse_config(config):
        return model
    fused = model.__class__.from_config(config)
    fused.set_weights(model.get_weights())
    return fused


def _fuse_config(config: dict) -> int:
    """Rewrites, in place, the plain BatchNormalization entries of a model config (recursing into nested models).

    Returns how many entries were rewritten.
    """
    rewritten = 0
    for layer in config["layers"]:
        layer_config = layer.get("config")
        if _is_plain_batchnorm(layer):
            layer.update(module=FusedBatchNormalization.__module__, class_name=FusedBatchNormalization.__name__,
                         registered_name=keras.saving.get_registered_name(FusedBatchNormalization))
            rewritten += 1
        elif isinstance(layer_config, dict) and isinstance(layer_config.get("layers"), list):
            rewritten += _fuse_config(layer_config)
    return rewritten


def _is_plain_batchnorm(layer: dict) -> bool:
    """Whether a serialized layer is Keras' own BatchNormalization, neither synchronized nor renormalizing."""
    config = layer.get("config") or {}
    return (layer.get("class_name") == "BatchNormalization" and layer.get("module") == "keras.layers"
            and not config.get("synchronized", False) and not config.get("renorm", False))
