"""STSCModel: exactness on 2 and 4 replicas, EMA and BatchNorm handling, state, serialization, subclassing."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import keras

from stsc_tf.models.backbones import build_network
from stsc_tf.models.stsc import STSCModel

B, S, K, N = 8, 16, 3, 24
# Everything on from step 0 so one short run exercises every term; tau as a quantile so the graph has edges.
LOSS = dict(consistency_start_epoch=-1, consistency_rampup=0, tsc_start_epoch=0, tsc_tau=0.6, tsc_tau_mode="quantile")
LOGGED = ("loss", *STSCModel.TERMS, *STSCModel.MONITORS)


def make_batches(n_steps, seed=0):
    """Global batches laid out as the pipeline does for up to 4 replicas (each 2-row slice: 1 labeled, 1 not)."""
    rng = np.random.default_rng(seed)
    out = []
    for step in range(n_steps):
        labeled = np.tile([True, False], B // 2)
        out.append({
            "student_view": rng.normal(size=(B, S, S, 3)).astype("float32"),
            "teacher_view": rng.normal(size=(B, S, S, 3)).astype("float32"),
            "label": (np.eye(K, dtype="float32")[rng.integers(0, K, B)] * labeled[:, None]),
            "labeled": labeled.astype("float32"),
            "index": (np.arange(B) + 8 * (step % 2)).astype("int64"),  # steps 0 and 2 revisit the same samples
        })
    return out


def dataset(batches):
    stacked = {k: np.stack([b[k] for b in batches]) for k in batches[0]}
    return tf.data.Dataset.from_tensor_slices(stacked)


def new_model(cls=STSCModel, **kw):
    args = dict(num_classes=K, image_size=S, num_train=N, dropout=0.0, sync_bn=True, loss_config=LOSS,
                steps_per_epoch=2, ema_alpha=0.99, weight_decay=5e-4)
    args.update(kw)
    return cls.from_backbone("tiny", **args)


@pytest.fixture(scope="module")
def initial_weights():
    keras.utils.set_random_seed(0)
    return new_model().get_weights()


def train(strategy, weights, batches, **kw):
    with strategy.scope():
        model = new_model(**kw)
        model.set_weights(weights)
        model.compile(optimizer=keras.optimizers.SGD(0.1))
    history = model.fit(dataset(batches), epochs=1, steps_per_epoch=len(batches), verbose=0)
    return model, {k: v[-1] for k, v in history.history.items()}


def snapshot(model):
    return {"student": model.student.get_weights(), "teacher": model.teacher.get_weights(),
            "memory": model.tsc_memory.numpy().astype("float32"), "seen": model.tsc_seen.numpy()}


def assert_same(a, b, atol=1e-5):
    """Weights to `atol`; the float16 memory to one float16 step (features equal to ~1e-6 may round apart)."""
    for part in a:
        for x, y in zip(a[part] if isinstance(a[part], list) else [a[part]],
                        b[part] if isinstance(b[part], list) else [b[part]]):
            tol = dict(atol=1e-3, rtol=2 ** -10) if part == "memory" else dict(atol=atol, rtol=1e-4)
            np.testing.assert_allclose(x, y, err_msg=part, **tol)


def check_replicas(replicas: int) -> None:
    """1 device vs `replicas` logical CPU devices, same global batches: same losses, weights, teacher, memory."""
    keras.utils.set_random_seed(0)
    weights = new_model().get_weights()
    batches = make_batches(3)
    one, logs_one = train(tf.distribute.get_strategy(), weights, batches)
    devices = [f"/cpu:{i}" for i in range(replicas)]
    many, logs_many = train(tf.distribute.MirroredStrategy(devices), weights, batches)
    assert logs_one["tc"] > 0 and logs_one["sc"] > 0 and logs_one["cons"] > 0  # every term is exercised
    assert logs_one["tsc_stable_pairs"] > 0
    for name in LOGGED:
        np.testing.assert_allclose(logs_many[name], logs_one[name], rtol=1e-4, atol=1e-6, err_msg=name)
    assert_same(snapshot(one), snapshot(many))
    # the memory (and its seen flags) is identical on every replica
    copies = [v.numpy() for v in many.tsc_memory.value.values]
    assert len(copies) == replicas and all(np.array_equal(copies[0], c) for c in copies[1:])
    assert np.array_equal(many.tsc_seen.numpy()[:16], np.ones(16))
    print(f"replicas={replicas}: OK")


@pytest.mark.parametrize("replicas", [2, 4])
def test_replicas_give_the_single_device_result(replicas):
    # A fresh process each: TF's collective group keys clash between two MirroredStrategy sizes in one process.
    done = subprocess.run([sys.executable, "-c", f"import conftest, test_model; test_model.check_replicas({replicas})"],
                          cwd=os.path.dirname(__file__), capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert done.returncode == 0 and f"replicas={replicas}: OK" in done.stdout, done.stderr[-4000:]


def test_ema_over_trainable_weights_and_teacher_bn_statistics_its_own(initial_weights):
    batches = make_batches(2)
    model, _ = train(tf.distribute.get_strategy(), initial_weights, batches[:1])
    # step 1: decay 0, so the teacher's trainable weights equal the updated student's
    for t, s in model.ema_pairs():
        np.testing.assert_allclose(t.numpy(), s.numpy(), atol=1e-7)
    # the teacher's BN moving statistics come from ITS forward pass (teacher view, initial weights), not the EMA
    probe = build_network("tiny", num_classes=K, image_size=S, dropout=0.0, fused_bn=False, name="probe")
    probe.set_weights(model.student.get_weights())  # same structure; then reset to the initial weights
    reference = new_model()
    reference.set_weights(initial_weights)
    probe.set_weights(reference.teacher.get_weights())
    probe(batches[0]["teacher_view"], training=True)
    bn_t = model.teacher.get_layer("bn0")
    np.testing.assert_allclose(bn_t.moving_mean.numpy(), probe.get_layer("bn0").moving_mean.numpy(), atol=1e-6)
    assert not np.allclose(bn_t.moving_mean.numpy(), model.student.get_layer("bn0").moving_mean.numpy())
    # step 2: decay = min(1 - 1/2, 0.99) = 0.5
    before = [t.numpy() for t, _ in model.ema_pairs()]
    model.fit(dataset(batches[1:]), epochs=1, steps_per_epoch=1, verbose=0)
    for (t, s), t0 in zip(model.ema_pairs(), before):
        np.testing.assert_allclose(t.numpy(), 0.5 * t0 + 0.5 * s.numpy(), atol=1e-6)


def test_teacher_starts_as_a_copy_of_the_student():
    model = new_model()
    for t, s in zip(model.teacher.get_weights(), model.student.get_weights()):
        np.testing.assert_array_equal(t, s)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    optimized = {id(v) for v in model.optimizer._trainable_variables}
    assert optimized == {id(v) for v in model.student.trainable_variables}  # the teacher is never optimized
    assert model.relation_dim == 4 * 4 * 32  # flatten of the tiny backbone's 4x4x32 map at 16 px
    assert new_model(relation_features="avg").relation_dim == 32


def test_restoring_a_checkpoint_continues_exactly(initial_weights, tmp_path):
    batches = make_batches(3)
    straight, _ = train(tf.distribute.get_strategy(), initial_weights, batches)
    first, _ = train(tf.distribute.get_strategy(), initial_weights, batches[:2])
    first.save_weights(str(tmp_path / "ckpt.weights.h5"))
    resumed = new_model()
    resumed.compile(optimizer=keras.optimizers.SGD(0.1))
    resumed.load_weights(str(tmp_path / "ckpt.weights.h5"))
    assert int(resumed.optimizer.iterations) == 2
    np.testing.assert_array_equal(resumed.tsc_seen.numpy(), first.tsc_seen.numpy())
    resumed.fit(dataset(batches[2:]), epochs=1, steps_per_epoch=1, verbose=0)
    assert_same(snapshot(straight), snapshot(resumed), atol=1e-6)


def test_keras_file_round_trip_reproduces_predictions(tmp_path, initial_weights):
    model, _ = train(tf.distribute.get_strategy(), initial_weights, make_batches(1), sync_bn=False)
    images = np.random.default_rng(3).normal(size=(5, S, S, 3)).astype("float32")
    path = str(tmp_path / "stsc.keras")
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    assert isinstance(loaded, STSCModel)
    strip = lambda c: {k: v for k, v in c.items() if k != "student"}  # noqa: E731 (the network is compared below)
    assert strip(loaded.get_config()) == strip(model.get_config())
    assert [l.name for l in loaded.student.layers] == [l.name for l in model.student.layers]
    assert int(loaded.optimizer.iterations) == int(model.optimizer.iterations) == 1  # compiled, state restored
    np.testing.assert_allclose(loaded.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-6)
    np.testing.assert_array_equal(loaded.tsc_memory.numpy(), model.tsc_memory.numpy())
    probs = model.predict(images, verbose=0)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)


@keras.saving.register_keras_serializable(package="stsc_tf_tests")
class MaxPoolRelations(STSCModel):
    """A user's variant: relations from max-pooled features."""

    def relation_features(self, feature_map):
        return tf.reduce_max(tf.cast(feature_map, tf.float32), axis=[1, 2])


def test_subclass_overriding_relation_features_trains_through_fit(initial_weights):
    model = new_model(MaxPoolRelations, sync_bn=False)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    history = model.fit(dataset(make_batches(2)), epochs=1, steps_per_epoch=2, verbose=0)
    assert set(LOGGED) <= set(history.history) and np.isfinite(history.history["loss"][-1])
    # the memory holds the override's features (max over the map, non-negative after ReLU)
    assert model.tsc_memory.numpy()[:8].min() >= 0 and model.tsc_memory.numpy()[:8].max() > 0
    clone = MaxPoolRelations.from_config(model.get_config())
    assert type(clone) is MaxPoolRelations


def test_test_step_reports_loss_and_auc(initial_weights):
    model, _ = train(tf.distribute.get_strategy(), initial_weights, make_batches(1))
    rng = np.random.default_rng(0)
    ds = tf.data.Dataset.from_tensor_slices({"image": rng.normal(size=(12, S, S, 3)).astype("float32"),
                                             "label": np.eye(K, dtype="float32")[np.arange(12) % K]}).batch(4)
    result = model.evaluate(ds, return_dict=True, verbose=0)
    assert set(result) == {"loss", "auc", "nonfinite"} and 0.0 <= result["auc"] <= 1.0 and result["loss"] > 0
    assert result["nonfinite"] == 0


@pytest.mark.slow
def test_densenet121_smoke():
    """DenseNet-121 at 32 px, 2 steps: the real backbone builds, trains and updates teacher and memory."""
    model = STSCModel.from_backbone("densenet121", num_classes=7, image_size=32, num_train=16, loss_config=LOSS,
                                    relation_features="avg", steps_per_epoch=1)
    model.compile(optimizer=keras.optimizers.Adam(1e-4))
    rng = np.random.default_rng(0)
    batch = {"student_view": rng.normal(size=(2, 4, 32, 32, 3)).astype("float32"),
             "teacher_view": rng.normal(size=(2, 4, 32, 32, 3)).astype("float32"),
             "label": np.zeros((2, 4, 7), "float32"), "labeled": np.array([[1.0, 0.0, 1.0, 0.0]] * 2, "float32"),
             "index": np.arange(8).reshape(2, 4).astype("int64")}
    batch["label"][:, :, 1] = batch["labeled"]
    history = model.fit(tf.data.Dataset.from_tensor_slices(batch), epochs=1, steps_per_epoch=2, verbose=0)
    assert np.isfinite(history.history["loss"][-1]) and model.relation_dim == 1024
    assert model.tsc_seen.numpy()[:8].sum() == 8
