"""Schedules: the consistency ramp-up, the EMA decay warm-up, and Adam's per-epoch decay.

All are functions of `optimizer.iterations` (the fractional epoch is iterations / steps_per_epoch), so a resumed
run continues exactly where it stopped.
"""

from __future__ import annotations

import keras
import tensorflow as tf


def fractional_epoch(iterations, steps_per_epoch: int) -> tf.Tensor:
    """e = iterations / steps_per_epoch (float32)."""
    return tf.cast(iterations, tf.float32) / float(max(steps_per_epoch, 1))


def sigmoid_rampup(epoch, length: float) -> tf.Tensor:
    """exp(-5 (1 - min(e, L)/L)^2) (Laine & Aila; SRC-MT's ramps.sigmoid_rampup). 1 when L == 0."""
    if length <= 0:
        return tf.constant(1.0)
    phase = 1.0 - tf.clip_by_value(tf.cast(epoch, tf.float32), 0.0, float(length)) / float(length)
    return tf.exp(-5.0 * phase * phase)


def consistency_weight(epoch, *, maximum: float, rampup: float, start_epoch: float) -> tf.Tensor:
    """lambda = maximum * sigmoid_rampup(floor(e), rampup) once floor(e) > start_epoch, else 0.

    Exactly SRC-MT's `if epoch > 20: loss += consistency_weight(epoch) * ...` with its integer epoch index e
    (0-based): the weight is constant within an epoch, and with start_epoch = 20 the consistency terms are on from
    epoch index 21, i.e. after 21 finished epochs. start_epoch = -1 switches them on from the first step.
    """
    whole = tf.floor(tf.cast(epoch, tf.float32))
    return tf.where(whole > start_epoch, maximum * sigmoid_rampup(whole, rampup), 0.0)


def ema_decay(step, alpha: float) -> tf.Tensor:
    """alpha_t = min(1 - 1/(t + 1), alpha): 0 at t = 0 (the teacher copies the student), then up to alpha."""
    t = tf.cast(step, tf.float32)
    return tf.minimum(1.0 - 1.0 / (t + 1.0), alpha)


@keras.saving.register_keras_serializable(package="stsc_tf")
class EpochDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Adam's learning rate, decayed after every epoch.

    mode='step': lr0 * rate^floor(epoch) (SRC-MT's code: x0.9 after each epoch; the default).
    mode='poly': lr0 * (1 - epoch/epochs)^rate (the other reading of "decayed by a power of 0.9").
    """

    def __init__(self, initial_learning_rate: float, steps_per_epoch: int, rate: float = 0.9, mode: str = "step",
                 epochs: int = 100):
        if mode not in ("step", "poly"):
            raise ValueError(f"lr_decay must be 'step' or 'poly', got {mode!r}")
        self.initial_learning_rate = float(initial_learning_rate)
        self.steps_per_epoch = int(steps_per_epoch)
        self.rate = float(rate)
        self.mode = mode
        self.epochs = int(epochs)

    def __call__(self, step):
        epoch = fractional_epoch(step, self.steps_per_epoch)
        if self.mode == "step":
            return self.initial_learning_rate * tf.pow(self.rate, tf.floor(epoch))
        progress = tf.clip_by_value(tf.floor(epoch) / float(max(self.epochs, 1)), 0.0, 1.0)
        return self.initial_learning_rate * tf.pow(1.0 - progress, self.rate)

    def get_config(self):
        return {"initial_learning_rate": self.initial_learning_rate, "steps_per_epoch": self.steps_per_epoch,
                "rate": self.rate, "mode": self.mode, "epochs": self.epochs}
