"""Evaluation metrics: the paper's protocol (SRC-MT's metric code) and standard ones, with bootstrap 95% intervals.

Paper protocol: per class, one-vs-rest AUC; and binary accuracy, sensitivity, specificity, precision and F1 with
the class predicted positive when p >= threshold (SRC-MT: 0.18, not argmax); each the unweighted mean over the
classes where it is defined. A class absent from the evaluated split (or present in every sample) has an undefined
AUC and sensitivity or specificity: it is reported as None and left out of the mean, never counted as 0 or 1.

Standard: top-1 accuracy, balanced multi-class accuracy (the ISIC 2018 challenge metric), macro F1 by argmax,
confusion matrix (single-label); per-class and mean AUC (multi-label). scikit-learn computes everything it offers.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from sklearn import metrics as skm

PAPER_KEYS = ("auc", "accuracy", "sensitivity", "specificity", "precision", "f1")


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.nan


def per_class_binary(y_true: np.ndarray, probs: np.ndarray, threshold) -> dict[str, np.ndarray]:
    """Per class k (one-vs-rest): AUC and metrics at p_k >= threshold_k, NaN where undefined. Arrays of [K].

    `threshold` is one number for every class (the paper's 0.18) or one per class (validated thresholds).
    """
    y_true = np.asarray(y_true) > 0.5
    k = y_true.shape[1]
    thresholds = np.broadcast_to(np.asarray(threshold, np.float64), (k,))
    out = {key: np.full(k, math.nan) for key in PAPER_KEYS}
    for c in range(k):
        t, p = y_true[:, c], probs[:, c]
        pred = p >= thresholds[c]
        tn, fp, fn, tp = skm.confusion_matrix(t, pred, labels=[False, True]).ravel()
        if 0 < t.sum() < len(t):
            out["auc"][c] = skm.roc_auc_score(t, p)
        out["accuracy"][c] = skm.accuracy_score(t, pred)
        out["sensitivity"][c] = _ratio(tp, tp + fn)
        out["specificity"][c] = _ratio(tn, tn + fp)
        out["precision"][c] = _ratio(tp, tp + fp)
        out["f1"][c] = _ratio(2 * tp, 2 * tp + fp + fn) if t.any() else math.nan
    return out


def _mean(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if len(finite) else None


def paper_metrics(y_true: np.ndarray, probs: np.ndarray, threshold=0.18) -> dict:
    """The paper's metrics: macro means of the per-class values (undefined classes left out and listed).

    `threshold`: one number (the paper's protocol) or one per class (validated thresholds).
    """
    per_class = per_class_binary(y_true, probs, threshold)
    result = {key: _mean(per_class[key]) for key in PAPER_KEYS}
    result["per_class"] = {key: [None if math.isnan(v) else float(v) for v in vals] for key, vals in per_class.items()}
    result["undefined_auc_classes"] = [int(c) for c in np.flatnonzero(np.isnan(per_class["auc"]))]
    result["threshold"] = threshold if np.isscalar(threshold) else [float(t) for t in threshold]
    return result


def standard_metrics(y_true: np.ndarray, probs: np.ndarray, multi_label: bool) -> dict:
    y_true = np.asarray(y_true)
    if multi_label:
        per_class = []
        for c in range(y_true.shape[1]):
            t = y_true[:, c] > 0.5
            per_class.append(float(skm.roc_auc_score(t, probs[:, c])) if 0 < t.sum() < len(t) else None)
        defined = [a for a in per_class if a is not None]
        return {"per_class_auc": per_class, "mean_auc": float(np.mean(defined)) if defined else None}
    truth, pred = y_true.argmax(1), probs.argmax(1)
    labels = list(range(y_true.shape[1]))
    with warnings.catch_warnings():  # a class never present gives sklearn's "y_pred contains classes not in y_true"
        warnings.simplefilter("ignore")
        balanced = skm.balanced_accuracy_score(truth, pred)
    return {
        "top1_accuracy": float(skm.accuracy_score(truth, pred)),
        "balanced_accuracy": float(balanced),
        "macro_f1": float(skm.f1_score(truth, pred, labels=sorted(set(truth)), average="macro", zero_division=0)),
        "confusion_matrix": skm.confusion_matrix(truth, pred, labels=labels).tolist(),
    }


def bootstrap_intervals(y_true: np.ndarray, probs: np.ndarray, fn, *, n: int = 200, seed: int = 0,
                        keys=PAPER_KEYS) -> dict:
    """95% percentile intervals of `fn(y, p)[key]` over `n` resamples of the evaluated samples."""
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {k: [] for k in keys}
    for _ in range(n):
        idx = rng.integers(0, len(y_true), len(y_true))
        values = fn(y_true[idx], probs[idx])
        for k in keys:
            if values.get(k) is not None:
                draws[k].append(values[k])
    return {k: ([float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if len(v) >= 10 else None)
            for k, v in draws.items()}


def evaluate_predictions(y_true: np.ndarray, probs: np.ndarray, *, multi_label: bool, threshold=0.18,
                         bootstrap: int = 200, seed: int = 0) -> dict:
    """Everything for one network on one split: paper metrics, standard metrics, bootstrap intervals."""
    y_true, probs = np.asarray(y_true, np.float64), np.asarray(probs, np.float64)
    result = {"n": int(len(y_true)), "paper": paper_metrics(y_true, probs, threshold),
              "standard": standard_metrics(y_true, probs, multi_label)}
    if bootstrap:
        result["paper_ci95"] = bootstrap_intervals(y_true, probs, lambda y, p: paper_metrics(y, p, threshold),
                                                   n=bootstrap, seed=seed)
    return result


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}"


def paper_table(rows: dict[str, dict], labeled_share: float | None = None) -> str:
    """A Markdown table laid out like the paper's Table 1 (Method | D_L | D_U | Acc | Sen | Spec | AUC | F1), plus the
    expected calibration error of each row's probabilities when it has one (`ece`).

    Args:
      rows: method name -> a result with "paper" (and optionally "ece").
      labeled_share: the share of the training split that was labeled (as achieved, not as requested).
    """
    lines = ["| Method | D_L (%) | D_U (%) | Acc | Sen | Spec | AUC | F1 | ECE |",
             "|---|---|---|---|---|---|---|---|---|"]
    dl = "" if labeled_share is None else f"{100 * labeled_share:.1f}"
    du = "" if labeled_share is None else f"{100 * (1 - labeled_share):.1f}"
    for name, result in rows.items():
        p = result["paper"]
        ece = result.get("ece")
        lines.append(f"| {name} | {dl} | {du} | {_pct(p['accuracy'])} | {_pct(p['sensitivity'])} | "
                     f"{_pct(p['specificity'])} | {_pct(p['auc'])} | {_pct(p['f1'])} | "
                     f"{'n/a' if ece is None else f'{ece:.4f}'} |")
    return "\n".join(lines)
