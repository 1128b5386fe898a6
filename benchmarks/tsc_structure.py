"""What the temporal sub-structures look like on real features: the real ISIC sample, DenseNet-121, a short run.

    .venv/bin/python benchmarks/tsc_structure.py [--image_size=96] [--epochs=8] [--steps=12] [--batch=32]

Converts ../shared/data/isic2018 (245 real dermoscopy images), trains STSC with DenseNet-121 (random init: no ImageNet
download here) for a few epochs with relation features 'flatten' and then 'avg', and reports per epoch:
  - the training monitors of the run's own rule (log.csv): edge density, stable pairs, components, largest component;
  - for every threshold rule, on the student relation matrices of a fixed batch of training images recorded at the end
    of consecutive epochs (inference mode): edge density of the graph, stable pairs, the number of stable
    sub-structures (connected components with >= 2 members) and their sizes.
The second part is what chose the default rule (BUILD.md, "Temporal sub-structures on real features"). Ends with a
one-line JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import common  # noqa: F401  (sets the path and the log level)
import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from stsc_tf.config import Config, ConvertConfig, DataConfig, LossConfig, ModelConfig, TrainConfig
from stsc_tf.data.convert import convert
from stsc_tf.data.pipeline import RecordSet, eval_dataset
from stsc_tf.explaining import stable_components
from stsc_tf.losses import relation_matrix, tsc_threshold
from stsc_tf.training import run_training

RULES = [("relative", 1.0, "either"), ("relative", 1.0, "mutual"), ("quantile", 0.9, "either"),
         ("quantile", 0.95, "either"), ("zscore", 1.0, "either"), ("zscore", 1.5, "either"), ("zscore", 2.0, "either"),
         ("zscore", 0.5, "mutual"), ("zscore", 1.0, "mutual"), ("zscore", 1.5, "mutual")]


class Recorder(keras.callbacks.Callback):
    """The student's relation features of a fixed batch at the end of every epoch (inference mode)."""

    def __init__(self, images):
        super().__init__()
        self.images, self.features = images, []

    def on_epoch_end(self, epoch, logs=None):
        f, _ = self.model.student(self.images, training=False)
        self.features.append(self.model.relation_features(f).numpy())


def analyse(features: list[np.ndarray]) -> dict:
    """Per rule: per consecutive epoch pair, edge density, stable pairs, and the stable sub-structures' sizes."""
    out = {}
    for mode, tau, edges in RULES:
        rows = []
        for e in range(1, len(features)):
            r_prev, r_now = (relation_matrix(tf.constant(x)).numpy() for x in (features[e - 1], features[e]))
            b = len(r_now)
            t = tsc_threshold(tf.constant(r_now), tau, mode).numpy()
            density = float(((r_now >= t) & ~np.eye(b, dtype=bool)).sum() / (b * (b - 1)))
            components, stable = stable_components(r_now, r_prev, tau, mode, edges)
            rows.append({"epoch": e + 1, "edge_density": density, "stable_pairs": int(np.triu(stable, 1).sum()),
                         "components": len(components), "sizes": [len(c) for c in components]})
        out[f"{mode} {tau:g} {edges}"] = rows
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--image_size", type=int, default=96)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--fixed", type=int, default=32, help="images in the recorded batch")
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="tsc_structure_")
    records = os.path.join(work, "records")
    convert(ConvertConfig(dataset="isic2018", source_dir=os.path.join(common.ROOT, "..", "shared", "data", "isic2018"),
                          output_dir=records, image_size=128, workers=2, num_shards=4))
    fixed = next(iter(eval_dataset(RecordSet.open(records), "train", args.image_size, args.fixed)))["image"]
    summary = {}
    for relation in ("flatten", "avg"):
        cfg = Config(data=DataConfig(data_dir=records, image_size=args.image_size, batch_size=args.batch,
                                     labeled_per_batch=args.batch // 4, labeled_ratio=0.3, cache=True),
                     model=ModelConfig(backbone="densenet121", weights="none", relation_features=relation),
                     loss=LossConfig(consistency_start_epoch=-1, consistency_rampup=2, tsc_start_epoch=1),
                     train=TrainConfig(model_dir=os.path.join(work, f"run_{relation}"), epochs=args.epochs,
                                       steps_per_epoch=args.steps, learning_rate=1e-3, strategy="none",
                                       relation_every_epochs=0))
        recorder = Recorder(fixed)
        run_training(cfg, extra_callbacks=[recorder], bootstrap=0)
        log = pd.read_csv(os.path.join(cfg.train.model_dir, "log.csv"))
        monitors = log[["epoch", "tsc_edge_density", "tsc_stable_pairs", "tsc_components", "tsc_largest_component",
                        "val_auc"]]
        print(f"\n=== relation_features={relation}: training monitors of the run's rule "
              f"({cfg.loss.tsc_tau_mode} {cfg.loss.tsc_tau:g}; batch {args.batch}; epoch means)")
        print(monitors.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        rules = analyse(recorder.features)
        print(f"--- fixed batch of {args.fixed} training images, consecutive epochs: mean over epochs "
              "(edge density, stable pairs, sub-structures, their sizes at the last epoch)")
        for name, rows in rules.items():
            print(f"  {name:<22} density {np.mean([r['edge_density'] for r in rows]):.3f}  stable pairs "
                  f"{np.mean([r['stable_pairs'] for r in rows]):6.1f}  sub-structures "
                  f"{np.mean([r['components'] for r in rows]):4.1f}  sizes at the end {rows[-1]['sizes']}")
        summary[relation] = {"monitors": monitors.round(4).to_dict("list"), "rules": rules}
    print(json.dumps({"benchmark": "tsc_structure", "image_size": args.image_size, "batch": args.batch,
                      "epochs": args.epochs, **summary}))


if __name__ == "__main__":
    main()
