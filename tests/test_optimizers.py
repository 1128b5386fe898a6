"""FusedAdam: Keras' Adam, step for step, with one fused kernel per variable; checkpoints interchangeable."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from stsc_tf.models.optimizers import FusedAdam


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, activation="relu"), keras.layers.Dense(3)])


def _train(make_optimizer, steps=4, strategy=None):
    strategy = strategy or tf.distribute.get_strategy()
    with strategy.scope():  # the optimizer's variables belong to the strategy too
        model = _model()
        model.compile(optimizer=make_optimizer(), loss=keras.losses.MeanSquaredError())
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 6)).astype("float32"), rng.normal(size=(32, 3)).astype("float32")
    model.fit(x, y, batch_size=8, epochs=1, steps_per_epoch=steps, shuffle=False, verbose=0)
    return model


@pytest.mark.parametrize("kwargs", [dict(learning_rate=1e-2, epsilon=1e-8), dict(learning_rate=0.3, beta_1=0.5,
                                                                                   beta_2=0.9, epsilon=1e-3)])
def test_fused_adam_equals_keras_adam(kwargs):
    fused, plain = _train(lambda: FusedAdam(**kwargs)), _train(lambda: keras.optimizers.Adam(**kwargs))
    for a, b in zip(fused.get_weights(), plain.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(fused.optimizer.variables, plain.optimizer.variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7)


def check_mirrored():
    """Under MirroredStrategy FusedAdam falls back to Keras' update: the same weights as one device's Adam."""
    mirrored = _train(lambda: FusedAdam(1e-2), strategy=tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    plain = _train(lambda: keras.optimizers.Adam(1e-2))
    for a, b in zip(mirrored.get_weights(), plain.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    print("mirrored: OK")


def test_the_fused_kernel_is_in_the_traced_update_and_keras_update_under_a_strategy():
    variable = keras.Variable(np.ones(4, "float32"))
    optimizer = FusedAdam(0.1)
    optimizer.build([variable])
    graph = tf.function(lambda g: optimizer.apply([g], [variable])).get_concrete_function(
        tf.TensorSpec([4], tf.float32)).graph
    assert "ResourceApplyAdam" in {op.type for op in graph.get_operations()}
    # A fresh process: TF's collective keys clash between MirroredStrategy instances of one process.
    done = subprocess.run([sys.executable, "-c", "import conftest, test_optimizers; test_optimizers.check_mirrored()"],
                          cwd=os.path.dirname(__file__), capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert done.returncode == 0 and "mirrored: OK" in done.stdout, done.stderr[-3000:]


def test_checkpoints_are_interchangeable_with_keras_adam(tmp_path):
    fused = _train(lambda: FusedAdam(1e-2))
    fused.save_weights(str(tmp_path / "f.weights.h5"))
    plain = _model(seed=1)
    plain.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    plain.optimizer.build(plain.trainable_variables)
    plain.load_weights(str(tmp_path / "f.weights.h5"))
    assert int(plain.optimizer.iterations) == 4
    for a, b in zip(plain.optimizer.variables, fused.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    saved = keras.models.load_model(_save(fused, tmp_path))
    assert type(saved.optimizer) is FusedAdam


def _save(model, tmp_path):
    path = str(tmp_path / "m.keras")
    model.save(path)
    return path
