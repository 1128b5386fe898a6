"""Decision thresholds and probability calibration chosen on a validation split, and calibration error.

Everything here is fitted on the validation split and then applied unchanged to the test split (or exported with
the model), so the test split never tunes anything.

Thresholds: per class (one-vs-rest) the threshold maximising Youden's J = TPR - FPR or F1. A class with no
positives or no negatives in the split has no optimum: it gets the caller's `default` (the paper's 0.18) and is
marked undefined, never given an invented value.

Calibration: temperature scaling (one scalar T for all classes: softmax(z / T) single-label, sigmoid(z / T)
multi-label) or, multi-label only, per-class Platt scaling sigmoid(a_k z_k + b_k). The parameters are plain
numbers and the formulas are spelled out in `Calibration`, so they can be re-implemented as TensorFlow ops.

Calibration error: top-label ECE (single-label), the mean over classes of the binary ECE (multi-label), and the
per-bin reliability curve. Pure numpy + scikit-learn: this module must not import TensorFlow or Keras.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import precision_recall_curve, roc_curve

CRITERIA = ("youden", "f1")
METHODS = ("temperature", "platt")
# log T is searched in [-10, 10]: the same bounds scikit-learn uses for log(1 / T), so both solvers agree.
LOG_T_BOUNDS = (-10.0, 10.0)


def _check_pair(y_true, values, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Both as float64 [N, K]; ValueError naming the problem (shape, non-finite values, non-binary labels)."""
    y_true, values = np.asarray(y_true, np.float64), np.asarray(values, np.float64)
    if y_true.ndim != 2 or values.ndim != 2:
        raise ValueError(f"y_true and {what} must be 2-D [N, K], got shapes {y_true.shape} and {values.shape}")
    if y_true.shape != values.shape:
        raise ValueError(f"y_true and {what} shapes differ: {y_true.shape} vs {values.shape}")
    if len(y_true) == 0:
        raise ValueError(f"y_true and {what} are empty")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{what} contain non-finite values (NaN or inf)")
    if not np.all((y_true == 0) | (y_true == 1)):
        raise ValueError("y_true must be one-hot or multi-hot: values other than 0 and 1 found")
    return y_true, values


def _check_probs(probs: np.ndarray) -> None:
    if np.any(probs < 0) or np.any(probs > 1):
        raise ValueError("probs must lie in [0, 1]")


def _check_single_label(y_true: np.ndarray) -> None:
    if y_true.shape[1] < 2:
        raise ValueError(f"single-label data needs K >= 2 classes, got K = {y_true.shape[1]}")
    if not np.all(y_true.sum(1) == 1):
        raise ValueError("single-label y_true must be one-hot: a row without exactly one 1 found")


# --------------------------------------------------------------------------------------------------------------
# Thresholds
# --------------------------------------------------------------------------------------------------------------


def _youden(truth: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(threshold, J) maximising J = TPR - FPR; ties go to the highest threshold."""
    # drop_intermediate=False keeps every distinct score, so ties are broken the same way on any data.
    fpr, tpr, thresholds = roc_curve(truth, scores, drop_intermediate=False)
    # thresholds[0] is +inf (nothing predicted positive, J = 0); it is not a usable probability. Leaving it out
    # loses nothing: the lowest threshold (everything positive) also has J = 0.
    j = (tpr - fpr)[1:]
    best = int(np.argmax(j))  # thresholds decrease, so the first maximum is the highest threshold
    return float(thresholds[1:][best]), float(j[best])


def _max_f1(truth: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(threshold, F1) maximising F1 = 2PR / (P + R); ties go to the highest threshold."""
    precision, recall, thresholds = precision_recall_curve(truth, scores)
    # The last (precision, recall) = (1, 0) point has no threshold; thresholds increase.
    precision, recall = precision[:-1], recall[:-1]
    den = precision + recall
    f1 = np.divide(2 * precision * recall, den, out=np.zeros_like(den), where=den > 0)
    best = len(f1) - 1 - int(np.argmax(f1[::-1]))  # the last maximum = the highest threshold, as for Youden
    return float(thresholds[best]), float(f1[best])


def fit_thresholds(y_true: np.ndarray, probs: np.ndarray, criterion: str = "youden", *,
                   default: float = 0.18) -> dict:
    """Per-class decision thresholds chosen on a validation split.

    Each threshold t_k is one of the class's observed scores and is meant to be used as `probs[:, k] >= t_k`
    (scikit-learn's curves use >= too), so applying it to the same data reproduces the reported value exactly.
    Among equally good thresholds the highest is chosen.

    Args:
      y_true: [N, K] one-hot or multi-hot labels (an all-zero row is allowed).
      probs: [N, K] probabilities in [0, 1].
      criterion: "youden" (max TPR - FPR, from `roc_curve`) or "f1" (max F1, from `precision_recall_curve`).
      default: the threshold of a class without an optimum (no positives or no negatives in the split); the
        caller passes the paper's 0.18.

    Returns:
      {"thresholds": [K] floats in [0, 1], "criterion": criterion, "per_class": [{"class": k, "value": J or F1 at
      the threshold (None when undefined), "positives": number of positives, "defined": bool}, ...]}.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    y_true, probs = _check_pair(y_true, probs, "probs")
    _check_probs(probs)
    thresholds, per_class = [], []
    for k in range(y_true.shape[1]):
        truth, scores = y_true[:, k] > 0.5, probs[:, k]
        positives = int(truth.sum())
        if 0 < positives < len(truth):
            t, value = (_youden if criterion == "youden" else _max_f1)(truth, scores)
            thresholds.append(float(np.clip(t, 0.0, 1.0)))
            per_class.append({"class": k, "value": value, "positives": positives, "defined": True})
        else:
            thresholds.append(float(default))
            per_class.append({"class": k, "value": None, "positives": positives, "defined": False})
    return {"thresholds": thresholds, "criterion": criterion, "per_class": per_class}


# --------------------------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------------------------


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -z))  # 1 / (1 + exp(-z)) without overflow for large |z|


@dataclasses.dataclass(frozen=True)
class Calibration:
    """A fitted calibration map from logits z [N, K] to probabilities [N, K].

    Formulas (`apply`; an exported model must compute exactly these):
      method="temperature", single-label: p = softmax(z / T) along the class axis.
      method="temperature", multi-label:  p_k = sigmoid(z_k / T) = 1 / (1 + exp(-z_k / T)), one T for all k.
      method="platt" (multi-label only):  p_k = sigmoid(a_k * z_k + b_k), one (a_k, b_k) per class.
    A temperature T > 1 softens over-confident logits; argmax (and the order of each class's scores, hence AUC)
    is unchanged by temperature scaling.

    Attributes:
      method: "temperature" or "platt".
      multi_label: True for independent sigmoids, False for a softmax.
      temperature: T > 0 (method="temperature"), else None.
      platt_a, platt_b: [K] slopes and intercepts (method="platt"), else None.
      identity_classes: classes whose Platt map could not be fitted (one label value in the validation split, or a
        fitted slope <= 0, which would invert the class's ranking) and is the identity a = 1, b = 0 instead.
    """

    method: str
    multi_label: bool
    temperature: float | None
    platt_a: list[float] | None
    platt_b: list[float] | None
    identity_classes: list[int] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"calibration method must be one of {METHODS}, got {self.method!r}")
        if self.method == "temperature":
            if self.temperature is None or not (math.isfinite(self.temperature) and self.temperature > 0):
                raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        else:
            if not self.multi_label:
                raise ValueError("platt calibration is per class and only for multi-label data; "
                                 "use method='temperature' for single-label (softmax) outputs")
            if self.platt_a is None or self.platt_b is None or len(self.platt_a) != len(self.platt_b):
                raise ValueError("platt calibration needs platt_a and platt_b of the same length K")
            if not np.all(np.isfinite(self.platt_a)) or not np.all(np.isfinite(self.platt_b)):
                raise ValueError("platt_a and platt_b must be finite")

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities [N, K] (float64) from logits [N, K], by the formulas in the class docstring."""
        z = np.asarray(logits, np.float64)
        if z.ndim != 2:
            raise ValueError(f"logits must be 2-D [N, K], got shape {z.shape}")
        if not np.all(np.isfinite(z)):
            raise ValueError("logits contain non-finite values (NaN or inf)")
        if self.method == "temperature":
            return _sigmoid(z / self.temperature) if self.multi_label else _softmax(z / self.temperature)
        if z.shape[1] != len(self.platt_a):
            raise ValueError(f"logits have K = {z.shape[1]} classes, the platt parameters {len(self.platt_a)}")
        return _sigmoid(np.asarray(self.platt_a) * z + np.asarray(self.platt_b))  # [N, K], per-class a_k, b_k

    def to_dict(self) -> dict:
        """JSON-able parameters; `Calibration.from_dict(c.to_dict())` reproduces `c`."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        return cls(method=data["method"], multi_label=bool(data["multi_label"]),
                   temperature=None if data.get("temperature") is None else float(data["temperature"]),
                   platt_a=None if data.get("platt_a") is None else [float(v) for v in data["platt_a"]],
                   platt_b=None if data.get("platt_b") is None else [float(v) for v in data["platt_b"]],
                   identity_classes=[int(c) for c in data.get("identity_classes", [])])


class _LogitPassthrough(ClassifierMixin, BaseEstimator):
    """A 'fitted model' whose decision function is its input: lets scikit-learn calibrate precomputed logits."""

    def fit(self, X, y):
        self.classes_ = np.unique(y)
        return self

    def decision_function(self, X):
        X = np.asarray(X)
        return X[:, 0] if X.shape[1] == 1 else X  # one column: a binary decision value, as sklearn expects

    def predict(self, X):
        d = self.decision_function(X)
        return self.classes_[(d > 0).astype(int)] if d.ndim == 1 else self.classes_[d.argmax(axis=1)]


def _sklearn_temperature(decision: np.ndarray, labels: np.ndarray) -> float:
    """T fitted by `CalibratedClassifierCV(method="temperature")` on precomputed decision values.

    What scikit-learn 1.9 fits (sklearn/calibration.py, `_TemperatureScaling`): one inverse temperature
    beta = 1 / T minimising the multinomial NLL of softmax(beta * logits), by bounded Brent search on log(beta)
    in [-10, 10]; it is stored as `calibrated_classifiers_[0].calibrators[0].beta_`. A 1-D (binary) decision
    value d is first turned into the two logits (-d, d), i.e. P(class 1) = sigmoid(2 * beta * d).
    """
    model = _LogitPassthrough().fit(decision, labels)
    everything = np.arange(len(labels))
    # One "fold" holding every row: the frozen model is not refitted, so cross-validation would only re-predict
    # the same rows and warn about rare classes.
    calibrated = CalibratedClassifierCV(FrozenEstimator(model), method="temperature",
                                        cv=[(everything, everything)]).fit(decision, labels)
    return 1.0 / float(calibrated.calibrated_classifiers_[0].calibrators[0].beta_)


def _temperature_nll(log_t: float, z: np.ndarray, y_true: np.ndarray, multi_label: bool) -> float:
    """Mean NLL of the labels under softmax(z / T) (single-label) or sigmoid(z / T) (multi-label), T = e^log_t."""
    s = z / math.exp(log_t)  # [N, K]
    if multi_label:
        return float(np.mean(np.logaddexp(0.0, s) - y_true * s))  # binary cross-entropy of sigmoid(s)
    m = s.max(axis=1)
    log_norm = m + np.log(np.exp(s - m[:, None]).sum(axis=1))  # [N] logsumexp
    return float(np.mean(log_norm - (s * y_true).sum(axis=1)))


def _golden_temperature(z: np.ndarray, y_true: np.ndarray, multi_label: bool, tol: float = 1e-10) -> float:
    """T minimising the NLL by golden-section search on log T in LOG_T_BOUNDS (no scipy dependency).

    The NLL is convex in beta = 1 / T (a log-sum-exp or softplus of beta * z minus a linear term), so it is
    unimodal in log T = -log beta and golden-section search finds its global minimum on the interval.
    """
    lo, hi = LOG_T_BOUNDS
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = lo + (1 - ratio) * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = (_temperature_nll(x, z, y_true, multi_label) for x in (a, b))
    while hi - lo > tol:
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = lo + (1 - ratio) * (hi - lo)
            fa = _temperature_nll(a, z, y_true, multi_label)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = _temperature_nll(b, z, y_true, multi_label)
    return math.exp((lo + hi) / 2)


def _fit_temperature(z: np.ndarray, y_true: np.ndarray, multi_label: bool) -> float:
    """T by scikit-learn where its temperature scaling is exactly our objective, else by `_golden_temperature`."""
    if multi_label:
        flat = y_true.reshape(-1)
        if 0 < flat.sum() < len(flat):
            # One T shared by all N * K independent sigmoids is binary temperature scaling of the flattened logits:
            # sklearn's sigmoid(2 * beta * d) with d = z / 2 is sigmoid(z / T).
            return _sklearn_temperature((z / 2).reshape(-1, 1), flat.astype(int))
        # One label value everywhere: sklearn refuses a one-class target.
        return _golden_temperature(z, y_true, multi_label)
    labels = y_true.argmax(axis=1)
    k = z.shape[1]
    if len(np.unique(labels)) < k:
        # A class absent from the split: sklearn's classes_ would then miscount the logit columns (with two
        # classes present it would even flatten the [N, K] logits as a binary problem), so it is not exact here.
        return _golden_temperature(z, y_true, multi_label)
    if k == 2:
        # sklearn wants a 1-D decision value for two classes: softmax(beta * (-d, d)) with d = (z1 - z0) / 2
        # equals softmax(beta * z), as softmax ignores a shift of every logit by (z0 + z1) / 2.
        return _sklearn_temperature(((z[:, 1] - z[:, 0]) / 2)[:, None], labels)
    # Subtracting each row's maximum leaves softmax(beta * z) unchanged and stops sklearn from taking logits that
    # happen to lie in [0, 1] and sum to 1 for probabilities (it would take their log).
    return _sklearn_temperature(z - z.max(axis=1, keepdims=True), labels)


def _fit_platt(z: np.ndarray, y_true: np.ndarray) -> tuple[list[float], list[float], list[int]]:
    """Per class k, sigmoid(a_k z_k + b_k) by logistic regression of y_k on the logit column z_k."""
    slopes, intercepts, identity = [], [], []
    for k in range(z.shape[1]):
        truth = (y_true[:, k] > 0.5).astype(int)
        if 0 < truth.sum() < len(truth):
            # scikit-learn's default mild L2 penalty (C = 1, intercept not penalised) keeps a_k finite when the
            # validation split happens to separate class k perfectly; on hundreds of samples its pull on a_k is
            # negligible next to the likelihood.
            fitted = LogisticRegression(C=1.0, max_iter=1000).fit(z[:, k:k + 1], truth)
            if fitted.coef_[0, 0] > 0:
                slopes.append(float(fitted.coef_[0, 0]))
                intercepts.append(float(fitted.intercept_[0]))
                continue
            # a_k <= 0 would reverse (or flatten) the class's ranking: the validation split contradicts the model
            # on this class, and a calibration must not invert a score. The identity is kept, and reported.
            slopes.append(1.0)
            intercepts.append(0.0)
            identity.append(k)
        else:
            slopes.append(1.0)
            intercepts.append(0.0)
            identity.append(k)
    return slopes, intercepts, identity


def fit_calibration(logits: np.ndarray, y_true: np.ndarray, *, multi_label: bool,
                    method: str = "temperature") -> Calibration:
    """Fit a calibration map on validation logits by maximum likelihood of the validation labels.

    Temperature: one T > 0 minimising the NLL of softmax(z / T) (single-label) or of the N * K sigmoids
    sigmoid(z / T) (multi-label), searched on log T in [-10, 10]; a T at a bound (warned) means the split is
    separated perfectly and the likelihood has no interior optimum. Fitted with scikit-learn's
    `CalibratedClassifierCV(method="temperature")` around the frozen logits, which stores beta = 1 / T, where
    that is exactly this objective; by a golden-section search when a class is absent from a single-label split
    or a multi-label split has a single label value (see `_fit_temperature`).
    Platt (multi-label only): per class logistic regression of y_k on z_k; a class with a single label value
    keeps the identity a = 1, b = 0 and is listed in `identity_classes`.

    Args:
      logits: [N, K] pre-softmax / pre-sigmoid outputs on the validation split.
      y_true: [N, K] one-hot (single-label) or multi-hot (multi-label) labels.
      multi_label: whether the model's outputs are independent sigmoids.
      method: "temperature" or "platt".
    """
    if method not in METHODS:
        raise ValueError(f"calibration method must be one of {METHODS}, got {method!r}")
    if method == "platt" and not multi_label:
        raise ValueError("platt calibration is per class and only for multi-label data; "
                         "use method='temperature' for single-label (softmax) outputs")
    y_true, z = _check_pair(y_true, logits, "logits")
    if not multi_label:
        _check_single_label(y_true)
    if method == "platt":
        slopes, intercepts, identity = _fit_platt(z, y_true)
        return Calibration("platt", True, None, slopes, intercepts, identity)
    temperature = _fit_temperature(z, y_true, multi_label)
    if abs(math.log(temperature)) > max(abs(b) for b in LOG_T_BOUNDS) - 1e-3:
        warnings.warn(f"the fitted temperature {temperature:.3g} is at the search bound: the validation logits "
                      "separate the labels (or anti-separate them), so the likelihood has no interior optimum",
                      RuntimeWarning, stacklevel=2)
    return Calibration("temperature", multi_label, temperature, None, None)


# --------------------------------------------------------------------------------------------------------------
# Calibration error
# --------------------------------------------------------------------------------------------------------------


def _bins(confidence: np.ndarray, outcome: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width bin [b / n_bins, (b + 1) / n_bins) (the last one closed): count, sum of confidence, sum
    of outcome. Each [n_bins]."""
    index = np.minimum((confidence * n_bins).astype(int), n_bins - 1)  # [M], floor(p * n_bins), p = 1 in the last
    count = np.bincount(index, minlength=n_bins)
    return (count, np.bincount(index, weights=confidence, minlength=n_bins),
            np.bincount(index, weights=outcome, minlength=n_bins))


def _confidence_outcome(y_true, probs, multi_label: bool, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Single-label: [N] top-label confidence and correctness; multi-label: [N, K] p_k and y_k."""
    if not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be an integer >= 1, got {n_bins!r}")
    y_true, probs = _check_pair(y_true, probs, "probs")
    _check_probs(probs)
    if multi_label:
        return probs, y_true
    _check_single_label(y_true)
    correct = (probs.argmax(axis=1) == y_true.argmax(axis=1)).astype(np.float64)  # argmax ties: the lowest class
    return probs.max(axis=1), correct


def _ece(confidence: np.ndarray, outcome: np.ndarray, n_bins: int) -> float:
    count, conf_sum, outcome_sum = _bins(confidence, outcome, n_bins)
    # sum_b |acc_b - conf_b| * n_b / N, written with sums so that empty bins contribute 0
    return float(np.abs(outcome_sum - conf_sum).sum() / len(confidence))


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, *, multi_label: bool,
                               n_bins: int = 15) -> float:
    """ECE with `n_bins` equal-width bins: sum over bins of |accuracy - mean confidence| * count / N.

    Single-label: top-label ECE (confidence = max_k p_k, correct = argmax p equals the true class).
    Multi-label: the mean over the K classes of the binary ECE of p_k against y_k (observed frequency of y_k = 1
    against mean p_k per bin); every class has one, as it needs no positives.

    Args:
      y_true: [N, K] one-hot or multi-hot labels.
      probs: [N, K] probabilities in [0, 1].
    """
    confidence, outcome = _confidence_outcome(y_true, probs, multi_label, n_bins)
    if multi_label:
        return float(np.mean([_ece(confidence[:, k], outcome[:, k], n_bins) for k in range(confidence.shape[1])]))
    return _ece(confidence, outcome, n_bins)


def reliability_curve(y_true: np.ndarray, probs: np.ndarray, *, multi_label: bool, n_bins: int = 15) -> dict:
    """Per-bin points of a reliability diagram, in the same bins as `expected_calibration_error`.

    Written here rather than with `sklearn.calibration.calibration_curve`, which does not return the bin counts
    a diagram (and the ECE) needs. Single-label: top-label confidence against accuracy. Multi-label: all N * K
    (p_k, y_k) pairs pooled, so a point is the observed frequency of positives among predictions near p.

    Returns:
      {"lower", "upper": bin edges, "confidence": mean confidence, "observed": accuracy (single-label) or
      frequency of positives (multi-label), "count": items per bin} (lists over the non-empty bins only), and
      "n": the number of items binned (N, or N * K multi-label).
    """
    confidence, outcome = _confidence_outcome(y_true, probs, multi_label, n_bins)
    count, conf_sum, outcome_sum = _bins(confidence.reshape(-1), outcome.reshape(-1), n_bins)
    kept = np.flatnonzero(count)  # empty bins have no mean: left out, not drawn as 0
    return {"lower": [b / n_bins for b in kept.tolist()], "upper": [(b + 1) / n_bins for b in kept.tolist()],
            "confidence": (conf_sum[kept] / count[kept]).tolist(),
            "observed": (outcome_sum[kept] / count[kept]).tolist(),
            "count": count[kept].tolist(), "n": int(confidence.size)}
