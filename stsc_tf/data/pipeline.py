"""tf.data input pipelines: dual-view semi-supervised training batches and deterministic eval batches.

A training element (DESIGN.md):
    student_view [B, S, S, 3] float32   teacher_view [B, S, S, 3] float32 (independent draws of the augmentation)
    label        [B, K] float32 (zeros for unlabeled samples: their labels never reach the model)
    labeled      [B] float32 1/0        index [B] int64 (dense train-split index: the key of the TSC memory)
(`labeled` is a float 0/1 mask, not bool: under a distribution strategy Keras MEAN-reduces the first batch to build
the model, and a bool tensor cannot be averaged.)

Keras hands replica r of N the contiguous rows [r B/N, (r+1) B/N) of a global batch, so each batch is composed of
N slices, each holding `labeled_per_batch / N` samples of D_L followed by `(B - labeled_per_batch) / N` of D_U.
Decoding, resizing and augmenting all run in tf.data with AUTOTUNE.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import pandas as pd
import tensorflow as tf

from stsc_tf.config import DataConfig
from stsc_tf.data import augment, features
from stsc_tf.data.convert import load_manifest, shard_paths
from stsc_tf.data.splits import labeled_subset
from stsc_tf.errors import ConfigError, DataError

AUTOTUNE = tf.data.AUTOTUNE


@dataclasses.dataclass(frozen=True)
class RecordSet:
    """A converted dataset folder: its manifest and the per-split tables."""

    data_dir: str
    manifest: dict

    @classmethod
    def open(cls, data_dir: str) -> "RecordSet":
        return cls(data_dir, load_manifest(data_dir))

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["class_names"])

    @property
    def num_classes(self) -> int:
        return len(self.manifest["class_names"])

    @property
    def task(self) -> str:
        return self.manifest["task"]

    def count(self, split: str) -> int:
        return int(self.manifest["splits"][split]["count"]) if split in self.manifest["splits"] else 0

    def table(self, split: str) -> pd.DataFrame:
        """The split's CSV (id, index, group, labels), in index order."""
        table = pd.read_csv(os.path.join(self.data_dir, f"{split}.csv"), dtype={"id": str, "group": str},
                            keep_default_na=False).sort_values("index").reset_index(drop=True)
        return table

    def labels(self, split: str, table: pd.DataFrame | None = None) -> np.ndarray:
        """[N, K] labels of a split in index order, from its CSV (or the `table` already read; no image is read)."""
        table = self.table(split) if table is None else table
        out = np.zeros((len(table), self.num_classes), np.float32)
        for i, names in enumerate(table["labels"]):
            for n in filter(None, str(names).split("|")):
                out[i, self.class_names.index(n)] = 1.0
        return out

    def files(self, split: str) -> list[str]:
        return shard_paths(self.data_dir, self.manifest, split)


@dataclasses.dataclass(frozen=True)
class TrainData:
    dataset: tf.data.Dataset
    labeled_indices: np.ndarray  # [M] train-split indices that keep their labels
    labeled_ids: list[str]
    num_train: int
    steps_per_epoch: int  # ceil(|D_L| / labeled_per_batch): SRC-MT's epoch


def check_batch(batch_size: int, labeled_per_batch: int, num_replicas: int) -> None:
    """Raises ConfigError naming the flag when the batch cannot be composed as asked."""
    if batch_size < 1 or labeled_per_batch < 1:
        raise ConfigError(f"--batch_size ({batch_size}) and --labeled_per_batch ({labeled_per_batch}) must be >= 1")
    if labeled_per_batch >= batch_size:
        raise ConfigError(f"--labeled_per_batch ({labeled_per_batch}) must be smaller than --batch_size "
                          f"({batch_size}): the rest of the batch is unlabeled data")
    if batch_size % num_replicas:
        raise ConfigError(f"--batch_size ({batch_size}) is not divisible by the {num_replicas} replicas")
    if labeled_per_batch % num_replicas:
        raise ConfigError(f"--labeled_per_batch ({labeled_per_batch}) is not divisible by the {num_replicas} "
                          "replicas: every replica's slice must hold the same share of labeled samples")


def _records(files: list[str], num_classes: int, deterministic: bool) -> tf.data.Dataset:
    ds = tf.data.Dataset.from_tensor_slices(files)
    ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=min(len(files), 8), num_parallel_calls=AUTOTUNE,
                       deterministic=deterministic)
    return ds.map(lambda s: features.parse_example(s, num_classes), num_parallel_calls=AUTOTUNE,
                  deterministic=deterministic)


def _decoded(rec: dict, image_size: int) -> dict:
    """Decode + resize to the training size, kept as uint8 so a cache holds 1 byte a pixel."""
    decoded = augment.decode_at_least(rec["encoded"], rec["format"], rec["height"], rec["width"], image_size)
    image = tf.cast(tf.round(augment.resize_for_training(decoded, image_size)), tf.uint8)
    return {"image": image, "label": rec["label"], "index": rec["index"]}


def _subset(records: tf.data.Dataset, member: np.ndarray, cfg: DataConfig, decode) -> tf.data.Dataset:
    """The records of one subset (D_L or D_U); decoded and cached in memory when `cfg.cache`."""
    member_t = tf.constant(member)
    ds = records.filter(lambda r: tf.gather(member_t, r["index"]))
    if cfg.cache:
        ds = ds.map(decode, num_parallel_calls=AUTOTUNE).cache()
    return ds


def _epoch_stream(subset: tf.data.Dataset, size: int, cfg: DataConfig, per_slice: int, seed: int,
                  decode) -> tf.data.Dataset:
    """One epoch's endless shuffled stream of a subset, batched per replica slice; its order depends only on seed.

    `decode` is None when the subset is already decoded (cached), else a traced-once tf.function.
    """
    ds = subset.shuffle(min(cfg.shuffle_buffer, size), seed=seed, reshuffle_each_iteration=True).repeat()
    if decode is not None:
        ds = ds.map(decode, num_parallel_calls=AUTOTUNE)
    return ds.batch(per_slice, drop_remainder=True)


def train_dataset(records: RecordSet, cfg: DataConfig, num_replicas: int = 1, steps_per_epoch: int = 0,
                  start_epoch: int = 0, epochs: int = 100) -> TrainData:
    """The semi-supervised training stream: `steps_per_epoch` batches an epoch, epochs start_epoch..epochs-1.

    Each epoch's batches (order and augmentation draws) are a function of (seed, epoch) alone, so a run resumed at
    `start_epoch` sees exactly the batches an uninterrupted run would have seen from there on.

    Args:
      records: the converted dataset.
      cfg: batch composition, ratio, augmentation, seed.
      num_replicas: replicas the global batch is split over (each slice gets the same labeled share).
      steps_per_epoch: 0 = ceil(|D_L| / labeled_per_batch).
      start_epoch: the first epoch the stream yields (resume).
      epochs: the stream ends after epoch `epochs - 1`.
    """
    check_batch(cfg.batch_size, cfg.labeled_per_batch, num_replicas)
    n = records.count("train")
    if n == 0:
        raise DataError(f"{records.data_dir}: the train split is empty")
    table = records.table("train")
    labeled_idx = labeled_subset(records.labels("train", table), cfg.labeled_ratio, cfg.seed)
    is_labeled = np.zeros(n, bool)
    is_labeled[labeled_idx] = True
    has_unlabeled = not is_labeled.all()
    steps = steps_per_epoch or math.ceil(len(labeled_idx) / cfg.labeled_per_batch)
    per_l = cfg.labeled_per_batch // num_replicas
    per_u = (cfg.batch_size - cfg.labeled_per_batch) // num_replicas
    recs = _records(records.files("train"), records.num_classes, deterministic=True)
    # Traced once: every epoch's stream calls it (a plain lambda would be re-traced for each of the epochs).
    decode = tf.function(lambda r: _decoded(r, cfg.image_size), input_signature=[recs.element_spec])
    # With every sample labeled (ratio 1, the upper baseline) the second stream draws from D_L as well.
    unl_member = ~is_labeled if has_unlabeled else is_labeled
    lab_set, unl_set = _subset(recs, is_labeled, cfg, decode), _subset(recs, unl_member, cfg, decode)
    stream_decode = None if cfg.cache else decode

    def compose(l, u):  # one replica slice: labeled first, then unlabeled
        mask = tf.concat([tf.ones([per_l]), tf.fill([per_u], 0.0 if has_unlabeled else 1.0)], 0)  # [b] 1 = labeled
        label = tf.concat([l["label"], u["label"]], 0) * mask[:, None]
        return {"image": tf.concat([l["image"], u["image"]], 0), "label": label, "labeled": mask,
                "index": tf.concat([l["index"], u["index"]], 0)}

    def epoch(e: int) -> tf.data.Dataset:
        base = (cfg.seed * 1_000_003 + 2 * e) % 2**31  # Python ints: shuffle refuses tensor seeds under a global seed
        lab = _epoch_stream(lab_set, int(is_labeled.sum()), cfg, per_l, base, stream_decode)
        unl = _epoch_stream(unl_set, int(unl_member.sum()), cfg, per_u, base + 1, stream_decode)
        ds = tf.data.Dataset.zip(lab, unl).map(compose).batch(num_replicas, drop_remainder=True)
        ds = ds.map(lambda s: {k: tf.reshape(v, tf.concat([[-1], tf.shape(v)[2:]], 0)) for k, v in s.items()})
        return ds.take(steps)

    ds = epoch(start_epoch)
    for e in range(start_epoch + 1, max(epochs, start_epoch + 1)):
        ds = ds.concatenate(epoch(e))
    ds = ds.enumerate(start=start_epoch * steps)
    ds = ds.map(lambda step, b: _two_views(step, b, cfg), num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)
    ds = ds.with_options(_data_sharding())
    return TrainData(ds, labeled_idx, [table["id"][i] for i in labeled_idx], n, steps)


def _two_views(step: tf.Tensor, batch: dict, cfg: DataConfig) -> dict:
    image = tf.cast(batch["image"], tf.float32)
    image.set_shape([cfg.batch_size, cfg.image_size, cfg.image_size, 3])
    views = []
    for v in range(2):
        seed = tf.stack([tf.constant(cfg.seed, tf.int64), step * 2 + v])
        views.append(augment.normalize(augment.random_affine(image, seed, cfg.rotation_deg, cfg.translate,
                                                             cfg.hflip)))
    return {"student_view": views[0], "teacher_view": views[1], "label": batch["label"],
            "labeled": batch["labeled"], "index": batch["index"]}


def eval_dataset(records: RecordSet, split: str, image_size: int, batch_size: int) -> tf.data.Dataset:
    """One view, no augmentation, deterministic order (index order within each shard, shards in order).

    Elements: image [b, S, S, 3], label [b, K], id [b] string, index [b] int64.
    """
    if records.count(split) == 0:
        raise DataError(f"{records.data_dir}: split {split!r} is empty or missing")
    ds = tf.data.TFRecordDataset(records.files(split))
    k = records.num_classes

    def prep(s):
        rec = features.parse_example(s, k)
        return {"image": augment.preprocess_bytes(rec["encoded"], image_size), "label": rec["label"],
                "id": rec["id"], "index": rec["index"]}

    ds = ds.map(prep, num_parallel_calls=AUTOTUNE, deterministic=True).batch(batch_size).prefetch(AUTOTUNE)
    return ds.with_options(_data_sharding())


def _data_sharding() -> tf.data.Options:
    """Shard by element, not by file: a split may have fewer shard files than there are workers."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return options


def distribute_per_worker(dataset: tf.data.Dataset, strategy: tf.distribute.Strategy):
    """The training stream for MultiWorkerMirroredStrategy: each worker keeps its contiguous slice of every batch.

    Every worker builds the same global batches (same seed, same records) and keeps rows
    [w B/W, (w+1) B/W), handed to its local replicas in order: exactly the single-process batch, split as Keras
    splits it on one host, so the step equals the single-process step. The price: each worker reads, decodes and
    augments the whole global batch (W times the input work of a sharded pipeline).
    """

    def per_worker(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
        w, n_workers = ctx.input_pipeline_id, ctx.num_input_pipelines
        local = ctx.num_replicas_in_sync // n_workers

        def keep(batch):
            return {k: tf.reshape(v, tf.concat([[n_workers, local, -1], tf.shape(v)[1:]], 0))[w]
                    for k, v in batch.items()}  # [local, b, ...]

        return dataset.map(keep).unbatch()

    return strategy.distribute_datasets_from_function(per_worker)
