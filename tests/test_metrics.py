"""Metrics against scikit-learn and hand-computed cases; undefined classes are None, not 0 or 1."""

import numpy as np
from sklearn import metrics as skm

from stsc_tf import metrics


def test_paper_metrics_hand_computed():
    # 4 samples, 2 classes (one-hot); threshold 0.5
    y = np.array([[1, 0], [1, 0], [0, 1], [0, 1]])
    p = np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.6, 0.4]])
    m = metrics.paper_metrics(y, p, threshold=0.5)
    # class 0: pred [1,0,0,1] vs truth [1,1,0,0]: tp 1, fn 1, fp 1, tn 1 -> acc .5 sen .5 spec .5 prec .5 f1 .5
    # class 1: pred [0,1,1,0] vs truth [0,0,1,1]: the same counts
    for key in ("accuracy", "sensitivity", "specificity", "precision", "f1"):
        assert np.isclose(m[key], 0.5), key
    assert np.isclose(m["per_class"]["auc"][0], skm.roc_auc_score(y[:, 0], p[:, 0]))
    assert np.isclose(m["auc"], np.mean([skm.roc_auc_score(y[:, c], p[:, c]) for c in range(2)]))


def test_paper_metrics_agree_with_sklearn_on_random_data():
    rng = np.random.default_rng(0)
    y = np.eye(4)[rng.integers(0, 4, 200)]
    p = rng.dirichlet(np.ones(4), 200)
    m = metrics.paper_metrics(y, p, threshold=0.18)
    pred = p >= 0.18
    for c in range(4):
        assert np.isclose(m["per_class"]["sensitivity"][c], skm.recall_score(y[:, c], pred[:, c]))
        assert np.isclose(m["per_class"]["precision"][c], skm.precision_score(y[:, c], pred[:, c]))
        assert np.isclose(m["per_class"]["f1"][c], skm.f1_score(y[:, c], pred[:, c]))
        assert np.isclose(m["per_class"]["specificity"][c], skm.recall_score(1 - y[:, c], 1 - pred[:, c]))
        assert np.isclose(m["per_class"]["accuracy"][c], skm.accuracy_score(y[:, c], pred[:, c]))
    s = metrics.standard_metrics(y, p, multi_label=False)
    assert np.isclose(s["balanced_accuracy"], skm.balanced_accuracy_score(y.argmax(1), p.argmax(1)))
    assert np.isclose(s["top1_accuracy"], skm.accuracy_score(y.argmax(1), p.argmax(1)))
    assert np.isclose(s["macro_f1"], skm.f1_score(y.argmax(1), p.argmax(1), average="macro"))
    assert np.array_equal(s["confusion_matrix"], skm.confusion_matrix(y.argmax(1), p.argmax(1)))


def test_absent_class_is_undefined_not_zero():
    y = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 1, 0]])  # class 2 never occurs
    p = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.6, 0.2, 0.2], [0.3, 0.6, 0.1]])
    m = metrics.paper_metrics(y, p, threshold=0.5)
    assert m["per_class"]["auc"][2] is None and m["per_class"]["sensitivity"][2] is None
    assert m["undefined_auc_classes"] == [2]
    assert np.isclose(m["auc"], 1.0)  # the mean over the two defined classes
    ml = metrics.standard_metrics(y, p, multi_label=True)
    assert ml["per_class_auc"][2] is None and np.isclose(ml["mean_auc"], 1.0)


def test_bootstrap_interval_brackets_the_estimate_and_table():
    rng = np.random.default_rng(1)
    y = np.eye(3)[rng.integers(0, 3, 150)]
    p = 0.6 * y + 0.4 * rng.dirichlet(np.ones(3), 150)
    r = metrics.evaluate_predictions(y, p, multi_label=False, threshold=0.18, bootstrap=100)
    low, high = r["paper_ci95"]["auc"]
    assert low <= r["paper"]["auc"] <= high and high - low < 0.2
    table = metrics.paper_table({"STSC (student)": {**r, "ece": 0.0512}}, labeled_share=0.2)
    assert "| STSC (student) | 20.0 | 80.0 |" in table and "| Acc | Sen | Spec | AUC | F1 | ECE |" in table
    assert table.rstrip().endswith("| 0.0512 |")
