"""Active-learning selection (stsc_tf.selection): uncertainty signals by hand, and the diversity term at work."""

import math

import numpy as np
import pytest

from stsc_tf import selection


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_components_by_hand_single_label():
    teacher = np.array([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.5, 0.5, 0.0], [0.25, 0.5, 0.25]])
    student = np.array([[0.0, 1.0, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.5, 0.5, 0.0], [0.5, 0.25, 0.25]])
    out = selection.uncertainty_components(student, teacher, multi_label=False)
    # H / log 3: 0 (one-hot, 0 log 0 = 0), 1 (uniform), log 2 / log 3, (1.5 log 2) / log 3.
    np.testing.assert_allclose(out["entropy"], [0.0, 1.0, math.log(2) / math.log(3), 1.5 * math.log(2) / math.log(3)])
    # 0.5 * sum |p_s - p_t|: disjoint one-hots 1, equal 0, equal 0, 0.5 * (0.25 + 0.25) = 0.25.
    np.testing.assert_allclose(out["disagreement"], [1.0, 0.0, 0.0, 0.25])


def test_components_by_hand_multi_label():
    teacher = np.array([[0.5, 1.0], [0.0, 0.0], [0.25, 0.25]])
    student = np.array([[0.5, 0.0], [0.2, 0.4], [0.25, 0.75]])
    out = selection.uncertainty_components(student, teacher, multi_label=True)
    h = -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))  # 0.811 bits
    np.testing.assert_allclose(out["entropy"], [0.5, 0.0, h])  # mean over classes of binary entropy in bits
    np.testing.assert_allclose(out["disagreement"], [0.5, 0.3, 0.25])


def test_components_refuse_bad_input():
    with pytest.raises(ValueError, match="shapes differ"):
        selection.uncertainty_components(np.full((2, 3), 1 / 3), np.full((2, 2), 0.5), multi_label=False)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        selection.uncertainty_components(np.full((2, 2), 1.5), np.full((2, 2), 0.5), multi_label=True)


def test_score_is_a_weighted_mean_of_percentile_ranks():
    np.testing.assert_allclose(selection.percentile_rank(np.array([0.9, 0.5, 0.1, 0.5])), [1.0, 0.5, 0.0, 0.5])
    np.testing.assert_allclose(selection.percentile_rank(np.array([3.0, 3.0, 3.0])), 0.5)
    entropy = np.array([0.9, 0.1, 0.5, 0.3])
    disagreement = np.array([0.001, 0.004, 0.003, 0.002])  # far smaller scale: must not matter
    score = selection.uncertainty_score({"entropy": entropy, "disagreement": disagreement})
    # entropy ranks [1, 0, 2/3, 1/3], disagreement ranks [0, 1, 2/3, 1/3]
    np.testing.assert_allclose(score, [0.5, 0.5, 2 / 3, 1 / 3])
    rescaled = selection.uncertainty_score({"entropy": entropy, "disagreement": 1000 * disagreement})
    np.testing.assert_array_equal(score, rescaled)
    weighted = selection.uncertainty_score({"entropy": entropy, "disagreement": disagreement},
                                           {"entropy": 3.0, "disagreement": 1.0})
    np.testing.assert_allclose(weighted, [0.75, 0.25, 2 / 3, 1 / 3])
    with pytest.raises(ValueError, match="absent"):
        selection.uncertainty_score({"entropy": entropy})


def _pool(seed=0):
    """~1,000 unlabeled images, single-label K = 7, D = 64 features.

    ambiguous: 50 images (5 %), teacher near uniform and student off: high entropy and disagreement; each with its
      own random feature vector.
    cluster: 50 near-duplicates (one vector + 1 % noise), even more uncertain than the ambiguous ones, so that
      uncertainty alone fills a budget of 50 with them.
    the rest: confident (a large teacher margin, the student agreeing), random features.
    """
    rng = np.random.default_rng(seed)
    n, k, d = 1000, 7, 64
    ambiguous = np.arange(0, n, 20)
    rest = np.setdiff1d(np.arange(n), ambiguous)
    cluster = np.sort(rng.permutation(rest)[:50])
    confident = np.setdiff1d(rest, cluster)
    z_teacher = rng.normal(0.0, 0.5, (n, k))
    z_teacher[confident, rng.integers(0, k, len(confident))] += rng.uniform(4.0, 8.0, len(confident))
    z_student = z_teacher + rng.normal(0.0, 0.3, (n, k))
    z_teacher[ambiguous] = rng.normal(0.0, 0.3, (50, k))
    z_student[ambiguous] = z_teacher[ambiguous] + rng.normal(0.0, 1.0, (50, k))
    z_teacher[cluster] = rng.normal(0.0, 0.1, (50, k))
    z_student[cluster] = z_teacher[cluster] + rng.normal(0.0, 2.0, (50, k))
    features = rng.normal(0.0, 1.0, (n, d))
    features[cluster] = rng.normal(0.0, 1.0, d) + rng.normal(0.0, 0.01, (50, d))
    components = selection.uncertainty_components(_softmax(z_student), _softmax(z_teacher), multi_label=False)
    return components, features, ambiguous, cluster


def test_diversity_keeps_the_budget_off_a_duplicated_cluster():
    components, features, ambiguous, cluster = _pool()
    uncertainty = selection.uncertainty_score(components)
    # The construction: the cluster is the most uncertain group, the ambiguous images next.
    assert uncertainty[cluster].mean() > uncertainty[ambiguous].mean() > 0.85
    budget, base_rate = 50, len(ambiguous) / len(uncertainty)

    diverse = selection.select_diverse(uncertainty, features, budget)["order"]
    assert np.mean(np.isin(diverse, ambiguous)) >= 5 * base_rate
    assert np.isin(diverse, cluster).sum() <= 3

    # Without the diversity term the cluster floods the selection: the term is what does the work.
    greedy = selection.select_diverse(uncertainty, features, budget, diversity=0.0)["order"]
    assert np.isin(greedy, cluster).sum() >= 40
    np.testing.assert_array_equal(greedy, np.argsort(-uncertainty, kind="stable")[:budget])


def test_returned_values_describe_each_pick():
    components, features, _, cluster = _pool()
    uncertainty = selection.uncertainty_score(components)
    out = selection.select_diverse(uncertainty, features, 30, diversity=0.7)
    assert math.isnan(out["max_similarity"][0])  # nothing chosen or labeled yet
    np.testing.assert_array_equal(out["uncertainty"], uncertainty[out["order"]])
    penalty = 0.7 * np.maximum(np.nan_to_num(out["max_similarity"], nan=0.0), 0.0)
    np.testing.assert_allclose(out["score"], out["uncertainty"] - penalty)
    assert len(set(out["order"].tolist())) == 30


def test_labeled_images_push_similar_candidates_down():
    # Equally uncertain candidates along orthogonal directions; without a labeled set the lowest index goes first.
    features = np.eye(4)[:3] * 5.0
    uncertainty = np.full(3, 0.9)
    assert selection.select_diverse(uncertainty, features, 3)["order"].tolist() == [0, 1, 2]
    labeled = np.array([[5.0, 0.1, 0.0, 0.0]])  # next to candidate 0
    out = selection.select_diverse(uncertainty, features, 3, labeled_features=labeled)
    assert out["order"].tolist() == [1, 2, 0]
    assert out["max_similarity"][2] > 0.9 and out["score"][2] < 0.1
    assert selection.select_diverse(uncertainty, features, 3, labeled_features=labeled, diversity=0.0)[
        "order"].tolist() == [0, 1, 2]


def test_deterministic_with_ties_to_the_lowest_index():
    rng = np.random.default_rng(5)
    features = rng.normal(size=(300, 16))
    uncertainty = np.round(rng.uniform(size=300), 1)  # many exact ties
    first = selection.select_diverse(uncertainty, features, 40, labeled_features=features[:10] + 0.5)
    second = selection.select_diverse(uncertainty, features, 40, labeled_features=features[:10] + 0.5)
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])
    # Identical candidates with identical uncertainty: strictly index order.
    same = selection.select_diverse(np.ones(6), np.ones((6, 3)), 6)
    assert same["order"].tolist() == list(range(6))


def test_chunked_labeled_similarity_matches_a_direct_computation():
    rng = np.random.default_rng(6)
    n, m, d = 200, 57, 12
    features, labeled = rng.normal(size=(n, d)) + 1.0, rng.normal(size=(m, d)) + 1.0
    uncertainty = rng.uniform(size=n)
    # Independent float64 reference of the labeled-set max similarity (features centred on both sets together).
    mean = np.vstack([features, labeled]).mean(0)
    a, b = features - mean, labeled - mean
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    reference = (a @ b.T).max(1)
    results = [selection.select_diverse(uncertainty, features, 25, labeled_features=labeled, chunk_rows=rows)
               for rows in (1, 7, 64, None, 10_000)]
    first = results[0]
    i = first["order"][0]
    assert first["max_similarity"][0] == pytest.approx(reference[i], abs=1e-6)
    assert first["order"][0] == int(np.argmax(uncertainty - np.maximum(reference, 0)))
    for other in results[1:]:
        np.testing.assert_array_equal(other["order"], first["order"])
        np.testing.assert_allclose(other["max_similarity"], first["max_similarity"], atol=1e-6)


def test_budget_limits():
    rng = np.random.default_rng(7)
    uncertainty, features = rng.uniform(size=10), rng.normal(size=(10, 4))
    everything = selection.select_diverse(uncertainty, features, 25)["order"]
    assert sorted(everything.tolist()) == list(range(10))
    np.testing.assert_array_equal(everything, selection.select_diverse(uncertainty, features, 10)["order"])
    with pytest.raises(ValueError, match="budget"):
        selection.select_diverse(uncertainty, features, 0)
    with pytest.raises(ValueError, match="features"):
        selection.select_diverse(uncertainty, features[:9], 3)
    with pytest.raises(ValueError, match="labeled_features"):
        selection.select_diverse(uncertainty, features, 3, labeled_features=np.zeros((2, 5)))
