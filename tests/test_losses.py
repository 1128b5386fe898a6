"""Loss terms against hand-computed values, invariants, SRC-MT's semantics (NumPy), and the TSC mask on graphs."""

import numpy as np
import pytest
import tensorflow as tf

from stsc_tf import losses, schedules


def np_relation_mse_sum(a, b):
    """SRC-MT's relation_mse_loss (torch code, in NumPy), summed and divided by the batch size as SRC-MT does."""
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    sa, sb = a @ a.T, b @ b.T
    na = sa / np.linalg.norm(sa, axis=1, keepdims=True)
    nb = sb / np.linalg.norm(sb, axis=1, keepdims=True)
    return ((na - nb) ** 2).sum() / len(a)


def test_relation_matrix_hand_computed():
    d = tf.constant([[1.0, 0.0], [1.0, 1.0]])  # M = [[1, 1], [1, 2]]
    r = losses.relation_matrix(d).numpy()
    np.testing.assert_allclose(r, [[1 / np.sqrt(2), 1 / np.sqrt(2)], [1 / np.sqrt(5), 2 / np.sqrt(5)]], rtol=1e-6)
    z = losses.relation_matrix(tf.constant([[0.0, 0.0], [1.0, 2.0]])).numpy()  # an all-zero row stays zero
    assert np.all(np.isfinite(z)) and np.all(z[0] == 0) and np.isclose(z[1, 1], 1.0)


def test_spatial_loss_hand_computed_and_invariants():
    rs = tf.constant([[1.0, 0.0], [0.0, 1.0]])
    rt = tf.constant([[0.0, 1.0], [0.0, 1.0]])
    assert np.isclose(losses.spatial_structure_loss(rs, rt), 2.0 / 2)  # (1 + 1) / B
    assert losses.spatial_structure_loss(rs, rs) == 0.0


def test_spatial_loss_equals_srcmt_relation_mse_in_numpy():
    rng = np.random.default_rng(0)
    fs, ft = rng.normal(size=(6, 3, 3, 4)), rng.normal(size=(6, 3, 3, 4))  # [B, H, W, C]
    ours = losses.spatial_structure_loss(losses.relation_matrix(tf.reshape(fs, [6, -1])),
                                         losses.relation_matrix(tf.reshape(ft, [6, -1])))
    np.testing.assert_allclose(float(ours), np_relation_mse_sum(fs, ft), rtol=1e-5)


def test_structure_losses_unchanged_by_a_consistent_permutation():
    rng = np.random.default_rng(1)
    ds, dt, dp = (tf.constant(rng.random((7, 5)), tf.float32) for _ in range(3))
    perm = rng.permutation(7)
    seen = tf.constant([True] * 6 + [False])

    def all_terms(a, b, c, s):
        rs, rt, rp = (losses.relation_matrix(x) for x in (a, b, c))
        mask, mon = losses.stable_substructure_mask(rs, rp, seen=s, tau=0.9, tau_mode="relative")
        return (losses.spatial_structure_loss(rs, rt), losses.temporal_structure_loss(rs, rp, mask),
                mon["stable_pairs"], mon["components"])

    base = all_terms(ds, dt, dp, seen)
    permuted = all_terms(*(tf.gather(x, perm) for x in (ds, dt, dp, seen)))
    np.testing.assert_allclose(base, permuted, rtol=1e-5)


def test_consistency_loss_hand_computed():
    zs = tf.constant([[0.0, 0.0], [np.log(3.0), 0.0]])  # softmax: [.5, .5], [.75, .25]
    zt = tf.constant([[0.0, 0.0], [0.0, 0.0]])
    # sum of squares: row 0: 0; row 1: .25^2 * 2 = .125; divided by the global batch 4 (not by K)
    assert np.isclose(losses.consistency_loss(zs, zt, multi_label=False, global_batch=4), 0.125 / 4)
    w = tf.constant([2.0, 0.0])
    assert np.isclose(losses.consistency_loss(zs, zt, multi_label=False, global_batch=4, class_weights=w), 0.125 / 4)
    sig = losses.consistency_loss(tf.constant([[0.0]]), tf.constant([[np.log(3.0)]]), multi_label=True,
                                  global_batch=1)
    assert np.isclose(sig, 0.25 ** 2)
    assert losses.consistency_loss(zs, zs, multi_label=False, global_batch=2) == 0.0


def test_supervised_loss_hand_computed():
    logits = tf.constant([[np.log(3.0), 0.0], [0.0, 0.0], [5.0, -5.0]])
    labels = tf.constant([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    labeled = tf.constant([True, True, False])
    ce = losses.supervised_loss(logits, labels, labeled, multi_label=False, normalizer=2)
    np.testing.assert_allclose(ce, (-np.log(0.75) - np.log(0.5)) / 2, rtol=1e-6)
    w = tf.constant([1.0, 3.0])
    weights = losses.supervised_weights(labels, labeled, multi_label=False, class_weights=w)
    np.testing.assert_array_equal(weights, [1.0, 3.0, 0.0])  # w_{y_i}, 0 for the unlabeled row
    cew = losses.supervised_loss(logits, labels, labeled, multi_label=False, normalizer=float(tf.reduce_sum(weights)),
                                 class_weights=w)
    # divided by the summed weights 1 + 3 (PyTorch's mean), not by the 2 labeled samples
    np.testing.assert_allclose(cew, (-np.log(0.75) - 3 * np.log(0.5)) / 4, rtol=1e-6)
    bce = losses.supervised_loss(tf.constant([[0.0, np.log(3.0)]]), tf.constant([[1.0, 0.0]]), tf.constant([True]),
                                 multi_label=True, normalizer=1)
    np.testing.assert_allclose(bce, (-np.log(0.5) - np.log(0.25)) / 2, rtol=1e-6)  # mean over classes


# Reference values from PyTorch 2.13 (.venv-torch of benchmarks/make_torch_env.sh), float64:
#   CrossEntropyLoss(weight=w)(logits[labeled], y[labeled]); BCEWithLogitsLoss(weight=...)(z, y).
TORCH_CE = 0.43136364684331635
TORCH_CE_WEIGHTED = 0.47241552524089786  # weight = [1, 3]
TORCH_BCE = 1.0511616519898936
TORCH_BCE_WEIGHTED = 0.9556335201822308  # weight = wk / mean(wk), wk = [1, 4, 0.5]


def test_supervised_loss_equals_pytorch_on_one_and_two_replicas():
    logits = np.array([[np.log(3.0), 0.0], [0.0, 0.0], [5.0, -5.0], [1.0, 2.0]])
    labels = np.eye(2)[[0, 1, 0, 1]]
    labeled = np.array([True, True, False, True])
    w = tf.constant([1.0, 3.0])

    def ce(rows, class_weights):
        """The loss as replicas compute it: each slice's share, over the GLOBAL sum of sample weights."""
        total = sum(float(tf.reduce_sum(losses.supervised_weights(labels[r], labeled[r], multi_label=False,
                                                                  class_weights=class_weights))) for r in rows)
        return sum(float(losses.supervised_loss(tf.constant(logits[r]), labels[r], labeled[r], multi_label=False,
                                                normalizer=total, class_weights=class_weights)) for r in rows)

    for rows in ([slice(0, 4)], [slice(0, 2), slice(2, 4)]):
        np.testing.assert_allclose(ce(rows, None), TORCH_CE, rtol=1e-6)
        np.testing.assert_allclose(ce(rows, w), TORCH_CE_WEIGHTED, rtol=1e-6)
    z = tf.constant([[0.0, np.log(3.0), -1.0], [2.0, -1.0, 0.5]])
    y = tf.constant([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    both = tf.constant([True, True])
    np.testing.assert_allclose(losses.supervised_loss(z, y, both, multi_label=True, normalizer=2), TORCH_BCE,
                               rtol=1e-6)
    weighted = losses.supervised_loss(z, y, both, multi_label=True, normalizer=2,
                                      class_weights=tf.constant([1.0, 4.0, 0.5]))
    np.testing.assert_allclose(weighted, TORCH_BCE_WEIGHTED, rtol=1e-6)
    # the scale of the class weights does not matter (SRC-MT's 10000 / count gives the same loss as 1 / count)
    scaled = losses.supervised_loss(z, y, both, multi_label=True, normalizer=2,
                                    class_weights=tf.constant([1e4, 4e4, 0.5e4]))
    np.testing.assert_allclose(scaled, TORCH_BCE_WEIGHTED, rtol=1e-6)


def _mask(adj_now, adj_prev=None, seen=None, mode="component"):
    """Runs the mask on relation matrices whose entries are 1 on edges, 0 elsewhere, threshold 0.5."""
    adj_now = np.asarray(adj_now, np.float32)
    adj_prev = adj_now if adj_prev is None else np.asarray(adj_prev, np.float32)
    b = len(adj_now)
    seen = np.ones(b, bool) if seen is None else np.asarray(seen)
    mask, mon = losses.stable_substructure_mask(tf.constant(adj_now), tf.constant(adj_prev), seen=tf.constant(seen),
                                                tau=0.5, tau_mode="absolute", mode=mode)
    return mask.numpy().astype(int), {k: float(v) for k, v in mon.items()}


def _graph(b, edges):
    a = np.zeros((b, b))
    for i, j in edges:
        a[i, j] = a[j, i] = 1
    return a


def test_component_mask_chain_and_pair_give_two_blocks():
    mask, mon = _mask(_graph(6, [(0, 1), (1, 2), (3, 4)]))  # chain 0-1-2, pair 3-4, isolated 5
    expected = np.zeros((6, 6), int)
    expected[:3, :3] = 1
    expected[3:5, 3:5] = 1
    np.testing.assert_array_equal(mask, expected)
    assert mon["components"] == 2 and mon["stable_pairs"] == 3
    assert np.isclose(mon["edge_density"], 6 / 30)
    edge_mask, _ = _mask(_graph(6, [(0, 1), (1, 2), (3, 4)]), mode="edge")  # the ablation: edges only
    np.testing.assert_array_equal(edge_mask, _graph(6, [(0, 1), (1, 2), (3, 4)]))


def test_vertex_stable_now_but_not_before_is_excluded():
    now = _graph(4, [(0, 1), (1, 2)])
    prev = _graph(4, [(0, 1)])  # edge 1-2 did not exist at t-1
    mask, mon = _mask(now, prev)
    expected = np.zeros((4, 4), int)
    expected[:2, :2] = 1
    np.testing.assert_array_equal(mask, expected)
    assert mon["components"] == 1


def test_unseen_samples_are_excluded():
    mask, mon = _mask(_graph(4, [(0, 1), (1, 2), (2, 3)]), seen=[True, True, False, True])
    expected = np.zeros((4, 4), int)
    expected[:2, :2] = 1
    np.testing.assert_array_equal(mask, expected)
    assert mon["stable_pairs"] == 1


def test_long_chain_closure():
    mask, mon = _mask(_graph(33, [(i, i + 1) for i in range(32)]))
    assert mask.sum() == 33 * 33 and mon["components"] == 1


def test_temporal_loss_hand_computed():
    r_now = tf.constant([[1.0, 0.5], [0.5, 1.0]])
    r_prev = tf.constant([[1.0, 0.0], [0.0, 0.5]])
    mask = tf.constant([[1.0, 1.0], [1.0, 0.0]])
    # (0 + .25 + .25 + 0 [masked .25]) / 2
    assert np.isclose(losses.temporal_structure_loss(r_now, r_prev, mask), 0.25)
    assert losses.temporal_structure_loss(r_now, r_now, mask) == 0.0


@pytest.mark.parametrize("b", [16, 64])
def test_relative_tau_scales_with_batch(b):
    r = losses.relation_matrix(tf.ones([b, 3]))  # identical rows: every entry is 1/sqrt(B)
    assert np.isclose(float(losses.tsc_threshold(r, 1.0, "relative")), 1 / np.sqrt(b))
    _, mon = losses.stable_substructure_mask(r, r, seen=tf.ones([b], tf.bool), tau=1.0, tau_mode="relative")
    assert np.isclose(float(mon["edge_density"]), 1.0, atol=1e-6) and float(mon["components"]) == 1
    q = losses.tsc_threshold(tf.reshape(tf.range(16, dtype=tf.float32), [4, 4]), 0.5, "quantile")
    assert float(q) in (6.0, 7.0, 8.0, 9.0)


def test_schedules():
    assert np.isclose(schedules.sigmoid_rampup(0.0, 30), np.exp(-5))
    assert np.isclose(schedules.sigmoid_rampup(15.0, 30), np.exp(-5 * 0.25))
    assert schedules.sigmoid_rampup(45.0, 30) == 1.0
    # SRC-MT: `if epoch > 20` with the integer epoch index, lambda(epoch) constant within the epoch
    for e in (19.9, 20.0, 20.99):
        assert schedules.consistency_weight(e, maximum=2.0, rampup=30, start_epoch=20) == 0.0
    for e in (21.0, 21.5, 21.99):
        assert np.isclose(schedules.consistency_weight(e, maximum=2.0, rampup=30, start_epoch=20),
                          2 * np.exp(-5 * (1 - 21 / 30) ** 2))
    assert np.isclose(schedules.consistency_weight(0.3, maximum=1.0, rampup=0, start_epoch=-1), 1.0)
    assert schedules.ema_decay(0, 0.99) == 0.0 and np.isclose(schedules.ema_decay(3, 0.99), 0.75)
    assert np.isclose(schedules.ema_decay(10000, 0.99), 0.99)
    lr = schedules.EpochDecay(1e-4, steps_per_epoch=10, rate=0.9)
    assert np.isclose(lr(9), 1e-4) and np.isclose(lr(10), 0.9e-4) and np.isclose(lr(25), 0.81e-4)
    poly = schedules.EpochDecay(1e-4, steps_per_epoch=10, rate=0.9, mode="poly", epochs=10)
    assert np.isclose(poly(50), 1e-4 * 0.5 ** 0.9)
    assert schedules.EpochDecay.from_config(lr.get_config()).get_config() == lr.get_config()
    assert np.isclose(schedules.fractional_epoch(15, 10), 1.5)
