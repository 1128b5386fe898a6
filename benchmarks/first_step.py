"""Benchmark 5: time to first step of STSC vs supervised, DenseNet-121 at 224 px, broken into phases.

    .venv/bin/python benchmarks/first_step.py [--image_size=224] [--batch=16] [--compare_bn] [--compare_adam]

Each variant runs in a fresh process (as `python -m stsc_tf.train` would): import, model build, compile, first
step (trace + run) and second step (run only; trace = first - second). Variants: supervised (student only), STSC,
with the fused BatchNorm and Adam (the defaults) and, with --compare_bn / --compare_adam, with Keras' own.
Ends with a one-line JSON summary.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import common

PROBE = """
import time
t0 = time.perf_counter()
import sys; sys.path.insert(0, {bench!r})
import common, keras, tensorflow as tf
from stsc_tf import losses
t_import = time.perf_counter() - t0
t = time.perf_counter()
model = common.make_model("densenet121", {size}, num_train=1024, fused_bn={fused})
from stsc_tf.models.optimizers import FusedAdam
make_adam = FusedAdam if {fused_adam} else keras.optimizers.Adam
if {supervised}:
    student = model.student
    opt = make_adam(1e-4); opt.build(student.trainable_variables)
    @tf.function
    def step(data):
        with tf.GradientTape() as tape:
            _, logits = student(data["student_view"], training=True)
            loss = losses.supervised_loss(logits, data["label"], data["labeled"] > 0, multi_label=False,
                                          normalizer=tf.reduce_sum(data["labeled"]))
        opt.apply(tape.gradient(loss, student.trainable_variables), student.trainable_variables)
        return loss
else:
    model.compile(optimizer=make_adam(1e-4))
    step = tf.function(model.train_step)
t_build = time.perf_counter() - t
batch = {{k: tf.constant(v) for k, v in common.make_batch({batch}, {size}).items()}}
t = time.perf_counter(); tf.nest.map_structure(lambda x: x.numpy() if hasattr(x, "numpy") else x, step(batch))
t_first = time.perf_counter() - t
t = time.perf_counter(); tf.nest.map_structure(lambda x: x.numpy() if hasattr(x, "numpy") else x, step(batch))
t_second = time.perf_counter() - t
import json
print(json.dumps({{"import_s": t_import, "build_s": t_build, "first_step_s": t_first, "second_step_s": t_second,
                  "trace_s": t_first - t_second, "to_first_step_s": time.perf_counter() - t0 - t_second}}))
"""


def run(variant: str, size: int, batch: int) -> dict:
    code = PROBE.format(bench=common.ROOT + "/benchmarks", size=size, batch=batch,
                        supervised=variant.startswith("supervised"), fused="keras BN" not in variant,
                        fused_adam="keras Adam" not in variant)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--compare_bn", action="store_true", help="also both variants with Keras' own BatchNorm")
    p.add_argument("--compare_adam", action="store_true", help="also both variants with Keras' own Adam")
    args = p.parse_args()
    variants = ["supervised", "stsc"] + (["supervised, keras BN", "stsc, keras BN"] if args.compare_bn else [])
    variants += ["supervised, keras Adam", "stsc, keras Adam"] if args.compare_adam else []
    results = {v: run(v, args.image_size, args.batch) for v in variants}
    print(f"DenseNet-121, {args.image_size} px, batch {args.batch}; seconds")
    print(f"{'variant':<21} {'import':>7} {'build':>7} {'trace':>7} {'step':>7} {'to 1st step':>12}")
    for v, r in results.items():
        print(f"{v:<21} {r['import_s']:7.1f} {r['build_s']:7.1f} {r['trace_s']:7.1f} {r['second_step_s']:7.1f} "
              f"{r['to_first_step_s']:12.1f}")
    print(json.dumps({"benchmark": "first_step", "image_size": args.image_size, "batch": args.batch,
                      **{v: {k: round(x, 2) for k, x in r.items()} for v, r in results.items()}}))


if __name__ == "__main__":
    main()
