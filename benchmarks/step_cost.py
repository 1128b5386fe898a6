"""Benchmark 1: cost of an STSC step vs a supervised-only step (same student, batch and image size).

    .venv/bin/python benchmarks/step_cost.py [--backbone=densenet121] [--image_size=96] [--batch=16] [--repeat=5]

Supervised step: student forward + backward (cross-entropy on the labeled rows, the same L2), Adam update.
STSC step: `STSCModel.train_step` with every term on (L_c, L_sc, L_tc active). Broken out, each a compiled
function timed alone: the teacher forward (training mode), the relation + TSC maths on the feature maps, the EMA
update, the memory update. Target: STSC / supervised <= 1.40. Ends with a one-line JSON summary.
"""

from __future__ import annotations

import argparse
import json

import common  # noqa: F401  (sets the path and the log level)
import keras
import tensorflow as tf

from stsc_tf import losses
from stsc_tf.models.optimizers import FusedAdam


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--backbone", default="densenet121")
    p.add_argument("--image_size", type=int, default=96)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--relation_features", default="flatten")
    p.add_argument("--mixed_precision", default="none", choices=["none", "mixed_float16", "mixed_bfloat16"])
    p.add_argument("--jit_compile", action="store_true", help="XLA for the supervised and STSC steps")
    p.add_argument("--keras_bn", action="store_true", help="Keras' own (unfused) BatchNormalization")
    p.add_argument("--keras_adam", action="store_true", help="Keras' own Adam (not the fused kernel)")
    args = p.parse_args()
    if args.mixed_precision != "none":
        keras.mixed_precision.set_global_policy(args.mixed_precision)
    keras.utils.set_random_seed(0)
    model = common.make_model(args.backbone, args.image_size, num_train=4 * args.batch,
                              relation=args.relation_features, fused_bn=not args.keras_bn)
    make_adam = keras.optimizers.Adam if args.keras_adam else FusedAdam
    model.compile(optimizer=make_adam(1e-4))
    batch = {k: tf.constant(v) for k, v in common.make_batch(args.batch, args.image_size).items()}
    student, teacher = model.student, model.teacher
    variables = student.trainable_variables
    sup_opt = make_adam(1e-4)
    if args.mixed_precision == "mixed_float16":
        sup_opt = keras.optimizers.LossScaleOptimizer(sup_opt)
    sup_opt.build(variables)

    @tf.function(jit_compile=args.jit_compile)
    def supervised_step(data):
        with tf.GradientTape() as tape:
            _, logits = student(data["student_view"], training=True)
            loss = losses.supervised_loss(logits, data["label"], data["labeled"] > 0, multi_label=False,
                                          normalizer=tf.reduce_sum(data["labeled"]))
            loss += 0.5 * model.weight_decay * tf.add_n([tf.reduce_sum(tf.square(tf.cast(w, tf.float32)))
                                                         for w in variables])
            scaled = sup_opt.scale_loss(loss)
        sup_opt.apply(tape.gradient(scaled, variables), variables)
        return loss

    stsc_step = tf.function(model.train_step, jit_compile=args.jit_compile)

    @tf.function
    def teacher_forward(data):
        return teacher(data["teacher_view"], training=True)

    f_s, _ = student(batch["student_view"], training=False)
    f_t, _ = teacher(batch["teacher_view"], training=False)

    @tf.function
    def relation_and_tsc(fs, ft):
        ds, dt = model.relation_features(fs), model.relation_features(ft)
        d_prev = tf.cast(tf.gather(model.tsc_memory, batch["index"]), tf.float32)
        seen = tf.gather(model.tsc_seen, batch["index"]) > 0.5
        sc, tc, mon = model.structure_losses(model.relation_matrix(ds), model.relation_matrix(dt),
                                             model.relation_matrix(d_prev), seen, tf.constant(True))
        return sc + tc

    @tf.function
    def ema_update():
        model.update_teacher(tf.constant(0.99))
        return tf.constant(0.0)

    @tf.function
    def memory_update(fs):
        d = model.relation_features(fs)
        model.tsc_memory.value.scatter_update(tf.IndexedSlices(tf.cast(d, model.tsc_memory.dtype), batch["index"]))
        return tf.constant(0.0)

    r = {}
    r["supervised_s"] = common.timed(supervised_step, batch, repeat=args.repeat)
    r["stsc_s"] = common.timed(stsc_step, batch, repeat=args.repeat)
    r["teacher_forward_s"] = common.timed(teacher_forward, batch, repeat=args.repeat)
    r["relation_tsc_s"] = common.timed(relation_and_tsc, f_s, f_t, repeat=args.repeat)
    r["ema_update_s"] = common.timed(ema_update, repeat=args.repeat)
    r["memory_update_s"] = common.timed(memory_update, f_s, repeat=args.repeat)
    r["ratio_stsc_over_supervised"] = r["stsc_s"] / r["supervised_s"]
    r["teacher_share_of_supervised"] = r["teacher_forward_s"] / r["supervised_s"]
    r["supervised_images_per_s"] = args.batch / r["supervised_s"]
    r["stsc_images_per_s"] = args.batch / r["stsc_s"]
    device = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
    print(f"{args.backbone} at {args.image_size} px, batch {args.batch}, relation_features={args.relation_features},"
          f" {device}, precision {args.mixed_precision}, XLA {'on' if args.jit_compile else 'off'}, "
          f"{'Keras' if args.keras_bn else 'fused'} BatchNorm, {'Keras' if args.keras_adam else 'fused'} Adam")
    print(f"  images/s: supervised {r['supervised_images_per_s']:.1f}, STSC {r['stsc_images_per_s']:.1f}")
    for k in ("supervised_s", "stsc_s", "teacher_forward_s", "relation_tsc_s", "ema_update_s", "memory_update_s"):
        print(f"  {k[:-2]:<16} {1000 * r[k]:9.1f} ms  ({r[k] / r['supervised_s']:.2f} x supervised)")
    print(f"  STSC / supervised = {r['ratio_stsc_over_supervised']:.2f} (target <= 1.40)")
    print(json.dumps({"benchmark": "step_cost", "backbone": args.backbone, "image_size": args.image_size,
                      "batch": args.batch, "device": device, "mixed_precision": args.mixed_precision,
                      "fused_bn": not args.keras_bn, "fused_adam": not args.keras_adam,
                      "jit_compile": args.jit_compile, **{k: round(v, 4) for k, v in r.items()}}))


if __name__ == "__main__":
    main()
