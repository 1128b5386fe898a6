"""`make demo`: synthetic ISIC-layout data -> TFRecords -> STSC (DenseNet-121, 64 px) -> test metrics, Grad-CAM,
relation heatmaps and stable sub-structures -> thresholds and calibration fitted on validation -> predictions for
the test images -> the next 20 images to label.

    python -m stsc_tf.demo [--out=demo_out]

Runs in a few minutes on 2 CPU cores; prints progress throughout and, at the end, where every file is. Every stage
is the same library call the CLIs make (configs/demo.flags holds the training settings).
"""

from __future__ import annotations

import os
import shutil
import sys
import time

from absl import flags

from stsc_tf import cli, evaluation, explaining, flags as flags_lib, suggesting, training
from stsc_tf.config import ConvertConfig
from stsc_tf.data import synthetic
from stsc_tf.data.convert import convert
from stsc_tf.data.pipeline import RecordSet
from stsc_tf.data.sources import isic2018
from stsc_tf.models import registered_backbones

STAGES = 7


def _stage(n: int, text: str) -> None:
    print(f"[{n}/{STAGES}] {text}", flush=True)


def main() -> None:
    cli.setup_logging()
    out = sys.argv[1].split("=", 1)[1] if len(sys.argv) > 1 and sys.argv[1].startswith("--out=") else "demo_out"
    t0 = time.time()
    raw, records, run = (os.path.join(out, d) for d in ("raw", "records", "run"))
    mine = {"raw", "records", "run"}  # and the converter's lock / work files beside records (".records.*")
    if os.path.isdir(out) and not {e for e in os.listdir(out) if not e.startswith(".records.")} <= mine:
        raise SystemExit(f"error: {out} holds files that are not a demo's ({sorted(os.listdir(out))[:5]}); "
                         "choose another --out")
    shutil.rmtree(out, ignore_errors=True)  # an earlier demo's folder: the demo starts afresh
    _stage(1, f"writing a synthetic ISIC 2018 layout (600 images, 64 px) to {raw}")
    synthetic.write_isic(raw, num_images=600, image_size=64, seed=0)
    _stage(2, f"converting to TFRecords in {records}")
    convert(ConvertConfig(dataset="isic2018", source_dir=raw, output_dir=records, image_size=0, num_shards=4,
                          workers=2, verify=True))
    _stage(3, "training STSC (DenseNet-121, 64 px; the first step traces the graph, under a minute)")
    flags_lib.define_train_flags(registered_backbones())
    flags.FLAGS([sys.argv[0], "--flagfile=configs/demo.flags", f"--data_dir={records}", f"--model_dir={run}"])
    with cli.user_errors():
        training.run_training(flags_lib.train_config())
        _stage(4, "Grad-CAM of 8 test images (DenseNet's pool3_relu: 4x4 at 64 px), relation heatmaps, stable "
                  "sub-structures")
        explaining.gradcam_run(run, images="", out=os.path.join(run, "gradcam"), layer="pool3_relu", num_images=8)
        explaining.relations_run(run)
        explaining.substructures_run(run)
        _stage(5, "per-class thresholds (Youden's J) and temperature calibration, fitted on the validation split")
        evaluation.evaluate_run(run, split="test", fit=True, bootstrap=0)
        _stage(6, "predicting the test images (their JPEG files) to a CSV")
        test_ids = RecordSet.open(records).table("test")["id"]
        listing = os.path.join(run, "test_images.txt")
        with open(listing, "w") as f:
            f.writelines(os.path.join(raw, isic2018.TRAIN_DIR, f"{i}.jpg") + "\n" for i in test_ids)
        evaluation.predict_run(run, image_list=listing, out=os.path.join(run, "predictions.csv"),
                               thresholds="validated")
        _stage(7, "suggesting the next 20 unlabeled training images to label")
        suggesting.suggest_run(run, budget=20, out=os.path.join(run, "to_label.csv"))
    print(f"\ndemo finished in {time.time() - t0:.0f} s. Run folder: {os.path.abspath(run)}")
    for what, name in [("test metrics", "metrics.md"), ("paper vs validated", "eval_test.md"),
                       ("calibration", "calibration.json"), ("reliability", "reliability_val_teacher.png"),
                       ("Grad-CAM", "gradcam/grid.png"), ("relations", "relations/relation_distance.png"),
                       ("sub-structures", "substructures.png"), ("predictions", "predictions.csv"),
                       ("to label next", "to_label.csv"), ("their thumbnails", "to_label.png")]:
        print(f"  {what + ':':<20}{os.path.join(run, name)}")
    print(f"  {'TensorBoard:':<20}tensorboard --logdir {os.path.join(run, 'tensorboard')}")


if __name__ == "__main__":
    main()
