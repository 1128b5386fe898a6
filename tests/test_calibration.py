"""Thresholds, calibration and calibration error (stsc_tf.calibration): values checked by construction or by hand."""

import json
import math

import numpy as np
import pytest

from stsc_tf import calibration


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _youden_at(truth, scores, t):
    """J of the rule `scores >= t`, counted directly."""
    pred = scores >= t
    return pred[truth].mean() - pred[~truth].mean()


# --------------------------------------------------------------------------------------------------------------
# Thresholds
# --------------------------------------------------------------------------------------------------------------


def test_youden_recovers_the_analytic_optimum():
    # Positives ~ U[0.3, 1], negatives ~ U[0, 0.5]. For t in [0.3, 0.5], J(t) = (1 - t) / 0.7 - (0.5 - t) / 0.5
    # grows (slope 2 - 1 / 0.7 > 0); above 0.5, J(t) = (1 - t) / 0.7 falls: the optimum is t = 0.5, J = 0.5 / 0.7.
    rng = np.random.default_rng(0)
    pos, neg = rng.uniform(0.3, 1.0, 3000), rng.uniform(0.0, 0.5, 3000)
    scores = np.r_[pos, neg]
    truth = np.r_[np.ones(3000), np.zeros(3000)]
    y = np.stack([truth, 1 - truth], 1)
    probs = np.stack([scores, 1 - scores], 1)
    fitted = calibration.fit_thresholds(y, probs, "youden")
    t, info = fitted["thresholds"][0], fitted["per_class"][0]
    assert t == pytest.approx(0.5, abs=0.005)
    assert info["value"] == pytest.approx(0.5 / 0.7, abs=0.02)
    # Empirically the optimum is the lowest positive score above every negative one: no false positives.
    assert t == pos[pos > neg.max()].min()
    # The reported J is exactly what `probs >= t` gives, for every class.
    for k, (tk, per) in enumerate(zip(fitted["thresholds"], fitted["per_class"])):
        assert _youden_at(y[:, k] > 0.5, probs[:, k], tk) == pytest.approx(per["value"], abs=1e-12)
    assert fitted["criterion"] == "youden"
    assert (info["class"], info["positives"], info["defined"]) == (0, 3000, True)


def test_f1_and_youden_choose_different_thresholds():
    # 8 positives at 0.2..0.9, 2 negatives at 0.25 and 0.35.
    # Youden: t = 0.4 keeps 6/8 positives and no negative, J = 0.75 (t = 0.3: 7/8 - 1/2; t = 0.2: 1 - 1).
    # F1 = 2TP / (2TP + FP + FN): t = 0.4 gives 12/14 = 0.857, t = 0.2 gives 16/18 = 0.889 (the best: everything
    # positive, since positives dominate), t = 0.3 gives 14/16 = 0.875.
    pos = np.array([0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    neg = np.array([0.25, 0.35])
    probs = np.r_[pos, neg][:, None]
    y = np.r_[np.ones(8), np.zeros(2)][:, None]
    youden = calibration.fit_thresholds(y, probs, "youden")
    f1 = calibration.fit_thresholds(y, probs, "f1")
    assert youden["thresholds"] == [pytest.approx(0.4)]
    assert youden["per_class"][0]["value"] == pytest.approx(0.75)
    assert f1["thresholds"] == [pytest.approx(0.2)]
    assert f1["per_class"][0]["value"] == pytest.approx(16 / 18)
    pred = probs[:, 0] >= f1["thresholds"][0]
    tp, fp, fn = (pred & (y[:, 0] == 1)).sum(), (pred & (y[:, 0] == 0)).sum(), (~pred & (y[:, 0] == 1)).sum()
    assert 2 * tp / (2 * tp + fp + fn) == pytest.approx(f1["per_class"][0]["value"])


def test_threshold_is_never_sklearns_infinite_one():
    # Anti-correlated scores with a negative at exactly 1.0: the best J is 0. roc_curve's first threshold (+inf,
    # nothing positive) also has J = 0, but clipped to 1.0 it would flag that negative (J = -0.5). The chosen
    # threshold must be a real score whose `>=` rule gives the reported J.
    probs = np.array([0.1, 0.2, 0.8, 1.0])[:, None]
    y = np.array([1.0, 1.0, 0.0, 0.0])[:, None]
    fitted = calibration.fit_thresholds(y, probs, "youden")
    t, value = fitted["thresholds"][0], fitted["per_class"][0]["value"]
    assert value == 0.0 and t == 0.1
    assert _youden_at(y[:, 0] > 0.5, probs[:, 0], t) == value


def test_classes_without_an_optimum_get_the_default_and_are_marked():
    rng = np.random.default_rng(1)
    probs = rng.uniform(size=(20, 3))
    y = np.zeros((20, 3))
    y[:10, 0] = 1  # class 0 defined, class 1 never positive, class 2 always positive
    y[:, 2] = 1
    for criterion in ("youden", "f1"):
        fitted = calibration.fit_thresholds(y, probs, criterion, default=0.18)
        assert fitted["thresholds"][1:] == [0.18, 0.18]
        assert [c["defined"] for c in fitted["per_class"]] == [True, False, False]
        assert [c["value"] is None for c in fitted["per_class"]] == [False, True, True]
        assert [c["positives"] for c in fitted["per_class"]] == [10, 0, 20]
        assert 0.0 <= fitted["thresholds"][0] <= 1.0


def test_thresholds_refuse_bad_input():
    with pytest.raises(ValueError, match="criterion"):
        calibration.fit_thresholds(np.eye(2), np.eye(2), "accuracy")
    with pytest.raises(ValueError, match="shapes differ"):
        calibration.fit_thresholds(np.eye(2), np.eye(3), "youden")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        calibration.fit_thresholds(np.eye(2), 2 * np.eye(2), "youden")


# --------------------------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------------------------


def _single_label_data(seed=0, n=4000, k=5, scale=4.0):
    """Labels drawn from softmax(z) (a calibrated model), logits scale * z (over-confident)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.5, (n, k))
    cumulative = _softmax(z).cumsum(axis=1)
    labels = (rng.uniform(size=(n, 1)) > cumulative).sum(axis=1)  # inverse-CDF draw from each row
    return scale * z, np.eye(k)[labels]


def _multi_label_data(seed=0, n=4000, k=5):
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.5, (n, k))
    return z, (rng.uniform(size=(n, k)) < _sigmoid(z)).astype(np.float64)


def test_temperature_undoes_overconfidence_single_label():
    logits, y = _single_label_data()
    fitted = calibration.fit_calibration(logits, y, multi_label=False)
    assert fitted.method == "temperature" and fitted.temperature == pytest.approx(4.0, rel=0.1)
    before = calibration.expected_calibration_error(y, _softmax(logits), multi_label=False)
    after = calibration.expected_calibration_error(y, fitted.apply(logits), multi_label=False)
    assert before > 0.2 and after < 0.03 and before > 8 * after
    # Temperature scaling keeps every argmax.
    np.testing.assert_array_equal(fitted.apply(logits).argmax(1), logits.argmax(1))


@pytest.mark.parametrize("k", [2, 5])
def test_sklearn_temperature_is_the_nll_minimiser(k):
    # scikit-learn's fit (the library route; K = 2 goes through its 1-D decision value) and the golden-section
    # fallback minimise the same NLL: they must agree, and the NLL must be higher on either side.
    logits, y = _single_label_data(seed=2, n=2000, k=k, scale=3.0)
    t_sklearn = calibration.fit_calibration(logits, y, multi_label=False).temperature
    t_golden = calibration._golden_temperature(logits, y, False)
    assert t_sklearn == pytest.approx(t_golden, rel=1e-6)
    nll = [calibration._temperature_nll(math.log(t_sklearn) + d, logits, y, False) for d in (-0.01, 0.0, 0.01)]
    assert nll[1] < nll[0] and nll[1] < nll[2]


def test_temperature_with_a_class_absent_from_the_split():
    logits, y = _single_label_data(seed=3, n=3000, k=4)
    keep = y[:, 3] == 0  # class 3 never occurs: the golden-section path
    fitted = calibration.fit_calibration(logits[keep], y[keep], multi_label=False)
    assert fitted.temperature == pytest.approx(calibration._golden_temperature(logits[keep], y[keep], False))
    assert 1.0 < fitted.temperature < 10.0  # the logits are 4x over-confident: a temperature near 4, not 1 or a runaway


def test_multi_label_temperature_and_platt():
    z, y = _multi_label_data()
    over = 4.0 * z
    shift = np.array([-2.0, -1.0, 0.0, 1.0, 2.0])
    shifted = over + shift  # over-confident and biased per class: only Platt can undo the bias
    temperature = calibration.fit_calibration(over, y, multi_label=True)
    assert temperature.temperature == pytest.approx(4.0, rel=0.1)
    assert temperature.temperature == pytest.approx(calibration._golden_temperature(over, y, True), rel=1e-6)
    platt = calibration.fit_calibration(shifted, y, multi_label=True, method="platt")
    # sigmoid(a z' + b) = sigmoid(z) needs a = 1/4 and b = -shift / 4.
    np.testing.assert_allclose(platt.platt_a, 0.25, atol=0.03)
    np.testing.assert_allclose(platt.platt_b, -shift / 4, atol=0.1)
    assert platt.identity_classes == []
    for fitted, logits in ((temperature, over), (platt, shifted)):
        before = calibration.expected_calibration_error(y, _sigmoid(logits), multi_label=True)
        after = calibration.expected_calibration_error(y, fitted.apply(logits), multi_label=True)
        assert before > 0.15 and after < 0.03


def test_platt_class_with_one_label_value_is_identity_and_marked():
    z, y = _multi_label_data(n=500, k=3)
    y[:, 1] = 0
    fitted = calibration.fit_calibration(z, y, multi_label=True, method="platt")
    assert fitted.identity_classes == [1]
    assert (fitted.platt_a[1], fitted.platt_b[1]) == (1.0, 0.0)
    np.testing.assert_allclose(fitted.apply(z)[:, 1], _sigmoid(z[:, 1]))


@pytest.mark.parametrize("method,multi_label", [("temperature", False), ("temperature", True), ("platt", True)])
def test_round_trip_through_json(method, multi_label):
    if multi_label:
        logits, y = _multi_label_data(n=800, k=4)
    else:
        logits, y = _single_label_data(n=800, k=4)
    fitted = calibration.fit_calibration(logits, y, multi_label=multi_label, method=method)
    restored = calibration.Calibration.from_dict(json.loads(json.dumps(fitted.to_dict())))
    assert restored == fitted
    np.testing.assert_array_equal(restored.apply(logits), fitted.apply(logits))


def test_apply_formulas():
    z = np.array([[2.0, 0.0, -1.0]])
    single = calibration.Calibration("temperature", False, 2.0, None, None)
    e = np.exp([1.0, 0.0, -0.5])
    np.testing.assert_allclose(single.apply(z), [e / e.sum()])
    multi = calibration.Calibration("temperature", True, 2.0, None, None)
    np.testing.assert_allclose(multi.apply(z), _sigmoid(z / 2))
    platt = calibration.Calibration("platt", True, None, [1.0, 2.0, 0.5], [0.0, 1.0, -1.0])
    np.testing.assert_allclose(platt.apply(z), _sigmoid(np.array([[2.0, 1.0, -1.5]])))


def test_calibration_refuses_bad_input():
    logits, y = _single_label_data(n=50, k=3)
    with pytest.raises(ValueError, match="shapes differ"):
        calibration.fit_calibration(logits[:, :2], y, multi_label=False)
    with pytest.raises(ValueError, match="non-finite"):
        bad = logits.copy()
        bad[3, 1] = np.nan
        calibration.fit_calibration(bad, y, multi_label=False)
    with pytest.raises(ValueError, match="method"):
        calibration.fit_calibration(logits, y, multi_label=False, method="isotonic")
    with pytest.raises(ValueError, match="platt.*multi-label"):
        calibration.fit_calibration(logits, y, multi_label=False, method="platt")
    with pytest.raises(ValueError, match="one-hot"):
        calibration.fit_calibration(logits, np.ones_like(y), multi_label=False)
    with pytest.raises(ValueError, match="temperature"):
        calibration.Calibration("temperature", False, 0.0, None, None)
    with pytest.raises(ValueError, match="platt"):
        calibration.Calibration("platt", True, None, [1.0], [0.0]).apply(logits)


# --------------------------------------------------------------------------------------------------------------
# Calibration error
# --------------------------------------------------------------------------------------------------------------


def test_ece_by_hand_single_label():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.45, 0.55]])
    y = np.eye(2)[[0, 1, 1, 1, 1]]
    # confidences 0.9 0.8 0.7 0.6 0.55; correct 1 0 1 0 1.
    # 2 bins: all in [0.5, 1]: |3/5 - 3.55/5| = 0.11.
    assert calibration.expected_calibration_error(y, probs, multi_label=False, n_bins=2) == pytest.approx(0.11)
    # 4 bins: [0.5, 0.75) holds 0.7 0.6 0.55 (2 correct): |2/3 - 1.85/3| * 3/5 = 0.03;
    #         [0.75, 1]   holds 0.9 0.8 (1 correct):     |1/2 - 0.85| * 2/5 = 0.14.
    assert calibration.expected_calibration_error(y, probs, multi_label=False, n_bins=4) == pytest.approx(0.17)
    curve = calibration.reliability_curve(y, probs, multi_label=False, n_bins=4)
    assert curve["lower"] == [0.5, 0.75] and curve["upper"] == [0.75, 1.0]  # empty bins left out
    assert curve["count"] == [3, 2] and curve["n"] == 5
    np.testing.assert_allclose(curve["confidence"], [1.85 / 3, 0.85])
    np.testing.assert_allclose(curve["observed"], [2 / 3, 0.5])


def test_ece_by_hand_multi_label():
    probs = np.array([[0.9, 0.2], [0.8, 0.1], [0.3, 0.6], [0.1, 0.7]])
    y = np.array([[1, 0], [0, 0], [0, 1], [0, 1]])
    # class 0: [0, .5): p .3 .1 vs 0 positives -> .2 * 2/4; [.5, 1]: p .9 .8 vs 1/2 -> .35 * 2/4. ECE .275.
    # class 1: [0, .5): p .2 .1 vs 0 -> .15 * 2/4;          [.5, 1]: p .6 .7 vs 1 -> .35 * 2/4.  ECE .25.
    assert calibration.expected_calibration_error(y, probs, multi_label=True, n_bins=2) == pytest.approx(0.2625)
    curve = calibration.reliability_curve(y, probs, multi_label=True, n_bins=2)  # the 8 (p, y) pairs pooled
    assert curve["count"] == [4, 4] and curve["n"] == 8
    np.testing.assert_allclose(curve["confidence"], [0.175, 0.75])
    np.testing.assert_allclose(curve["observed"], [0.0, 0.75])


def test_reliability_curve_agrees_with_ece():
    logits, y = _single_label_data(seed=4, n=1000)
    probs = _softmax(logits)
    curve = calibration.reliability_curve(y, probs, multi_label=False)
    from_curve = sum(abs(o - c) * n for o, c, n in zip(curve["observed"], curve["confidence"], curve["count"]))
    assert from_curve / curve["n"] == pytest.approx(calibration.expected_calibration_error(y, probs, multi_label=False))
    assert sum(curve["count"]) == 1000


def test_ece_refuses_bad_input():
    with pytest.raises(ValueError, match="n_bins"):
        calibration.expected_calibration_error(np.eye(2), np.eye(2), multi_label=False, n_bins=0)
    with pytest.raises(ValueError, match="shapes differ"):
        calibration.reliability_curve(np.eye(2), np.eye(3), multi_label=True)


def test_platt_never_inverts_a_class_ranking():
    rng = np.random.default_rng(3)
    z = rng.normal(size=(200, 2))
    y = np.stack([(z[:, 0] > 0), (z[:, 1] < 0)], axis=1).astype(float)  # class 1: the logit ranks it backwards
    cal = calibration.fit_calibration(z, y, multi_label=True, method="platt")
    assert cal.platt_a[0] > 0 and cal.identity_classes == [1] and cal.platt_a[1] == 1.0 and cal.platt_b[1] == 0.0
    probs = cal.apply(z)
    assert np.all(np.diff(probs[np.argsort(z[:, 1]), 1]) >= 0)  # the order of class 1's scores is kept
