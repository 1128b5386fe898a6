"""FusedBatchNormalization and fuse_batchnorm: every result is checked against Keras' own BatchNormalization."""

import logging

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from stsc_tf.models.layers import FusedBatchNormalization, fuse_batchnorm

FUSED_OP = "FusedBatchNormV3"


def _batch(shape, seed=0, loc=1.5, scale=2.0):
    """Inputs with a non-zero mean and a non-unit spread, so mean and variance both matter."""
    return np.random.default_rng(seed).normal(loc, scale, size=shape).astype("float32")


def _pair(input_shape, seed=0, **kwargs):
    """(Keras' layer, the fused layer): same arguments, built, with the same non-default weights."""
    keras_bn = keras.layers.BatchNormalization(**kwargs)
    fused_bn = FusedBatchNormalization(**kwargs)
    keras_bn.build(input_shape)
    fused_bn.build(input_shape)
    rng = np.random.default_rng(seed)
    # gamma in [0.5, 2], beta and moving mean around 0, moving variance in [0.5, 2], whichever of them exist;
    # renorm's extra statistics keep their initial values.
    ranges = {"gamma": (0.5, 2.0), "beta": (-1.0, 1.0), "moving_mean": (-0.5, 0.5), "moving_variance": (0.5, 2.0)}
    weights = [rng.uniform(*ranges[w.name], size=w.shape).astype("float32") if w.name in ranges else w.numpy()
               for w in keras_bn.weights]
    keras_bn.set_weights(weights)
    fused_bn.set_weights(weights)
    return keras_bn, fused_bn


def _op_types(fn, spec) -> set:
    return {op.type for op in tf.function(fn).get_concrete_function(spec).graph.get_operations()}


def _close(a, b, atol=1e-5, rtol=1e-5):
    np.testing.assert_allclose(np.asarray(a, "float32"), np.asarray(b, "float32"), atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------------------------------- the layer


@pytest.mark.parametrize("axis,shape", [(-1, (4, 3, 5, 6)), (3, (4, 3, 5, 6)), (1, (4, 6, 3, 5))])
@pytest.mark.parametrize("center,scale", [(True, True), (False, True), (True, False), (False, False)])
def test_forward_and_moving_statistics_equal_keras(axis, shape, center, scale):
    """Non-default momentum/epsilon; three training calls on different batches, then inference."""
    keras_bn, fused_bn = _pair(shape, axis=axis, center=center, scale=scale, momentum=0.7, epsilon=0.05)
    assert [w.name for w in fused_bn.weights] == [w.name for w in keras_bn.weights]
    for seed in range(3):
        x = _batch(shape, seed=seed)
        _close(fused_bn(x, training=True), keras_bn(x, training=True))
    # Three updates at momentum 0.7 move the statistics well away from their initial values (a wrong variance
    # correction would show here).
    _close(fused_bn.moving_mean, keras_bn.moving_mean)
    _close(fused_bn.moving_variance, keras_bn.moving_variance)
    x = _batch(shape, seed=7)
    _close(fused_bn(x, training=False), keras_bn(x, training=False))


def test_moving_variance_is_the_biased_variance_by_hand():
    """Per channel the batch is {0, 2}: mean 1, biased variance 1 (Bessel's correction would give 2)."""
    layer = FusedBatchNormalization(momentum=0.5, epsilon=0.0)
    x = np.array([0.0, 2.0], "float32").reshape(2, 1, 1, 1)
    y = layer(x, training=True)
    _close(y[:, 0, 0, 0], [-1.0, 1.0])
    _close(layer.moving_mean, [0.5])  # 0 * 0.5 + 1 * 0.5
    _close(layer.moving_variance, [1.0])  # 1 * 0.5 + 1 * 0.5, not 1.5


def test_one_value_per_channel_gives_zero_variance():
    """n = B * H * W = 1: Keras' biased variance is 0, and the correction must not divide by n - 1 = 0."""
    keras_bn, fused_bn = _pair((1, 1, 1, 3), momentum=0.5)
    x = _batch((1, 1, 1, 3))
    _close(fused_bn(x, training=True), keras_bn(x, training=True))
    _close(fused_bn.moving_variance, keras_bn.moving_variance)


@pytest.mark.parametrize("axis,shape", [(-1, (3, 4, 2, 5)), (1, (3, 5, 4, 2))])
@pytest.mark.parametrize("training", [True, False])
def test_gradients_equal_keras(axis, shape, training):
    """d(loss)/d(input, gamma, beta) with a non-uniform upstream gradient (sum(y) alone has a zero x-gradient)."""
    keras_bn, fused_bn = _pair(shape, axis=axis, epsilon=0.01)
    x = tf.constant(_batch(shape))
    upstream = tf.constant(_batch(shape, seed=1, loc=0.0, scale=1.0))
    grads = []
    for layer in (keras_bn, fused_bn):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x, training=training) * upstream)
        grads.append(tape.gradient(loss, [x, layer.gamma, layer.beta]))
    for keras_grad, fused_grad in zip(*grads):
        _close(fused_grad, keras_grad, atol=1e-4, rtol=1e-4)


def test_frozen_layer_in_training_mode_uses_moving_statistics():
    """Keras' rule, `training and self.trainable`: a frozen layer normalises with (and keeps) its moving stats."""
    keras_bn, fused_bn = _pair((4, 2, 2, 3))
    keras_bn.trainable = fused_bn.trainable = False
    before = fused_bn.moving_mean.numpy()
    x = _batch((4, 2, 2, 3))
    _close(fused_bn(x, training=True), keras_bn(x, training=False))
    _close(fused_bn.moving_mean, before, atol=0, rtol=0)


def test_fused_kernel_is_used_for_4d_inputs():
    for axis, shape in ((-1, (2, 3, 3, 4)), (1, (2, 4, 3, 3))):
        _, fused_bn = _pair(shape, axis=axis)
        for training in (True, False):
            ops = _op_types(lambda x: fused_bn(x, training=training), tf.TensorSpec((None, *shape[1:])))
            assert FUSED_OP in ops
            assert "Mean" not in ops  # nothing of Keras' unfused moments is left


@pytest.mark.parametrize("case", ["2d", "synchronized", "mask", "float64", "axis2", "renorm"])
def test_fallbacks_equal_keras_and_do_not_use_the_fused_kernel(case):
    shape, kwargs, mask, dtype = (4, 3, 3, 5), {}, None, "float32"
    if case == "2d":
        shape = (6, 5)
    elif case == "synchronized":
        kwargs = {"synchronized": True}
    elif case == "mask":
        mask = np.random.default_rng(3).uniform(size=shape[:-1]) > 0.3  # [B, H, W]
    elif case == "float64":
        dtype = "float64"
    elif case == "axis2":
        kwargs = {"axis": 2}
    else:
        kwargs = {"renorm": True, "renorm_clipping": {"rmax": 2.0, "rmin": 0.5, "dmax": 1.0}}
    kwargs.update(dtype=dtype)
    keras_bn, fused_bn = _pair(shape, momentum=0.6, **kwargs)
    x = _batch(shape).astype(dtype)
    for _ in range(2):
        _close(fused_bn(x, training=True, mask=mask), keras_bn(x, training=True, mask=mask))
    _close(fused_bn.moving_variance, keras_bn.moving_variance)
    _close(fused_bn(x, training=False), keras_bn(x, training=False))
    ops = _op_types(lambda t: fused_bn(t, training=True, mask=mask), tf.TensorSpec(shape, dtype))
    assert FUSED_OP not in ops and "Rsqrt" in ops  # Keras' unfused tf.nn.batch_normalization


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(policy):
    """float16/bfloat16 inputs, float32 variables: output in the policy's dtype, close to float32; same gradients."""
    shape = (4, 3, 3, 6)
    reference, _ = _pair(shape, epsilon=0.01)
    x = _batch(shape)
    expected = {training: reference(x, training=training) for training in (True, False)}
    keras.mixed_precision.set_global_policy(policy)
    try:
        keras_bn, fused_bn = _pair(shape, epsilon=0.01)
        compute_dtype = keras_bn.compute_dtype
        assert fused_bn.variable_dtype == "float32" and compute_dtype in ("float16", "bfloat16")
        # bfloat16 keeps 8 significant bits: about 0.4 % of outputs of a few units.
        tolerance = 0.05 if compute_dtype == "bfloat16" else 5e-3
        for training in (True, False):
            y = fused_bn(x, training=training)
            assert y.dtype == compute_dtype
            assert np.all(np.isfinite(np.asarray(y, "float32")))
            _close(y, expected[training], atol=tolerance, rtol=tolerance)
            _close(y, keras_bn(x, training=training), atol=tolerance, rtol=tolerance)
        _close(fused_bn.moving_variance, keras_bn.moving_variance, atol=1e-3, rtol=1e-3)
        x_low = tf.constant(x, compute_dtype)
        grads = []
        for layer in (keras_bn, fused_bn):
            with tf.GradientTape() as tape:
                tape.watch(x_low)
                loss = tf.reduce_sum(tf.cast(layer(x_low, training=True), "float32") * x)
            grads.append(tape.gradient(loss, [x_low, layer.gamma]))
        assert grads[1][0].dtype == compute_dtype and grads[1][1].dtype == "float32"
        _close(grads[1][1], grads[0][1], atol=0.5, rtol=0.02)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_jit_compile_training_step_matches_keras():
    shape = (4, 3, 3, 5)
    keras_bn, fused_bn = _pair(shape, momentum=0.5)
    x = tf.constant(_batch(shape))
    upstream = tf.constant(_batch(shape, seed=1, loc=0.0, scale=1.0))

    def step(layer):
        @tf.function(jit_compile=True)
        def run(inputs):
            with tf.GradientTape() as tape:
                tape.watch(inputs)
                loss = tf.reduce_sum(layer(inputs, training=True) * upstream)
            return loss, tape.gradient(loss, [inputs, layer.gamma])

        return run

    fused_step, keras_step = step(fused_bn), step(keras_bn)
    for _ in range(2):
        fused_out, keras_out = fused_step(x), keras_step(x)
    for fused_value, keras_value in zip(tf.nest.flatten(fused_out), tf.nest.flatten(keras_out)):
        _close(fused_value, keras_value, atol=1e-4, rtol=1e-4)
    _close(fused_bn.moving_mean, keras_bn.moving_mean)
    _close(fused_bn.moving_variance, keras_bn.moving_variance)


def test_mirrored_strategy_training_step_matches_keras():
    """Two replicas, each normalising its own half of the batch; SGD on the all-reduced gradients."""
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    models, optimizers = [], []
    with strategy.scope():
        for layer_class in (keras.layers.BatchNormalization, FusedBatchNormalization):
            keras.utils.set_random_seed(0)
            inputs = keras.Input((5, 5, 2))
            features = keras.layers.Conv2D(3, 3, name="conv")(inputs)
            outputs = layer_class(momentum=0.5, name="bn")(features)
            models.append(keras.Model(inputs, outputs))
            optimizers.append(keras.optimizers.SGD(0.1))
    models[1].set_weights(models[0].get_weights())
    x = _batch((4, 5, 5, 2))
    upstream = _batch((4, 3, 3, 3), seed=1, loc=0.0, scale=1.0)
    dataset = tf.data.Dataset.from_tensor_slices((x, upstream)).batch(4)

    def step(model, optimizer):
        @tf.function
        def run(data):
            def replica_step(inputs, grad_weights):
                with tf.GradientTape() as tape:
                    y = model(inputs, training=True)
                    loss = tf.reduce_sum(y * grad_weights) / 4.0
                grads = tape.gradient(loss, model.trainable_variables)
                optimizer.apply_gradients(zip(grads, model.trainable_variables))
                return y

            return strategy.run(replica_step, args=data)

        return run

    outputs = []
    for model, optimizer in zip(models, optimizers):
        run = step(model, optimizer)
        for data in strategy.experimental_distribute_dataset(dataset):
            outputs.append(strategy.experimental_local_results(run(data)))
    for keras_y, fused_y in zip(*outputs):
        _close(fused_y, keras_y, atol=1e-5)
    for keras_w, fused_w in zip(models[0].weights, models[1].weights):
        assert keras_w.name == fused_w.name
        _close(fused_w, keras_w, atol=1e-5)
    assert not np.allclose(models[1].get_layer("bn").moving_variance.numpy(), 1.0)  # the update did run


# ------------------------------------------------------------------------------------------------ fuse_batchnorm


def _two_output_model():
    """conv-BN-ReLU (feature map) -> a nested Sequential with its own BN -> pooled logits; plus a synchronized BN."""
    keras.utils.set_random_seed(1)
    inputs = keras.Input((6, 6, 3), name="image")
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    x = keras.layers.BatchNormalization(momentum=0.5, name="bn")(x)
    feature_map = keras.layers.ReLU(name="relu")(x)  # [B, 6, 6, 4]
    block = keras.Sequential([keras.Input((6, 6, 4)), keras.layers.Conv2D(4, 1, name="inner_conv"),
                              keras.layers.BatchNormalization(momentum=0.5, name="inner_bn")], name="block")
    x = keras.layers.BatchNormalization(synchronized=True, name="sync_bn")(block(feature_map))
    logits = keras.layers.Dense(2, name="logits")(keras.layers.GlobalAveragePooling2D(name="pool")(x))  # [B, 2]
    model = keras.Model(inputs, [feature_map, logits], name="two_outputs")
    # Moving statistics away from their initial values, so a weight copied to the wrong place would show.
    model(_batch((8, 6, 6, 3), seed=5), training=True)
    return model


def test_fuse_batchnorm_two_output_model():
    model = _two_output_model()
    fused = fuse_batchnorm(model)
    assert fused is not model
    assert type(fused.get_layer("bn")) is FusedBatchNormalization
    assert type(fused.get_layer("block").get_layer("inner_bn")) is FusedBatchNormalization
    assert type(fused.get_layer("sync_bn")) is keras.layers.BatchNormalization  # synchronized: left as it is
    assert [layer.name for layer in fused.layers] == [layer.name for layer in model.layers]
    assert [(w.name, w.shape) for w in fused.weights] == [(w.name, w.shape) for w in model.weights]
    for original, copied in zip(model.get_weights(), fused.get_weights()):
        np.testing.assert_array_equal(copied, original)
    assert [t.name for t in fused.inputs] == [t.name for t in model.inputs] and len(fused.outputs) == 2
    x = _batch((4, 6, 6, 3), seed=6)
    for training in (False, True):
        for original, copied in zip(model(x, training=training), fused(x, training=training)):
            _close(copied, original, atol=1e-4)
    _close(fused.get_layer("bn").moving_variance, model.get_layer("bn").moving_variance)


def test_fuse_batchnorm_densenet121():
    model = keras.applications.DenseNet121(include_top=False, weights=None, input_shape=(32, 32, 3))
    batchnorms = [layer.name for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    fused = fuse_batchnorm(model)
    assert len(batchnorms) == 1 + 2 * 58 + 3 + 1  # stem, 58 dense layers, 3 transitions, the final BN
    assert all(type(fused.get_layer(name)) is FusedBatchNormalization for name in batchnorms)
    x = _batch((2, 32, 32, 3), loc=0.0, scale=1.0)
    _close(fused(x, training=False), model(x, training=False), atol=1e-4, rtol=1e-4)


def test_fuse_batchnorm_keras_file_and_weights_files(tmp_path):
    model = _two_output_model()
    fused = fuse_batchnorm(model)
    x = _batch((3, 6, 6, 3), seed=8)
    expected = model(x, training=False)

    fused.save(tmp_path / "fused.keras")
    loaded = keras.saving.load_model(tmp_path / "fused.keras")
    assert type(loaded.get_layer("bn")) is FusedBatchNormalization
    for want, got in zip(expected, loaded(x, training=False)):
        _close(got, want, atol=1e-4)

    fused.save_weights(tmp_path / "fused.weights.h5")
    unfused = keras.models.clone_model(model)
    unfused.load_weights(tmp_path / "fused.weights.h5")
    for want, got in zip(expected, unfused(x, training=False)):
        _close(got, want, atol=1e-4)

    model.save_weights(tmp_path / "keras.weights.h5")
    refused = fuse_batchnorm(keras.models.clone_model(model))
    refused.load_weights(tmp_path / "keras.weights.h5")
    for want, got in zip(expected, refused(x, training=False)):
        _close(got, want, atol=1e-4)


def test_fuse_batchnorm_sequential():
    model = keras.Sequential([keras.Input((4, 4, 2)), keras.layers.Conv2D(3, 3, name="conv"),
                              keras.layers.BatchNormalization(axis=3, epsilon=0.01, name="bn")])
    model.get_layer("bn").set_weights([np.array(v, "float32") for v in
                                       ([1.5, 0.5, 2.0], [0.1, -0.2, 0.3], [0.2, 0.0, -0.1], [2.0, 0.5, 1.0])])
    fused = fuse_batchnorm(model)
    assert isinstance(fused, keras.Sequential) and type(fused.get_layer("bn")) is FusedBatchNormalization
    assert fused.get_layer("bn").epsilon == 0.01 and fused.get_layer("bn").axis == 3
    x = _batch((2, 4, 4, 2))
    _close(fused(x, training=False), model(x, training=False))
    _close(fused(x, training=True), model(x, training=True))


def test_fuse_batchnorm_leaves_subclassed_and_batchnorm_free_models(caplog):
    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.bn = keras.layers.BatchNormalization()

        def call(self, inputs, training=None):
            return self.bn(inputs, training=training)

    subclassed = Subclassed()
    caplog.set_level(logging.INFO, logger="stsc_tf")
    assert fuse_batchnorm(subclassed) is subclassed
    assert any("subclassed" in record.getMessage() for record in caplog.records)
    plain = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    assert fuse_batchnorm(plain) is plain


def test_exported_saved_model_runs_the_fused_kernel(tmp_path):
    fused = fuse_batchnorm(_two_output_model())
    archive = keras.export.ExportArchive()
    archive.track(fused)
    archive.add_endpoint(name="serve", fn=lambda images: fused(images, training=False),
                         input_signature=[tf.TensorSpec((None, 6, 6, 3), tf.float32)])
    archive.write_out(str(tmp_path / "export"))

    saved_model = saved_model_pb2.SavedModel()
    saved_model.ParseFromString((tmp_path / "export" / "saved_model.pb").read_bytes())
    graph = saved_model.meta_graphs[0].graph_def
    ops = {node.op for node in graph.node}
    ops |= {node.op for function in graph.library.function for node in function.node_def}
    assert FUSED_OP in ops
    assert not ops & {"PyFunc", "EagerPyFunc", "PyFuncStateless"}

    x = _batch((2, 6, 6, 3), seed=9)
    loaded = tf.saved_model.load(str(tmp_path / "export"))  # kept: its variables live as long as it does
    served = loaded.serve(tf.constant(x))
    for want, got in zip(fused(x, training=False), served):
        _close(got, want, atol=1e-5)


def test_the_package_networks_use_the_fused_layer_by_default_and_keras_synchronized_one_with_sync_bn():
    from stsc_tf.models.backbones import build_network

    def kinds(net):
        bns = [l for l in net.layers if isinstance(l, keras.layers.BatchNormalization)]
        return ({type(l) is FusedBatchNormalization for l in bns}, {bool(l.synchronized) for l in bns})

    assert kinds(build_network("tiny", num_classes=3, image_size=16)) == ({True}, {False})
    assert kinds(build_network("tiny", num_classes=3, image_size=16, fused_bn=False)) == ({False}, {False})
    assert kinds(build_network("tiny", num_classes=3, image_size=16, sync_bn=True)) == ({False}, {True})
