"""One test per private Keras API stsc_tf relies on (stsc_tf/models/keras_internals.py): an upgrade of Keras that
changes one fails here, by name."""

import inspect

import h5py
import keras
import numpy as np
from keras.src.backend.tensorflow.trainer import TensorFlowTrainer

from stsc_tf.models import keras_internals
from stsc_tf.models.layers import FusedBatchNormalization
from stsc_tf.models.stsc import STSCModel


def test_maybe_symbolic_build_is_still_the_hook_keras_calls_with_the_first_batch():
    assert hasattr(TensorFlowTrainer, "_maybe_symbolic_build")
    assert list(inspect.signature(TensorFlowTrainer._maybe_symbolic_build).parameters) == [
        "self", "iterator", "data_batch"]
    assert STSCModel._maybe_symbolic_build is keras_internals.SkipSymbolicBuild._maybe_symbolic_build
    source = inspect.getsource(TensorFlowTrainer.fit)
    assert "_maybe_symbolic_build" in source  # fit still calls it, so skipping it still matters


def test_compile_metrics_container_is_where_keras_keeps_compile_metrics():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse")
    assert keras_internals.compiled_metrics(model) is None
    f1 = keras.metrics.F1Score(name="f")  # creates its variables on its first update
    model.compile(optimizer="sgd", loss="mse", metrics=[keras.metrics.AUC(name="a"), f1])
    container = keras_internals.compiled_metrics(model)
    assert container is not None and not container.built and container in model.metrics
    keras_internals.build_compiled_metrics(model, 2)
    assert container.built and f1.variables  # built symbolically: no variable waits for a traced step
    container.update_state(np.eye(2, dtype="float32"), np.eye(2, dtype="float32"))
    assert set(container.result()) == {"a", "f"} and float(container.result()["a"]) == 1.0


def test_setting_built_by_hand_is_honoured():
    model = STSCModel.from_backbone("tiny", num_classes=2, image_size=16, num_train=4)
    assert model.built
    layer = keras.layers.Dense(2)
    keras_internals.mark_built(layer)
    assert layer.built  # and a built layer is not built again from its first input
    assert getattr(keras.layers.Layer, "_maybe_build", None) is not None


def test_adam_slots_are_the_moments_keras_adam_updates():
    variable = keras.Variable(np.ones(3, "float32"))
    optimizer = keras.optimizers.Adam(0.1)
    optimizer.build([variable])
    m, v = keras_internals.adam_slots(optimizer, variable)
    optimizer.apply([np.array([1.0, 2.0, -1.0], "float32")], [variable])
    np.testing.assert_allclose(m.numpy(), 0.1 * np.array([1.0, 2.0, -1.0]), rtol=1e-6)  # (1 - beta_1) g
    np.testing.assert_allclose(v.numpy(), 0.001 * np.array([1.0, 4.0, 1.0]), rtol=1e-5)  # (1 - beta_2) g^2


def test_keras_keys_weights_files_by_the_layers_class_name(tmp_path):
    """FusedBatchNormalization carries the name "BatchNormalization" so weights files stay interchangeable with
    Keras' layer: that relies on Keras keying a layer's weights by its class name in snake case."""
    model = keras.Sequential([keras.Input((4, 4, 2)), keras.layers.BatchNormalization()])
    model.save_weights(str(tmp_path / "w.weights.h5"))
    with h5py.File(tmp_path / "w.weights.h5") as f:
        keys = []
        f.visit(keys.append)
    assert any(k.endswith("batch_normalization") for k in keys), keys
    assert FusedBatchNormalization.__name__ == "BatchNormalization"
    assert keras.saving.get_registered_name(FusedBatchNormalization) == "stsc_tf>FusedBatchNormalization"
