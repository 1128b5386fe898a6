"""TFRecord feature keys and parse spec: the ONE place the writer (convert.py) and the reader (pipeline.py) share.

One `tf.train.Example` per image. `image/label` is a float vector of length K (one-hot, or multi-hot; all-zero
is ChestX-ray14's "No Finding"). `image/index` is dense 0..N-1 within a split: the key of the TSC memory.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

ENCODED = "image/encoded"
FORMAT = "image/format"
ID = "image/id"
HEIGHT = "image/height"
WIDTH = "image/width"
LABEL = "image/label"
GROUP = "image/group"
INDEX = "image/index"

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def shard_name(split: str, i: int, n: int) -> str:
    return f"{split}-{i:05d}-of-{n:05d}.tfrecord"


def _bytes(v: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))


def _int(v: int) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v)]))


def make_example(*, encoded: bytes, fmt: str, image_id: str, height: int, width: int, label: np.ndarray,
                 group: str, index: int) -> bytes:
    """Serialises one record. `label` is a length-K float vector."""
    feature = {
        ENCODED: _bytes(encoded),
        FORMAT: _bytes(fmt.encode()),
        ID: _bytes(image_id.encode()),
        HEIGHT: _int(height),
        WIDTH: _int(width),
        LABEL: tf.train.Feature(float_list=tf.train.FloatList(value=[float(x) for x in label])),
        GROUP: _bytes(group.encode()),
        INDEX: _int(index),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def parse_spec(num_classes: int) -> dict:
    return {
        ENCODED: tf.io.FixedLenFeature([], tf.string),
        FORMAT: tf.io.FixedLenFeature([], tf.string),
        ID: tf.io.FixedLenFeature([], tf.string),
        HEIGHT: tf.io.FixedLenFeature([], tf.int64),
        WIDTH: tf.io.FixedLenFeature([], tf.int64),
        LABEL: tf.io.FixedLenFeature([num_classes], tf.float32),
        GROUP: tf.io.FixedLenFeature([], tf.string),
        INDEX: tf.io.FixedLenFeature([], tf.int64),
    }


def parse_example(serialized: tf.Tensor, num_classes: int) -> dict:
    """Parses one serialized Example into a dict keyed by the short names (encoded, id, label, ...)."""
    parsed = tf.io.parse_single_example(serialized, parse_spec(num_classes))
    return {key.split("/", 1)[1]: value for key, value in parsed.items()}
