"""Input pipeline: shapes, views, replica slices, eval determinism; augmentation eagerly AND inside tf.data."""

import math

import numpy as np
import pytest
import tensorflow as tf

from stsc_tf.config import DataConfig
from stsc_tf.data import augment
from stsc_tf.data.batches import check_batch
from stsc_tf.data.pipeline import RecordSet, eval_dataset, train_dataset
from stsc_tf.data.splits import labeled_subset, stratified_group_split
from stsc_tf.errors import ConfigError, DataError


def cfg(data_dir, **kw):
    base = dict(data_dir=data_dir, image_size=24, batch_size=16, labeled_per_batch=4, labeled_ratio=0.3,
                shuffle_buffer=64, seed=3)
    base.update(kw)
    return DataConfig(**base)


def test_training_element_shapes_dtypes_and_views(synth_isic_records):
    rs = RecordSet.open(synth_isic_records)
    td = train_dataset(rs, cfg(synth_isic_records))
    b = next(iter(td.dataset))
    assert b["student_view"].shape == (16, 24, 24, 3) and b["student_view"].dtype == tf.float32
    assert b["teacher_view"].shape == (16, 24, 24, 3)
    assert b["label"].shape == (16, 7) and b["label"].dtype == tf.float32
    assert b["labeled"].dtype == tf.float32 and b["index"].dtype == tf.int64
    # the two views are independent draws: they differ, but not wildly (same image, small affine)
    diff = float(tf.reduce_mean(tf.abs(b["student_view"] - b["teacher_view"])))
    assert 0.01 < diff < 1.5
    # labels only for labeled samples, each one-hot; unlabeled samples carry zeros
    labels, mask = b["label"].numpy(), b["labeled"].numpy() > 0.5
    assert np.all(labels[mask].sum(1) == 1) and np.all(labels[~mask] == 0)
    assert set(b["index"].numpy()[mask]) <= set(td.labeled_indices)
    assert not set(b["index"].numpy()[~mask]) & set(td.labeled_indices)
    assert td.steps_per_epoch == math.ceil(len(td.labeled_indices) / 4)
    assert abs(len(td.labeled_indices) - 0.3 * rs.count("train")) <= 2


@pytest.mark.parametrize("replicas", [1, 2, 4])
def test_every_replica_slice_holds_the_same_labeled_share(synth_isic_records, replicas):
    td = train_dataset(RecordSet.open(synth_isic_records), cfg(synth_isic_records, labeled_per_batch=8), replicas)
    for b in td.dataset.take(3):
        slices = b["labeled"].numpy().reshape(replicas, -1) > 0.5
        assert np.all(slices.sum(1) == 8 // replicas)
        assert np.all(slices[:, : 8 // replicas])  # labeled rows first in each slice


def test_batch_composition_errors_name_the_flag():
    with pytest.raises(ConfigError, match="--labeled_per_batch .*smaller than --batch_size"):
        check_batch(16, 16, 1)
    with pytest.raises(ConfigError, match="--batch_size \\(18\\) is not divisible by the 4 replicas"):
        check_batch(18, 4, 4)
    with pytest.raises(ConfigError, match="--labeled_per_batch \\(6\\) is not divisible"):
        check_batch(16, 6, 4)


def test_ratio_one_makes_every_slot_labeled(synth_isic_records):
    td = train_dataset(RecordSet.open(synth_isic_records), cfg(synth_isic_records, labeled_ratio=1.0))
    b = next(iter(td.dataset))
    assert (b["labeled"].numpy() == 1).all() and len(td.labeled_indices) == RecordSet.open(synth_isic_records).count("train")


def test_training_stream_is_reproducible_by_seed(synth_isic_records):
    a = next(iter(train_dataset(RecordSet.open(synth_isic_records), cfg(synth_isic_records)).dataset))
    b = next(iter(train_dataset(RecordSet.open(synth_isic_records), cfg(synth_isic_records)).dataset))
    np.testing.assert_array_equal(a["index"], b["index"])
    np.testing.assert_allclose(a["student_view"], b["student_view"])


def test_eval_dataset_is_deterministic(synth_isic_records):
    rs = RecordSet.open(synth_isic_records)
    runs = [[(e["id"].numpy().tolist(), e["image"].numpy()) for e in eval_dataset(rs, "test", 24, 5)]
            for _ in range(2)]
    assert [r[0] for r in runs[0]] == [r[0] for r in runs[1]]
    for (_, x), (_, y) in zip(*runs):
        np.testing.assert_array_equal(x, y)
    assert sum(len(r[0]) for r in runs[0]) == rs.count("test")
    with pytest.raises(DataError, match="split 'nope'"):
        eval_dataset(rs, "nope", 24, 5)


def test_missing_manifest_is_refused(tmp_path):
    with pytest.raises(DataError, match="no manifest.json"):
        RecordSet.open(str(tmp_path))


# ------------------------------------------------------------------------------------------------ augmentation
def test_identity_affine_and_flip():
    img = tf.random.uniform([2, 9, 11, 3], 0, 255, seed=1)
    same = augment.random_affine(img, tf.constant([1, 2]), rotation_deg=0.0, translate=0.0, hflip=False)
    np.testing.assert_allclose(same, img, atol=1e-4)
    m = augment.affine_matrices(tf.constant([0, 0], tf.int64), 64, 9, 11, 0.0, 0.0, True).numpy()
    flipped = m[:, 0] < 0
    assert 10 < flipped.sum() < 54  # about half are mirrored
    out = augment.random_affine(img[:1], tf.constant([0, 0]), 0.0, 0.0, True)
    # whichever way the first draw went, the result is the image or its mirror
    assert np.allclose(out, img[:1], atol=1e-4) or np.allclose(out, img[:1, :, ::-1], atol=1e-4)


def test_rotation_and_translation_bounds():
    m = augment.affine_matrices(tf.constant([5, 6], tf.int64), 500, 100, 100, 10.0, 0.02, False).numpy()
    angles = np.degrees(np.arctan2(-m[:, 3], m[:, 4]))
    assert np.abs(angles).max() <= 10.0 + 1e-4 and np.abs(angles).max() > 9.0
    # the image centre moves by at most the translation (2 px at 100 px)
    c = 49.5
    src_x = m[:, 0] * c + m[:, 1] * c + m[:, 2]
    assert np.abs(src_x - c).max() <= 2.0 * math.sqrt(2) + 1e-3


def test_augmentation_eager_equals_tf_data():
    """big_vision's rule: run each op eagerly and inside tf.data; they must agree."""
    img = tf.random.uniform([4, 16, 16, 3], 0, 255, seed=2)
    seed = tf.constant([7, 8], tf.int64)
    eager = augment.normalize(augment.random_affine(img, seed))
    graph = next(iter(tf.data.Dataset.from_tensors(img).map(lambda x: augment.normalize(augment.random_affine(x, seed)))))
    np.testing.assert_allclose(eager, graph, atol=1e-5)
    enc = tf.io.encode_png(tf.cast(img[0], tf.uint8))
    eager = augment.preprocess_bytes(enc, 12)
    graph = next(iter(tf.data.Dataset.from_tensors(enc).map(lambda e: augment.preprocess_bytes(e, 12))))
    np.testing.assert_allclose(eager, graph, atol=1e-5)
    assert eager.shape == (12, 12, 3)


def test_normalize_matches_torchvision_convention():
    px = tf.constant([[[255.0, 0.0, 127.5]]])
    expected = [(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (0.5 - 0.406) / 0.225]
    np.testing.assert_allclose(augment.normalize(px)[0, 0], expected, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ splits
def test_group_split_keeps_groups_whole_and_ratios():
    rng = np.random.default_rng(0)
    groups = [f"g{i // 3}" for i in range(600)]
    labels = np.eye(5)[[int(rng.integers(5)) if i % 3 == 0 else 0 for i in range(600)]]
    labels = np.repeat(labels[::3], 3, axis=0)  # a group shares its label
    split = stratified_group_split(labels, groups, seed=1)
    for g in set(groups):
        assert len({s for s, gg in zip(split, groups) if gg == g}) == 1
    frac = {s: np.mean(split == s) for s in ("train", "val", "test")}
    assert abs(frac["train"] - 0.7) < 0.03 and abs(frac["val"] - 0.1) < 0.03 and abs(frac["test"] - 0.2) < 0.03
    for k in range(5):  # stratified: every class near its share in each split
        share = labels[split == "test", k].sum() / labels[:, k].sum()
        assert abs(share - 0.2) < 0.06
    np.testing.assert_array_equal(split, stratified_group_split(labels, groups, seed=1))


def test_multilabel_split_keeps_rare_labels_in_every_split():
    labels = np.zeros((40, 4))
    labels[:, 0] = 1
    labels[[1, 7, 20], 3] = 1  # a label with exactly 3 samples
    split = stratified_group_split(labels, [str(i) for i in range(40)], seed=0)
    assert all(labels[split == s, 3].sum() == 1 for s in ("train", "val", "test"))


def test_labeled_subset_is_stratified_and_seeded():
    labels = np.eye(3)[np.arange(300) % 3]
    idx = labeled_subset(labels, 0.1, seed=4)
    assert len(idx) == 30 and np.all(labels[idx].sum(0) == 10)
    np.testing.assert_array_equal(idx, labeled_subset(labels, 0.1, seed=4))
    assert not np.array_equal(idx, labeled_subset(labels, 0.1, seed=5))
    with pytest.raises(DataError, match="in \\(0, 1\\]"):
        labeled_subset(labels, 0.0, 0)


@pytest.mark.parametrize("seed", range(5))
def test_labeled_subset_labels_every_present_class_even_a_single_image(seed):
    labels = np.eye(4)[np.r_[np.zeros(200, int), np.ones(30, int), [2], np.full(5, 3)]]  # class 2: one image
    idx = labeled_subset(labels, 0.01, seed=seed)
    assert np.all(labels[idx].sum(0) >= 1), labels[idx].sum(0)
    none = np.zeros((50, 3))  # multi-label, all 'No Finding', a ratio too small for one row
    assert len(labeled_subset(none, 0.001, seed=seed)) >= 1


def test_stream_started_at_an_epoch_equals_the_uninterrupted_stream(synth_isic_records):
    rs = RecordSet.open(synth_isic_records)
    c = cfg(synth_isic_records)
    full = train_dataset(rs, c, steps_per_epoch=3)
    later = train_dataset(rs, c, steps_per_epoch=3, start_epoch=2)
    a = list(full.dataset.skip(6).take(3))
    b = list(later.dataset.take(3))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["index"], y["index"])
        np.testing.assert_allclose(x["teacher_view"], y["teacher_view"])
