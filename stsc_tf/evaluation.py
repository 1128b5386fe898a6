"""Evaluate a run folder on a split: metrics table, JSON, ROC curves (the library behind stsc_tf.evaluate)."""

from __future__ import annotations

import logging
import os

import numpy as np

from stsc_tf.data.pipeline import RecordSet
from stsc_tf.errors import ConfigError, DataError
from stsc_tf.training import evaluate_networks, load_run, write_metrics

log = logging.getLogger("stsc_tf.evaluate")


def roc_figure(y: np.ndarray, probs: np.ndarray, class_names: list[str], title: str, path: str) -> None:
    """One-vs-rest ROC curve per class (classes absent from the split are skipped), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for c, name in enumerate(class_names):
        t = y[:, c] > 0.5
        if 0 < t.sum() < len(t):
            fpr, tpr, _ = roc_curve(t, probs[:, c])
            ax.plot(fpr, tpr, label=f"{name} ({roc_auc_score(t, probs[:, c]):.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def evaluate_run(model_dir: str, split: str = "test", which=("student", "teacher"), checkpoint: str = "best",
                 bootstrap: int = 200, data_dir: str = "") -> dict:
    cfg, run, model = load_run(model_dir, checkpoint)
    try:
        records = RecordSet.open(data_dir or run["data_dir"])
    except DataError as e:
        raise ConfigError(f"--data_dir: {e}") from None
    if records.count(split) == 0:
        raise ConfigError(f"--split={split!r}: the records in {records.data_dir} have no such split")
    def draw_roc(name, y, p):
        roc_figure(y, p, records.class_names, f"{name}, {split} split",
                   os.path.join(model_dir, f"roc_{split}_{name}.png"))

    results = evaluate_networks(model, records, split, cfg, which, bootstrap, on_predictions=draw_roc)
    table = write_metrics(model_dir, split, results, cfg.data.labeled_ratio, prefix=f"eval_{split}")
    print(table)
    for name, r in results.items():
        s = r["standard"]
        extra = (f"top-1 {s['top1_accuracy']:.4f}, balanced accuracy {s['balanced_accuracy']:.4f}, "
                 f"macro F1 {s['macro_f1']:.4f}") if "top1_accuracy" in s else f"mean AUC {s['mean_auc']}"
        print(f"{name}: {extra}; AUC 95% CI {r.get('paper_ci95', {}).get('auc')}")
    print(f"wrote {os.path.join(model_dir, f'eval_{split}.json')}, eval_{split}.md and roc_{split}_*.png")
    return results
