"""Benchmark 3: converter throughput (images/s) with 1 and 2 worker processes on the real samples.

    .venv/bin/python benchmarks/convert_speed.py [--image_size=256]

Converts the real ISIC 2018 sample (245 JPEGs, 600x450) and the ChestX-ray14 sample (94 PNGs, 1024x1024) into a
temporary folder, timing the whole `convert()` (decode check, split, re-encode, shard writing, manifest). Ends with
a one-line JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import common


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--image_size", type=int, default=256)
    p.add_argument("--workers", default="1,2")
    args = p.parse_args()
    from stsc_tf.config import ConvertConfig
    from stsc_tf.data.convert import convert

    shared = os.path.join(common.ROOT, "..", "shared", "data")
    results = {}
    for dataset, n in (("isic2018", 245), ("chestxray14", 94)):
        for workers in (int(w) for w in args.workers.split(",")):
            out = tempfile.mkdtemp()
            t = time.perf_counter()
            convert(ConvertConfig(dataset=dataset, source_dir=os.path.join(shared, dataset),
                                  output_dir=os.path.join(out, "r"), image_size=args.image_size, num_shards=4,
                                  workers=workers))
            seconds = time.perf_counter() - t
            results[f"{dataset}_workers{workers}"] = n / seconds
            print(f"{dataset:<12} workers={workers}: {n / seconds:7.1f} images/s ({seconds:.1f} s for {n})")
    print(json.dumps({"benchmark": "convert", "image_size": args.image_size,
                      "images_per_s": {k: round(v, 1) for k, v in results.items()}}))


if __name__ == "__main__":
    main()
