"""Throughput of `python -m stsc_tf.predict`: DenseNet-121 at 224 px on the real ISIC sample's JPEG files.

    .venv/bin/python benchmarks/predict_speed.py [--image_size=224] [--batch_size=32] [--repeat=2]

Makes a run folder (the 245-image ISIC sample converted, DenseNet-121 trained for one step: the weights do not
matter for speed), then predicts the 245 original JPEGs (600 x 450) with `evaluation.predict_run`, which decodes,
preprocesses, runs the student AND the teacher (for the disagreement column) and writes the CSV. Prints images/s of
each repeat (the first includes tracing) and ends with a one-line JSON.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import tempfile
import time

import common  # noqa: F401  (sets the path and the log level)

from stsc_tf import evaluation
from stsc_tf.config import Config, ConvertConfig, DataConfig, ModelConfig, TrainConfig
from stsc_tf.data.convert import convert
from stsc_tf.training import run_training


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args()
    source = os.path.join(common.ROOT, "..", "shared", "data", "isic2018")
    work = tempfile.mkdtemp(prefix="predict_speed_")
    records = os.path.join(work, "records")
    convert(ConvertConfig(dataset="isic2018", source_dir=source, output_dir=records, image_size=256, workers=2))
    run = os.path.join(work, "run")
    run_training(Config(data=DataConfig(data_dir=records, image_size=args.image_size, batch_size=8,
                                        labeled_per_batch=2),
                        model=ModelConfig(backbone="densenet121"),
                        train=TrainConfig(model_dir=run, epochs=1, steps_per_epoch=1, strategy="none",
                                          relation_every_epochs=0)), bootstrap=0)
    images = sorted(glob.glob(os.path.join(source, "ISIC2018_Task3_Training_Input", "*.jpg")))
    listing = os.path.join(work, "images.txt")
    with open(listing, "w") as f:
        f.writelines(p + "\n" for p in images)
    rates = []
    for r in range(args.repeat):
        t = time.perf_counter()
        summary = evaluation.predict_run(run, image_list=listing, out=os.path.join(work, f"preds{r}.csv"),
                                         batch_size=args.batch_size)
        rates.append(summary["predicted"] / (time.perf_counter() - t))
        print(f"repeat {r + 1}: {summary['predicted']} images, {rates[-1]:.1f} images/s (whole command)")
    print(json.dumps({"benchmark": "predict_speed", "image_size": args.image_size, "batch_size": args.batch_size,
                      "images": len(images), "images_per_s": [round(x, 2) for x in rates],
                      "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
