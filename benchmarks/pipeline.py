"""Training-pipeline throughput (two augmented views a sample) vs a reference loader written the PyTorch way.

    .venv/bin/python benchmarks/pipeline.py [--source_dir=../shared/data/isic2018] [--cores=1,2] [--seconds=8]

Reference: PIL open -> Resize(224) -> RandomAffine(10 deg, 0.02) -> RandomHorizontalFlip -> ToTensor/Normalize, twice
a sample (SRC-MT's TransformTwice), numpy batches, in `cores` worker processes (a DataLoader's num_workers).
Ours: `stsc_tf.data.pipeline.train_dataset` on the same images converted with the original bytes kept
(--image_size=0, the same decode work), and on records stored at 256 px (the converter's default), with
tf.data's thread pool limited to `cores` threads. Prints images/s, per core, the ratio, and a JSON line.
"""

from __future__ import annotations

import argparse
import glob
import json
import multiprocessing
import os
import sys
import tempfile
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def reference_view(im, rng):
    """torchvision's RandomAffine + flip + ToTensor + Normalize, written with PIL and numpy."""
    from PIL import Image

    angle = rng.uniform(-10, 10)
    tx, ty = (round(rng.uniform(-0.02, 0.02) * 224) for _ in range(2))
    view = im.rotate(angle, resample=Image.Resampling.BILINEAR, translate=(tx, ty))
    if rng.random() < 0.5:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return ((np.asarray(view, np.float32) / 255.0 - MEAN) / STD).transpose(2, 0, 1)


def reference_sample(args):
    from PIL import Image

    path, seed = args
    rng = np.random.default_rng(seed)
    im = Image.open(path).convert("RGB").resize((224, 224), Image.Resampling.BILINEAR)
    return reference_view(im, rng), reference_view(im, rng)


def run_reference(paths, cores, seconds, batch=32):
    done, t0, seed = 0, time.time(), 0
    with multiprocessing.get_context("fork").Pool(cores) as pool:
        while time.time() - t0 < seconds:
            items = [(paths[(seed + i) % len(paths)], seed + i) for i in range(batch * cores)]
            seed += len(items)
            out = pool.map(reference_sample, items, chunksize=batch)
            np.stack([o[0] for o in out]), np.stack([o[1] for o in out])  # collate, as a DataLoader does
            done += len(items)
    return done / (time.time() - t0)


def run_ours(records_dir, cores, seconds, batch=32):
    import tensorflow as tf

    from stsc_tf.config import DataConfig
    from stsc_tf.data.pipeline import RecordSet, train_dataset

    cfg = DataConfig(data_dir=records_dir, image_size=224, batch_size=batch, labeled_per_batch=8, labeled_ratio=0.5,
                     shuffle_buffer=256)
    ds = train_dataset(RecordSet.open(records_dir), cfg).dataset
    options = tf.data.Options()
    options.threading.private_threadpool_size = cores
    options.threading.max_intra_op_parallelism = 1
    it = iter(ds.with_options(options))
    next(it)  # warm-up: graph building and the first shuffle fill
    done, t0 = 0, time.time()
    while time.time() - t0 < seconds:
        next(it)
        done += batch
    return done / (time.time() - t0)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--source_dir", default=os.path.join(ROOT, "..", "shared", "data", "isic2018"))
    p.add_argument("--cores", default="1,2")
    p.add_argument("--seconds", type=float, default=8.0)
    args = p.parse_args()
    paths = sorted(glob.glob(os.path.join(args.source_dir, "ISIC2018_Task3_Training_Input", "*.jpg")))
    if not paths:
        raise SystemExit(f"no ISIC images under {args.source_dir}")
    import tensorflow as tf

    tf.config.threading.set_inter_op_parallelism_threads(2)
    from stsc_tf.config import ConvertConfig
    from stsc_tf.data.convert import convert

    tmp = tempfile.mkdtemp()
    rec = {}
    for size in (0, 256):
        rec[size] = os.path.join(tmp, f"rec{size}")
        convert(ConvertConfig(dataset="isic2018", source_dir=args.source_dir, output_dir=rec[size], image_size=size,
                              num_shards=4, workers=2))
    results = {}
    print(f"{len(paths)} real ISIC images (600x450 JPEG), 224 px, two views a sample, {os.cpu_count()} cores here")
    print(f"{'cores':>5} {'reference/s':>12} {'ours(orig)/s':>13} {'ours(256)/s':>12} {'ratio orig':>10} {'ratio 256':>9}")
    for cores in [int(c) for c in args.cores.split(",")]:
        ref = run_reference(paths, cores, args.seconds)
        ours0 = run_ours(rec[0], cores, args.seconds)
        ours256 = run_ours(rec[256], cores, args.seconds)
        results[cores] = {"reference": ref, "ours_original_bytes": ours0, "ours_256": ours256,
                          "ratio_original": ours0 / ref, "ratio_256": ours256 / ref}
        print(f"{cores:>5} {ref:>12.1f} {ours0:>13.1f} {ours256:>12.1f} {ours0 / ref:>10.2f} {ours256 / ref:>9.2f}")
    print(json.dumps({"benchmark": "pipeline", "images_per_s": results, "target_ratio_per_core": 2.0}))


if __name__ == "__main__":
    main()
