"""Shared helpers of the benchmarks: a model, a batch, a timer, and peak RSS."""

from __future__ import annotations

import os
import resource
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def make_batch(batch: int, size: int, classes: int = 7, labeled: int | None = None, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    labeled = batch // 4 if labeled is None else labeled
    mask = (np.arange(batch) < labeled).astype("float32")
    return {"student_view": rng.normal(size=(batch, size, size, 3)).astype("float32"),
            "teacher_view": rng.normal(size=(batch, size, size, 3)).astype("float32"),
            "label": np.eye(classes, dtype="float32")[rng.integers(0, classes, batch)] * mask[:, None],
            "labeled": mask, "index": np.arange(batch, dtype="int64")}


def make_model(backbone: str, size: int, num_train: int, classes: int = 7, relation: str = "flatten",
               fused_bn: bool = True):
    """An STSCModel with every term on from step 0 (the costly configuration: TSC active)."""
    from stsc_tf.models.stsc import STSCModel

    loss = dict(consistency_start_epoch=-1, consistency_rampup=0, tsc_start_epoch=0)
    return STSCModel.from_backbone(backbone, num_classes=classes, image_size=size, relation_features=relation,
                                   fused_bn=fused_bn, num_train=num_train, loss_config=loss, steps_per_epoch=1,
                                   weight_decay=5e-4)


def timed(fn, *args, repeat: int = 5, warmup: int = 1) -> float:
    """Median seconds of fn(*args) after warm-up calls (the first includes tracing)."""
    for _ in range(warmup):
        _sync(fn(*args))
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        _sync(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def _sync(out):
    import tensorflow as tf

    for x in tf.nest.flatten(out):
        if hasattr(x, "numpy"):
            x.numpy()
