"""Benchmark 4: peak RSS of a DenseNet-121 STSC step (batch 48, 224 px), and the TSC memory at full scale.

    .venv/bin/python benchmarks/memory.py [--batch=48] [--image_size=224] [--steps=2]

The step runs in a fresh subprocess (peak RSS = ru_maxrss after `steps` compiled steps, model and TSC memory for
N = 7,010 ISIC training images included). The TSC memory table is arithmetic: N x D x 2 bytes (float16) per replica.
Ends with a one-line JSON summary.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import common

# Full-scale training-split sizes: 70 % of ISIC 2018 Task 3 (10,015) and of ChestX-ray14 (112,120).
TRAIN_SIZES = {"isic2018": 7010, "chestxray14": 78484}
DENSENET_MAP = (7, 7, 1024)  # at 224 px


def memory_table() -> dict:
    out = {}
    for name, n in TRAIN_SIZES.items():
        for mode, d in (("flatten", DENSENET_MAP[0] * DENSENET_MAP[1] * DENSENET_MAP[2]), ("avg", DENSENET_MAP[2])):
            out[f"{name}_{mode}_GB"] = n * d * 2 / 1e9
    return out


STEP = """
import sys, time, json
sys.path.insert(0, {bench!r})
import common, keras, tensorflow as tf
model = common.make_model("densenet121", {size}, num_train=7010, relation={relation!r})
model.compile(optimizer=keras.optimizers.Adam(1e-4))
batch = {{k: tf.constant(v) for k, v in common.make_batch({batch}, {size}).items()}}
step = tf.function(model.train_step)
before = common.peak_rss_mb()
t = time.perf_counter()
for _ in range({steps}):
    step(batch)["loss"].numpy()
print(json.dumps({{"peak_rss_mb": common.peak_rss_mb(), "rss_before_steps_mb": before,
                  "seconds_per_step_incl_trace": (time.perf_counter() - t) / {steps}}}))
"""


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--relation_features", default="flatten")
    args = p.parse_args()
    code = STEP.format(bench=common.ROOT + "/benchmarks", size=args.image_size, batch=args.batch, steps=args.steps,
                       relation=args.relation_features)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    step = json.loads(done.stdout.strip().splitlines()[-1])
    table = memory_table()
    print(f"DenseNet-121 STSC step, batch {args.batch}, {args.image_size} px, relation_features="
          f"{args.relation_features}, TSC memory for 7,010 images:")
    print(f"  peak RSS {step['peak_rss_mb']:.0f} MB (after building: {step['rss_before_steps_mb']:.0f} MB)")
    print("TSC memory per replica at full scale (float16):")
    for k, v in table.items():
        print(f"  {k[:-3]:<22} {v:8.2f} GB")
    print(json.dumps({"benchmark": "memory", "batch": args.batch, "image_size": args.image_size, **step,
                      **{k: round(v, 3) for k, v in table.items()}}))


if __name__ == "__main__":
    main()
