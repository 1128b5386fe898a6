"""Benchmark: a supervised DenseNet-121 step with Keras' BatchNormalization vs FusedBatchNormalization.

    .venv/bin/python benchmarks/fused_bn.py [--image_size=224] [--batch=16] [--repeat=5] [--rounds=2]

Both networks live in one process with the same weights (the fused one is `fuse_batchnorm` of the other). A step:
forward in training mode, softmax cross-entropy on one-hot labels, backward, Adam update, in a tf.function. The first
call of each (trace + run) is timed alone (Keras' first, so its figure also carries the process's one-time start-up
costs); then each round times both, `--repeat` steps each, the order alternating
from round to round so that a drift of the machine's speed does not favour one. Prints the median seconds per step
of each round, the ratio fused / keras per round, and ends with a one-line JSON summary.
"""

from __future__ import annotations

import argparse
import json
import time

import common
import keras
import numpy as np
import tensorflow as tf

from stsc_tf.models.layers import FusedBatchNormalization, fuse_batchnorm


def supervised_step(model: keras.Model):
    """A compiled step of `model` with its own Adam: (images [B, S, S, 3], one-hot labels [B, K]) -> loss."""
    optimizer = keras.optimizers.Adam(1e-4)
    optimizer.build(model.trainable_variables)

    @tf.function
    def step(images, labels):
        with tf.GradientTape() as tape:
            logits = model(images, training=True)  # [B, K]
            loss = tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(labels, logits))
        optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return loss

    return step


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeat", type=int, default=5, help="timed steps of each network per round")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    keras.utils.set_random_seed(0)
    networks = {"keras": keras.applications.DenseNet121(weights=None, input_shape=(args.image_size, args.image_size, 3),
                                                        classes=7, classifier_activation=None)}
    networks["fused"] = fuse_batchnorm(networks["keras"])
    fused_layers = sum(isinstance(layer, FusedBatchNormalization) for layer in networks["fused"].layers)
    data = common.make_batch(args.batch, args.image_size, labeled=args.batch)
    images, labels = tf.constant(data["student_view"]), tf.constant(data["label"])  # [B, S, S, 3], [B, 7]
    steps = {name: supervised_step(model) for name, model in networks.items()}

    first_call = {}
    for name, step in steps.items():
        t = time.perf_counter()
        step(images, labels).numpy()
        first_call[name] = time.perf_counter() - t
    per_round = {name: [] for name in steps}
    for round_index in range(args.rounds):
        order = list(steps) if round_index % 2 == 0 else list(steps)[::-1]
        for name in order:
            per_round[name].append(common.timed(steps[name], images, labels, repeat=args.repeat, warmup=0))
    ratios = [fused / unfused for fused, unfused in zip(per_round["fused"], per_round["keras"])]
    median = {name: float(np.median(times)) for name, times in per_round.items()}

    device = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
    print(f"densenet121 supervised step at {args.image_size} px, batch {args.batch}, {device}, "
          f"{fused_layers} BatchNormalization layers fused, {args.rounds} rounds x {args.repeat} steps")
    for name in steps:
        rounds_ms = ", ".join(f"{1000 * t:.1f}" for t in per_round[name])
        print(f"  {name:<6} median {1000 * median[name]:8.1f} ms/step (rounds: {rounds_ms} ms), "
              f"first call {first_call[name]:.2f} s")
    print(f"  fused / keras per round: {', '.join(f'{r:.3f}' for r in ratios)}; "
          f"of the medians {median['fused'] / median['keras']:.3f}")
    print(json.dumps({"benchmark": "fused_bn", "backbone": "densenet121", "image_size": args.image_size,
                      "batch": args.batch, "device": device, "repeat": args.repeat, "rounds": args.rounds,
                      "keras_s": round(median["keras"], 4), "fused_s": round(median["fused"], 4),
                      "ratio_fused_over_keras": round(median["fused"] / median["keras"], 4),
                      "ratio_per_round": [round(r, 4) for r in ratios],
                      "keras_first_call_s": round(first_call["keras"], 3),
                      "fused_first_call_s": round(first_call["fused"], 3)}))


if __name__ == "__main__":
    main()
