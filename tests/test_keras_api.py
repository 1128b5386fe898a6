"""STSC as a Keras model: your own network and data, the teacher out of the trainable set, composable loss terms,
compile metrics, the batch contract, and README's "Use it from Keras" example run verbatim."""

import io
import os
import re
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from stsc_tf.data.batches import preprocess_images, stsc_dataset
from stsc_tf.errors import ConfigError
from stsc_tf.models import STSCModel, Term, register_backbone, registered_backbones, with_relation_output
from stsc_tf.models.backbones import resolve_backbone

from conftest import ROOT

S, K, N = 16, 3, 48
LOSS = dict(consistency_start_epoch=-1, consistency_rampup=0, tsc_start_epoch=0, tsc_tau=0.6, tsc_tau_mode="quantile")
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}


def data(n=N, size=S, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, K, n)
    images = np.clip(rng.normal(90, 30, (n, size, size, 3)) + 60 * np.eye(3)[labels][:, None, None, :], 0,
                     255).astype(np.uint8)
    return images, labels, np.arange(n) % 4 == 0


def custom_classifier(size=S) -> keras.Model:
    """A user's CNN ending in a softmax (with_relation_output takes the logits from under it)."""
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", name="c1")(inputs)
    x = keras.layers.BatchNormalization(name="n1")(x)
    x = keras.layers.ReLU(name="features")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.2)(x)
    return keras.Model(inputs, keras.layers.Dense(K, activation="softmax", name="head")(x), name="user_cnn")


def fit_a_little(model, images, labels, labeled, epochs=1):
    batches = stsc_dataset(images, labels, labeled, num_classes=K, batch_size=8, labeled_per_batch=2, image_size=S,
                           seed=0)
    return model.fit(batches, epochs=epochs, verbose=0)


# ------------------------------------------------------------------------------------------------ your own network
def _round_trip(model, tmp_path, x):
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)
    return loaded


def test_a_custom_cnn_trains_saves_loads_and_predicts(tmp_path):
    images, labels, labeled = data()
    student = with_relation_output(custom_classifier())
    assert student.outputs[0].shape[1:] == (S, S, 8)  # default: the last feature map
    model = STSCModel(student, num_train=N, loss_config=LOSS)
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    history = fit_a_little(model, images, labels, labeled)
    assert np.isfinite(history.history["loss"][-1]) and history.history["tc"][-1] >= 0
    x = preprocess_images(images[:6], S)
    probs = _round_trip(model, tmp_path, x).predict(x, verbose=0)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)  # one softmax, not two


def test_mobilenetv3_from_keras_applications_trains_through_fit(tmp_path):
    size = 32
    net = keras.applications.MobileNetV3Small(input_shape=(size, size, 3), weights=None, classes=K,
                                              classifier_activation="softmax", include_preprocessing=False)
    pooled = [l.name for l in net.layers if isinstance(l, keras.layers.GlobalAveragePooling2D)][0]
    model = STSCModel(with_relation_output(net, layer=pooled), num_train=N, loss_config=LOSS)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    images, labels, labeled = data(size=size)
    history = model.fit(stsc_dataset(images, labels, labeled, num_classes=K, batch_size=8, labeled_per_batch=2),
                        epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][-1])
    _round_trip(model, tmp_path, preprocess_images(images[:4], size))


@keras.saving.register_keras_serializable(package="stsc_tf_tests")
class SubclassedNet(keras.Model):
    def __init__(self, classes=K, **kwargs):
        super().__init__(**kwargs)
        self.classes = classes
        self.conv = keras.layers.Conv2D(6, 3, padding="same", activation="relu")
        self.head = keras.layers.Dense(classes)

    def call(self, x, training=False):
        features = self.conv(x)  # [B, S, S, 6]
        return features, self.head(tf.reduce_mean(features, axis=[1, 2]))

    def get_config(self):
        return {**super().get_config(), "classes": self.classes}


class NoConfigNet(SubclassedNet):
    def __init__(self):  # a constructor Keras cannot rebuild from a config
        super().__init__(K)

    def get_config(self):
        raise NotImplementedError


def test_a_subclassed_student_with_get_config_works_and_one_without_gets_a_clear_error():
    images, labels, labeled = data()
    student = SubclassedNet()
    student(tf.zeros([1, S, S, 3]))
    model = STSCModel(student, num_train=N, loss_config=LOSS, image_shape=(S, S, 3))
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    assert np.isfinite(fit_a_little(model, images, labels, labeled).history["loss"][-1])
    for t, s in zip(model.teacher.weights, model.student.weights):
        assert t.shape == s.shape
    bare = NoConfigNet()
    bare(tf.zeros([1, S, S, 3]))
    with pytest.raises(ValueError, match="get_config"):
        STSCModel(bare, num_train=N, image_shape=(S, S, 3))
    with pytest.raises(ValueError, match="with_relation_output"):
        STSCModel(custom_classifier(), num_train=N)  # one output: not (features, logits)


# ------------------------------------------------------------------------------------------------ the trainable set
def test_the_teacher_is_out_of_the_trainable_set_and_never_reaches_an_optimizer():
    model = STSCModel.from_backbone("tiny", num_classes=K, image_size=S, num_train=N, loss_config=LOSS)
    student_ids = {id(v) for v in model.student.trainable_weights}
    assert {id(v) for v in model.trainable_weights} == student_ids
    assert {id(v) for v in model.trainable_variables} == student_ids
    assert model.teacher.trainable_weights == [] and all(l.trainable for l in model.teacher.layers)
    assert model.count_params() == model.student.count_params()
    out = io.StringIO()
    model.summary(print_fn=lambda line, **kw: out.write(line + "\n"))
    trainable = sum(int(np.prod(v.shape)) for v in model.student.trainable_weights)
    assert re.search(rf"Trainable params: {trainable:,} ", out.getvalue())
    applied = []

    class Recording(keras.optimizers.SGD):
        def apply(self, grads, trainable_variables=None):
            applied.extend(id(v) for v in trainable_variables)
            return super().apply(grads, trainable_variables)

    model.compile(optimizer=Recording(0.1))
    images, labels, labeled = data()
    fit_a_little(model, images, labels, labeled)
    assert applied and set(applied) == student_ids
    assert not {id(v) for v in model.teacher.weights} & {id(v) for v in model.optimizer.variables}


def test_the_teachers_batchnorm_normalises_with_batch_statistics_in_training_mode():
    model = STSCModel.from_backbone("tiny", num_classes=K, image_size=S, num_train=N, loss_config=LOSS)
    bn = model.teacher.get_layer("bn0")
    probe = keras.Model(model.teacher.input, [bn.input, bn.output])
    x = tf.random.stateless_normal([8, S, S, 3], seed=[1, 2]) * 3.0 + 1.0
    before = bn.moving_mean.numpy().copy()
    bn_in, bn_out = probe(x, training=True)
    mean, var = tf.nn.moments(bn_in, axes=[0, 1, 2])
    expected = (bn_in - mean) / tf.sqrt(var + bn.epsilon) * bn.gamma + bn.beta
    np.testing.assert_allclose(bn_out, expected, atol=1e-4)  # batch statistics, not the moving ones
    assert not np.allclose(bn.moving_mean.numpy(), before)  # and its own moving statistics move
    _, frozen = probe(x, training=False)
    assert not np.allclose(frozen, bn_out, atol=1e-3)


# ------------------------------------------------------------------------------------------------ loss terms
@keras.saving.register_keras_serializable(package="stsc_tf_tests")
class EntropySTSC(STSCModel):
    """A user's term in a few lines: entropy minimisation on the unlabeled rows."""

    TERMS = STSCModel.TERMS + ("ent",)

    def loss_terms(self, step):
        terms = super().loss_terms(step)
        p = tf.nn.softmax(step.student_logits)  # [b, K]
        entropy = -tf.reduce_sum(p * tf.math.log(p + 1e-8), axis=1)  # [b]
        terms["ent"] = Term(0.5 * step.lam, self.global_mean(entropy, ~step.labeled))
        return terms


def test_a_subclass_adds_a_term_that_is_trained_logged_and_checkpointed(tmp_path):
    images, labels, labeled = data()
    keras.utils.set_random_seed(0)
    base = STSCModel.from_backbone("tiny", num_classes=K, image_size=S, num_train=N, loss_config=LOSS, dropout=0.0)
    weights = base.get_weights()
    models = {}
    for cls in (STSCModel, EntropySTSC):
        model = cls.from_backbone("tiny", num_classes=K, image_size=S, num_train=N, loss_config=LOSS, dropout=0.0)
        model.set_weights(weights)
        model.compile(optimizer=keras.optimizers.SGD(0.5))
        models[cls] = (model, fit_a_little(model, images, labels, labeled).history)
    model, history = models[EntropySTSC]
    assert "ent" in history and history["ent"][-1] > 0
    terms = sum(history[k][-1] for k in ("sup", "cons", "sc", "tc", "l2"))
    assert history["loss"][-1] > terms  # the total carries 0.5 * lambda * ent
    changed = [not np.allclose(a, b) for a, b in zip(model.student.get_weights(),
                                                      models[STSCModel][0].student.get_weights())]
    assert any(changed)  # the term's gradient moved the student
    path = str(tmp_path / "ent.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded) is EntropySTSC and loaded.TERMS[-1] == "ent"
    x = preprocess_images(images[:4], S)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)


class Undeclared(STSCModel):
    def loss_terms(self, step):
        return {**super().loss_terms(step), "extra": Term(1.0, tf.constant(0.0))}


def test_a_term_not_declared_in_terms_is_refused_by_name():
    model = Undeclared.from_backbone("tiny", num_classes=K, image_size=S, num_train=N, loss_config=LOSS)
    model.compile(optimizer="sgd")
    with pytest.raises(ValueError, match=r"\['extra'\], which are not in Undeclared.TERMS"):
        fit_a_little(model, *data())


# ------------------------------------------------------------------------------------------------ compile and data
def test_compile_metrics_are_honoured_and_compile_loss_is_refused():
    model = STSCModel.from_backbone("tiny", num_classes=K, image_size=S, num_train=N, loss_config=LOSS)
    with pytest.raises(ValueError, match="computes its own losses"):
        model.compile(optimizer="adam", loss="mse")
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  metrics=[keras.metrics.AUC(multi_label=True, num_labels=K, name="macro_auc"),
                           keras.metrics.F1Score(average="macro", threshold=0.3, name="f1"),
                           keras.metrics.CategoricalAccuracy(name="acc")])
    images, labels, labeled = data()
    fit_a_little(model, images, labels, labeled, epochs=3)
    x, y = preprocess_images(images, S), keras.utils.to_categorical(labels, K)
    result = model.evaluate(x, y, verbose=0, return_dict=True)
    assert {"macro_auc", "f1", "acc", "auc", "loss"} <= set(result)
    probs = model.predict(x, verbose=0)
    np.testing.assert_allclose(result["acc"], np.mean(probs.argmax(1) == labels), atol=1e-6)
    np.testing.assert_allclose(result["macro_auc"], result["auc"], atol=1e-6)  # the built-in val AUC is macro too


def test_train_step_refuses_anything_but_the_batch_dict_naming_the_keys():
    model = STSCModel.from_backbone("tiny", num_classes=K, image_size=S, num_train=N, loss_config=LOSS)
    model.compile(optimizer="sgd")
    images, labels, _ = data()
    x = preprocess_images(images, S)
    with pytest.raises(ValueError, match=r"dicts with keys \['student_view', 'teacher_view', 'label', 'labeled', "
                                         r"'index'\].*stsc_dataset"):
        model.fit(x, keras.utils.to_categorical(labels, K), epochs=1, steps_per_epoch=1, verbose=0)
    partial = tf.data.Dataset.from_tensors({"student_view": x[:8], "teacher_view": x[:8]})
    with pytest.raises(ValueError, match=r"got \['student_view', 'teacher_view'\]"):
        model.fit(partial, epochs=1, verbose=0)


def test_evaluate_and_predict_take_images_tuples_and_dicts():
    model = STSCModel.from_backbone("tiny", num_classes=K, image_size=S, num_train=N, loss_config=LOSS)
    model.compile(optimizer="sgd")
    images, labels, _ = data()
    x, y = preprocess_images(images, S).numpy(), keras.utils.to_categorical(labels, K)
    arrays = model.evaluate(x, y, batch_size=16, verbose=0, return_dict=True)
    tuples = model.evaluate(tf.data.Dataset.from_tensor_slices((x, y)).batch(16), verbose=0, return_dict=True)
    dicts = model.evaluate(tf.data.Dataset.from_tensor_slices({"image": x, "label": y}).batch(16), verbose=0,
                           return_dict=True)
    assert arrays == pytest.approx(tuples) and arrays == pytest.approx(dicts)
    p = model.predict(x, verbose=0)
    np.testing.assert_allclose(model.predict(tf.data.Dataset.from_tensor_slices({"image": x}).batch(16), verbose=0), p,
                               atol=1e-6)
    np.testing.assert_allclose(model.predict(tf.data.Dataset.from_tensor_slices((x, y)).batch(16), verbose=0), p,
                               atol=1e-6)
    np.testing.assert_allclose(model.predict((x, y), batch_size=16, verbose=0), p, atol=1e-6)
    np.testing.assert_allclose(model((x, y)), p, atol=1e-5)
    indices = model.evaluate(x, labels, batch_size=16, verbose=0, return_dict=True)  # class indices, [N] or [N, 1]
    assert indices == pytest.approx(arrays)
    assert model.evaluate(x, labels[:, None], batch_size=16, verbose=0, return_dict=True) == pytest.approx(arrays)
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError), match=f"{K} classes"):
        model.evaluate(x, y[:, :2], batch_size=16, verbose=0)  # at tracing, or at run time after a relaxed retrace
    for wrong in (np.full(len(x), K), np.full(len(x), -1)):  # tf.one_hot would make rows of zeros
        with pytest.raises(tf.errors.InvalidArgumentError, match=f"0..{K - 1}"):
            model.evaluate(x, wrong, batch_size=16, verbose=0)
    assert model.evaluate((x, y), batch_size=16, verbose=0, return_dict=True) == pytest.approx(arrays)


def test_with_relation_output_takes_sequential_models_and_refuses_hidden_probabilities():
    sequential = keras.Sequential([keras.Input((S, S, 3)), keras.layers.Conv2D(4, 3, name="maps"),
                                   keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(K, activation="softmax")])
    network = with_relation_output(sequential)
    features, logits = network(np.zeros((2, S, S, 3), np.float32))
    assert features.shape == (2, S - 2, S - 2, 4) and logits.shape == (2, K)
    inputs = keras.Input((S, S, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3, name="maps")(inputs))
    hidden = keras.layers.Lambda(lambda t: keras.ops.softmax(t))(keras.layers.Dense(K)(x))  # a softmax it cannot see
    with pytest.raises(ValueError, match="probabilities, not logits"):
        with_relation_output(keras.Model(inputs, hidden), layer="maps")
    # plain logits are never mistaken for probabilities: a zero-initialised head, a small constant one
    for init in ("zeros", keras.initializers.Constant(0.1)):
        head = keras.layers.Dense(K, kernel_initializer=init, bias_initializer=init)(x)
        with_relation_output(keras.Model(inputs, head), layer="maps")
    softmax_v2 = keras.layers.Dense(K, activation=tf.nn.softmax)(x)  # TensorFlow's softmax is stripped too
    network = with_relation_output(keras.Model(inputs, softmax_v2), layer="maps")
    assert network.layers[-1].get_config()["activation"] == "linear"


def test_labels_that_do_not_fit_the_model_are_refused_by_name():
    images, labels, labeled = data()
    with pytest.raises(ValueError, match="num_classes"):  # indices alone cannot tell an absent last class
        stsc_dataset(images, labels, labeled, batch_size=8, labeled_per_batch=2)
    with pytest.raises(ValueError, match="0..1"):
        stsc_dataset(images, labels, labeled, num_classes=2, batch_size=8, labeled_per_batch=2)
    absent_last = np.where(labels == K - 1, 0, labels)  # class K-1 absent from the labels: still K columns
    ds = stsc_dataset(images, absent_last, labeled, num_classes=K, batch_size=8, labeled_per_batch=2)
    assert ds.element_spec["label"].shape[-1] == K
    pairs = tf.data.Dataset.from_tensor_slices((images, labels))  # scalar class indices
    batch = next(iter(stsc_dataset(pairs, labeled=labeled, num_classes=K, batch_size=8, labeled_per_batch=2)))
    assert batch["label"].shape == (8, K)
    beyond = tf.data.Dataset.from_tensor_slices((images, np.where(labels == 0, K + 4, labels)))
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"0..{K - 1}"):
        list(stsc_dataset(beyond, labeled=labeled, num_classes=K, batch_size=8, labeled_per_batch=2))
    model = STSCModel.from_backbone("tiny", num_classes=K, image_size=S, num_train=N, loss_config=LOSS)
    model.compile(optimizer="sgd")
    narrow = stsc_dataset(images, np.eye(2)[labels % 2], labeled, batch_size=8, labeled_per_batch=2)
    with pytest.raises(ValueError, match=rf"\[B, {K}\]"):
        model.fit(narrow, epochs=1, verbose=0)
    small = STSCModel.from_backbone("tiny", num_classes=K, image_size=S, num_train=N // 2, loss_config=LOSS)
    small.compile(optimizer="sgd")
    with pytest.raises(tf.errors.InvalidArgumentError, match="num_train"):  # indices past the TSC memory
        small.fit(stsc_dataset(images, labels, labeled, num_classes=K, batch_size=8, labeled_per_batch=2), epochs=1,
                  verbose=0)


def test_stsc_dataset_from_a_dataset_of_pairs_composes_the_labeled_share_and_indices():
    images, labels, labeled = data()
    pairs = tf.data.Dataset.from_tensor_slices((images, keras.utils.to_categorical(labels, K)))
    ds = stsc_dataset(pairs, labeled=labeled, num_classes=K, batch_size=8, labeled_per_batch=2, num_replicas=2, seed=3)
    assert int(ds.cardinality()) == int(np.ceil(labeled.sum() / 2))
    for batch in ds.take(3):
        index = batch["index"].numpy()
        np.testing.assert_array_equal(batch["labeled"].numpy(), [1, 0, 0, 0, 1, 0, 0, 0])  # one per replica slice
        assert labeled[index[[0, 4]]].all() and not labeled[index[[1, 2, 3, 5, 6, 7]]].any()
        np.testing.assert_array_equal(batch["label"].numpy()[[1, 2, 3]], 0.0)  # unlabeled rows carry no label
        assert batch["student_view"].shape == (8, S, S, 3)
        assert not np.allclose(batch["student_view"], batch["teacher_view"])  # two independent draws


def test_input_forms_stsc_dataset_and_fit_do_not_take_are_refused_saying_what_to_pass():
    images, labels, labeled = data()
    one_hot = keras.utils.to_categorical(labels, K)
    common = dict(labeled=labeled, num_classes=K, batch_size=8, labeled_per_batch=2)
    dicts = tf.data.Dataset.from_tensor_slices({"image": images, "label": one_hot})
    with pytest.raises(ValueError, match="dataset of dicts.*map it to \\(image, label\\) pairs"):
        stsc_dataset(dicts, **common)
    with pytest.raises(ValueError, match="must be \\(image, label\\) pairs"):
        stsc_dataset(tf.data.Dataset.from_tensor_slices(images), **common)
    batched = tf.data.Dataset.from_tensor_slices((images, one_hot)).batch(6)
    with pytest.raises(ValueError, match="unbatched"):
        stsc_dataset(batched, num_samples=N, **common)
    model = STSCModel.from_backbone("tiny", num_classes=K, image_size=S, num_train=N, loss_config=LOSS)
    model.compile(optimizer="adam")
    with pytest.raises(ValueError, match="dicts with keys.*not \\(x, y\\) arrays.*stsc_dataset"):
        model.fit(preprocess_images(images, S), one_hot, steps_per_epoch=2)


def test_no_warning_from_the_package_during_fit_evaluate_predict():
    model = STSCModel.from_backbone("tiny", num_classes=K, image_size=S, num_train=N, loss_config=LOSS)
    model.compile(optimizer="adam")
    images, labels, labeled = data()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit_a_little(model, images, labels, labeled)
        x = preprocess_images(images, S)
        model.evaluate(x, keras.utils.to_categorical(labels, K), verbose=0)
        model.predict(x, verbose=0)
    texts = [str(w.message) for w in caught]
    for known in ("structure of `inputs`", "shuffle=True", "ran out of data"):
        assert not [t for t in texts if known in t], texts


# ------------------------------------------------------------------------------------------------ registry and CLI
def test_backbone_choices_come_from_the_registry_and_a_module_function_is_imported():
    @register_backbone("test_two_layers")
    def two_layers(*, image_size, weights):
        x = inputs = keras.Input((image_size, image_size, 3))
        return keras.Model(inputs, keras.layers.Conv2D(4, 3, name="only")(x))

    assert "test_two_layers" in registered_backbones() and {"tiny", "densenet121"} <= set(registered_backbones())
    model = STSCModel.from_backbone("test_two_layers", num_classes=K, image_size=S, num_train=4)
    assert model.relation_dim == 14 * 14 * 4
    sys.path.insert(0, os.path.dirname(__file__))
    try:
        assert resolve_backbone("user_backbones:small_cnn").__name__ == "small_cnn"
    finally:
        sys.path.remove(os.path.dirname(__file__))
    with pytest.raises(ConfigError, match=r"--backbone='vgg' is unknown; choose one of \[.*'test_two_layers'"):
        resolve_backbone("vgg")
    with pytest.raises(ConfigError, match="cannot import 'no_such_module'"):
        resolve_backbone("no_such_module:f")
    helpfull = subprocess.run([sys.executable, "-m", "stsc_tf.train", "--helpfull"], capture_output=True, text=True,
                              env=ENV, cwd=ROOT, timeout=120).stdout
    backbone_help = helpfull.split("--backbone:", 1)[1].split("--", 1)[0]
    assert all(name in backbone_help for name in ("tiny", "densenet121", "resnet50", "efficientnetv2_b0"))


def test_the_cli_trains_and_evaluates_a_users_backbone_builder(synth_isic_records, tmp_path):
    env = {**ENV, "PYTHONPATH": os.path.dirname(__file__)}
    run = tmp_path / "run"
    common = [f"--data_dir={synth_isic_records}", f"--model_dir={run}", "--backbone=user_backbones:small_cnn",
              "--image_size=16", "--batch_size=8", "--labeled_per_batch=2", "--steps_per_epoch=2", "--epochs=1",
              "--strategy=none", "--relation_every_epochs=0"]
    done = subprocess.run([sys.executable, "-m", "stsc_tf.train", *common], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "structure of `inputs`" not in done.stderr and "shuffle=True" not in done.stderr
    ev = subprocess.run([sys.executable, "-m", "stsc_tf.evaluate", f"--model_dir={run}", "--bootstrap=0"],
                        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert ev.returncode == 0 and "STSC (teacher)" in ev.stdout, ev.stderr[-3000:]


def test_readme_use_it_from_keras_example_runs_verbatim(tmp_path):
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = readme.split("## Use it from Keras", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert 15 <= len(code.strip().splitlines()) <= 30
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=tmp_path,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "stsc.keras").is_file() and "roc_auc" in done.stdout
