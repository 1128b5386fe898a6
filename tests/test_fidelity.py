"""SRC-MT parity points (gate, weighted losses, relation features after dropout, Adam epsilon, flagfiles) and
temporal sub-structures that are sub-structures (the zscore rule, the largest-component watch, explain substructures).
The gate and the weighted CE are checked against hand-computed and PyTorch values in test_losses.py."""

import dataclasses
import json
import logging
import os

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from absl import flags as absl_flags

from stsc_tf import callbacks as callbacks_lib
from stsc_tf import explaining, losses, run_folder
from stsc_tf.config import Config, DataConfig, LossConfig, ModelConfig, TrainConfig
from stsc_tf.errors import ConfigError
from stsc_tf.models.backbones import build_network
from stsc_tf.models.stsc import STSCModel
from stsc_tf.training import run_training

from conftest import ROOT


# ------------------------------------------------------------------------------------------------ parity
def test_relation_features_avg_are_the_pooled_features_after_the_dropout_as_in_srcmt():
    net = build_network("tiny", num_classes=3, image_size=16, dropout=0.5, relation_features="avg")
    assert net.outputs[0] is net.get_layer("dropout").output  # drop(pool(relu(features)))
    x = tf.random.stateless_uniform([4, 16, 16, 3], seed=[0, 1])
    a, _ = net(x, training=True)
    b, _ = net(x, training=True)
    assert not np.allclose(a, b)  # the student's and the teacher's masks differ, as in SRC-MT
    assert np.mean(a.numpy() == 0) > 0.3  # dropout zeroes about half of them
    pooled = keras.Model(net.input, net.get_layer("pool").output)(x, training=False)
    np.testing.assert_allclose(net(x, training=False)[0], pooled, atol=1e-6)  # no dropout at inference
    before = build_network("tiny", num_classes=3, image_size=16, dropout=0.5, relation_features="avg_before_dropout")
    assert len(before.outputs[0].shape) == 4  # the map; the model averages it, no dropout
    model = STSCModel(before, num_train=4, relation_reduction="avg")
    assert model.relation_dim == 32


def test_adam_epsilon_is_pytorchs_by_default():
    optimizer = run_folder.make_optimizer(Config(), steps_per_epoch=10)
    assert optimizer.epsilon == 1e-8 and TrainConfig().adam_epsilon == 1e-8


def test_class_weights_come_from_the_labeled_subset(synth_isic_records, tmp_path):
    cfg = Config(data=DataConfig(data_dir=synth_isic_records, image_size=16, batch_size=8, labeled_per_batch=2,
                                 labeled_ratio=0.3),
                 model=ModelConfig(backbone="tiny"),
                 loss=LossConfig(class_weighted_supervised=True, class_weighted_consistency=True),
                 train=TrainConfig(model_dir=str(tmp_path / "run"), epochs=1, steps_per_epoch=1, strategy="none",
                                   relation_every_epochs=0))
    run_training(cfg, bootstrap=0)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    labeled = run_folder.read_csv(str(tmp_path / "run" / "labeled_ids.csv"), dtype={"id": str})
    train = pd.read_csv(os.path.join(synth_isic_records, "train.csv"), dtype={"id": str}, keep_default_na=False)
    names = train.set_index("id").loc[labeled["id"], "labels"]
    manifest = json.loads(open(os.path.join(synth_isic_records, "manifest.json")).read())
    dataset = sum(s["count"] for s in manifest["splits"].values())
    scale = dataset / len(labeled)  # the labeled subset's proportions at the dataset's size, as SRC-MT counts
    counts = [max((names == c).sum() * scale, 1) for c in info["class_names"]]
    np.testing.assert_allclose(info["class_weights"], [10000.0 / c for c in counts], rtol=1e-6)
    all_counts = [max((train["labels"] == c).sum(), 1) for c in info["class_names"]]  # labels the user lacks
    assert not np.allclose(info["class_weights"], [10000.0 / c for c in all_counts])


def _flagfile(name):
    """{flag: value} of a flagfile as absl reads it (a bare --name is 'true'), and its text."""
    path = os.path.join(ROOT, "configs", name)
    args = absl_flags.FLAGS.read_flags_from_files([f"--flagfile={path}"])
    parsed = dict(a[2:].split("=", 1) if "=" in a else (a[2:], "true") for a in args)
    return parsed, open(path).read()


def test_flagfiles_follow_srcmt_where_the_paper_is_silent_and_say_so():
    isic, isic_text = _flagfile("isic.flags")
    assert isic["class_weighted_supervised"] == "true" and isic["class_weighted_consistency"] == "true"
    assert "labeled subset" in isic_text and "FULL" in isic_text  # the difference from SRC-MT's counts, said
    assert isic["adam_epsilon"] == "1e-8" and isic["consistency_start_epoch"] == "20"
    chest, chest_text = _flagfile("chest.flags")
    assert "noclass_weighted_supervised" in chest and "noclass_weighted_consistency" in chest
    assert "Loss_Ones" in chest_text
    assert "random 7:1:2" in chest_text and "--split=official" not in chest_text.split("Convert first:")[1].split(
        "\n")[1]
    readme = open(os.path.join(ROOT, "README.md")).read()
    chest_convert = [l for l in readme.splitlines() if "stsc_tf.convert --dataset=chestxray14" in l]
    assert chest_convert and all("--split=official" not in l for l in chest_convert)
    for text in (isic_text, chest_text):
        assert "--tsc_tau_mode=zscore" in text


# ------------------------------------------------------------------------------------------------ sub-structures
def clustered_features(sizes=(6, 5, 4, 3), loners=6, d=64, noise=0.15, seed=0):
    """Post-ReLU-like features: a few clusters (a shared pattern each) plus loners, on a common positive base."""
    rng = np.random.default_rng(seed)
    base = np.abs(rng.normal(1.0, 0.1, d))
    rows, labels = [], []
    for c, n in enumerate(sizes):
        pattern = np.maximum(rng.normal(0, 1, d), 0)
        rows += [base + pattern + noise * np.abs(rng.normal(0, 1, d)) for _ in range(n)]
        labels += [c] * n
    rows += [base + np.maximum(rng.normal(0, 1, d), 0) for _ in range(loners)]
    labels += [-1] * loners
    return np.array(rows, np.float32), np.array(labels)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_samples_of_one_cluster_land_in_one_stable_sub_structure(seed):
    f_prev, labels = clustered_features(seed=seed)
    f_now = f_prev + np.abs(np.random.default_rng(seed + 1).normal(0, 0.05, f_prev.shape)).astype(np.float32)
    r_prev, r_now = (losses.relation_matrix(tf.constant(f)).numpy() for f in (f_prev, f_now))
    # every entry sits near 1/sqrt(B) on such features: the old default merges clusters and loners
    old, _ = explaining.stable_components(r_now, r_prev, 1.0, "relative", "either")
    assert any(len(set(labels[c])) > 1 for c in old)
    cfg = LossConfig()
    components, _ = explaining.stable_components(r_now, r_prev, cfg.tsc_tau, cfg.tsc_tau_mode, cfg.tsc_edges)
    assert len(components) >= 3  # several sub-structures, not one giant one
    owners = [set(labels[c].tolist()) for c in components]
    assert all(len(o) == 1 and o != {-1} for o in owners)  # each holds one cluster's samples, no loner
    found = [o.pop() for o in owners]
    assert len(found) == len(set(found))  # a cluster's samples land in ONE sub-structure, never split
    covered = sum(len(c) for c in components) / np.sum(labels >= 0)
    assert covered >= 0.5  # most clustered samples are in a sub-structure


def test_the_largest_component_is_logged_and_one_giant_component_is_warned_about_once(caplog):
    watch = callbacks_lib.StructureWatch(global_batch=32, tsc_start_epoch=2, patience=3)
    caplog.set_level(logging.WARNING, logger="stsc_tf")
    for epoch in range(8):
        watch.on_epoch_end(epoch, {"tsc_largest_component": 30.0})
    assert caplog.text.count("one stable sub-structure has held") == 1 and "--tsc_tau" in caplog.text
    caplog.clear()
    quiet = callbacks_lib.StructureWatch(global_batch=32, tsc_start_epoch=0, patience=3)
    for epoch, size in enumerate([30, 30, 4, 30, 30, 5]):  # never three epochs in a row
        quiet.on_epoch_end(epoch, {"tsc_largest_component": float(size)})
    assert not caplog.text
    mask, monitors = losses.stable_substructure_mask(tf.eye(4) * 0 + 1.0, tf.ones([4, 4]), seen=tf.ones([4], tf.bool),
                                                     tau=0.5, tau_mode="absolute")
    assert float(monitors["largest_component"]) == 4.0


def test_explain_substructures_draws_the_stable_sub_structures_of_a_run(synth_isic_records, tmp_path):
    cfg = Config(data=DataConfig(data_dir=synth_isic_records, image_size=16, batch_size=8, labeled_per_batch=2,
                                 labeled_ratio=0.5),
                 model=ModelConfig(backbone="tiny"),
                 loss=LossConfig(consistency_start_epoch=-1, consistency_rampup=1, tsc_start_epoch=1),
                 train=TrainConfig(model_dir=str(tmp_path / "run"), epochs=3, steps_per_epoch=3, strategy="none",
                                   relation_every_epochs=1))
    run_training(cfg, bootstrap=0)
    relations = tmp_path / "run" / "relations"
    batch = np.load(relations / "batch.npz")
    assert len(batch["ids"]) == len(batch["labels"]) == len(batch["thumbnails"]) > 0
    path = explaining.substructures_run(str(tmp_path / "run"))
    assert path == str(tmp_path / "run" / "substructures.png") and os.path.getsize(path) > 10_000
    log = pd.read_csv(tmp_path / "run" / "log.csv")
    assert "tsc_largest_component" in log.columns
    # no recordings and one epoch: best and last are the same weights, so there is no change to draw
    one = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, model_dir=str(tmp_path / "one"), epochs=1,
                                                             relation_every_epochs=0))
    run_training(one, bootstrap=0)
    with pytest.raises(ConfigError, match="same weights.*--relation_every_epochs"):
        explaining.substructures_run(str(tmp_path / "one"))


def test_a_row_whose_relations_are_all_alike_has_no_edge():
    r = np.full((6, 6), 0.4, np.float32)
    r[:3, :3] = np.array([[1.0, 0.9, 0.1], [0.9, 1.0, 0.1], [0.1, 0.1, 1.0]])  # rows 3..5: constant off the diagonal
    t = losses.tsc_threshold(tf.constant(r), 1.0, "zscore").numpy()
    assert np.all(np.isinf(t[3:])) and np.all(np.isfinite(t[:3]))
    components, _ = explaining.stable_components(r, r, 1.0, "zscore", "either")
    assert all(max(c) < 3 for c in components)  # constant rows never join (they used to link the whole batch)
