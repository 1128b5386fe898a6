"""`make demo`: synthetic ISIC-layout data -> TFRecords -> STSC with DenseNet-121 at 64 px -> test metrics,
Grad-CAM overlays and relation heatmaps.

    python -m stsc_tf.demo [--out=demo_out]

Runs in a few minutes on 2 CPU cores; prints progress throughout and, at the end, the metric table and the run
folder. Every stage is the same library call the CLIs make (configs/demo.flags holds the training settings).
"""

from __future__ import annotations

import os
import shutil
import sys
import time

from stsc_tf import cli


def main() -> None:
    cli.setup_logging()
    out = sys.argv[1].split("=", 1)[1] if len(sys.argv) > 1 and sys.argv[1].startswith("--out=") else "demo_out"
    t0 = time.time()
    from absl import flags

    from stsc_tf import flags as flags_lib
    from stsc_tf.config import ConvertConfig
    from stsc_tf.data import synthetic
    from stsc_tf.data.convert import convert

    raw, records, run = (os.path.join(out, d) for d in ("raw", "records", "run"))
    shutil.rmtree(out, ignore_errors=True)
    print(f"[1/4] writing a synthetic ISIC 2018 layout (600 images, 64 px) to {raw}", flush=True)
    synthetic.write_isic(raw, num_images=600, image_size=64, seed=0)
    print(f"[2/4] converting to TFRecords in {records}", flush=True)
    convert(ConvertConfig(dataset="isic2018", source_dir=raw, output_dir=records, image_size=0, num_shards=4,
                          workers=2, verify=True))
    print("[3/4] training STSC (DenseNet-121, 64 px; the first step traces the graph, ~1 min)", flush=True)
    flags_lib.define_train_flags()
    flags.FLAGS([sys.argv[0], "--flagfile=configs/demo.flags", f"--data_dir={records}", f"--model_dir={run}"])
    from stsc_tf import training

    with cli.user_errors():
        training.run_training(flags_lib.train_config())
    print("[4/4] Grad-CAM of 8 test images (DenseNet's pool3_relu: 4x4 at 64 px) and relation heatmaps", flush=True)
    from stsc_tf import explaining

    explaining.gradcam_run(run, images="", out=os.path.join(run, "gradcam"), layer="pool3_relu", num_images=8)
    explaining.relations_run(run)
    print(f"\ndemo finished in {time.time() - t0:.0f} s. Run folder: {os.path.abspath(run)}")
    print(f"  metrics:     {os.path.join(run, 'metrics.md')}")
    print(f"  Grad-CAM:    {os.path.join(run, 'gradcam', 'grid.png')}")
    print(f"  relations:   {os.path.join(run, 'relations', 'relation_distance.png')}")
    print(f"  TensorBoard: tensorboard --logdir {os.path.join(run, 'tensorboard')}")
    print(f"  evaluate:    python -m stsc_tf.evaluate --model_dir={run} --split=test")


if __name__ == "__main__":
    main()
