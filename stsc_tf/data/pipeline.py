"""tf.data input pipelines on converted records: dual-view semi-supervised training batches, deterministic eval batches.

The training batches are those of `stsc_tf.data.batches` (their layout and composition are documented there); here
they are read from TFRecords, and each epoch's batches (order and augmentation draws) are a function of
(seed, epoch) alone, so a resumed run sees exactly the batches an uninterrupted one would have. Decoding, resizing and
augmenting all run in tf.data with AUTOTUNE.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os

import numpy as np
import pandas as pd
import tensorflow as tf

from stsc_tf.config import DataConfig
from stsc_tf.data import augment, features
from stsc_tf.data.batches import Augmentation, check_batch, compose, two_views
from stsc_tf.data.convert import damaged_shards, load_manifest, reading_lock, shard_paths
from stsc_tf.data.splits import labeled_subset
from stsc_tf.errors import DataError
from stsc_tf.files import read_csv

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
        table = read_csv(os.path.join(self.data_dir, f"{split}.csv"), dtype={"id": str, "group": str})
        table = table.sort_values("index").reset_index(drop=True)
        return table

    def labels(self, split: str, table: pd.DataFrame | None = None) -> np.ndarray:
        """[N, K] labels of a split in index order, from its CSV (or the `table` already read; no image is read)."""
        table = self.table(split) if table is None else table
        out = np.zeros((len(table), self.num_classes), np.float32)
        for i, names in enumerate(table["labels"]):
            for n in filter(None, str(names).split("|")):
                if n not in self.class_names:
                    raise DataError(f"{self.data_dir}/{split}.csv row {i + 2}: class {n!r} is not in the manifest's "
                                    f"{self.class_names}; the conversion is damaged: convert again")
                out[i, self.class_names.index(n)] = 1.0
        return out

    def files(self, split: str) -> list[str]:
        return shard_paths(self.data_dir, self.manifest, split)

    def check(self, splits=features.SPLITS) -> None:
        """Hashes the splits' shards against the manifest: DataError naming any whose bytes changed.

        TFRecord's own checksums catch a damaged record; a shard rewritten with other, valid records (other labels,
        other images) only a hash catches. About a second per GB.
        """
        damaged = damaged_shards(self.data_dir, {**self.manifest, "splits": {
            s: info for s, info in self.manifest["splits"].items() if s in splits}})
        if damaged:
            raise DataError(f"{self.data_dir}: shard(s) {damaged} differ from the manifest (SHA-256): their bytes "
                            f"changed after the conversion. Check with python -m stsc_tf.convert --verify "
                            f"--output_dir={self.data_dir}, then convert again")

    def _check_unchanged(self) -> None:
        """Under the lock: the folder still holds the conversion this RecordSet was opened on (a conversion may
        have replaced it between the opening, the hashing and the lock)."""
        now = load_manifest(self.data_dir)  # a damaged folder is named by its own error
        if now.get("splits") != self.manifest.get("splits") or now.get("class_names") != self.manifest.get(
                "class_names"):
            raise DataError(f"{self.data_dir} was converted again while this command was starting; run it again")

    @contextlib.contextmanager
    def reading(self):
        """Reads under the conversion's shared lock (no conversion replaces the records meanwhile); turns
        TensorFlow's "corrupted record" into a DataError naming the damaged shard(s) (checked by hash)."""
        try:
            with reading_lock(self.data_dir):
                self._check_unchanged()
                yield
        except tf.errors.DataLossError as e:
            damaged = damaged_shards(self.data_dir, self.manifest)
            what = f"shard(s) {damaged}" if damaged else "a shard"
            raise DataError(f"{self.data_dir}: {what} cannot be read ({e.message.split('}')[-1].strip()[:120]}); "
                            f"the bytes changed after the conversion. Check with python -m stsc_tf.convert --verify "
                            f"--output_dir={self.data_dir}, then convert again") from None


@dataclasses.dataclass(frozen=True)
class TrainData:
    dataset: tf.data.Dataset
    labeled_indices: np.ndarray  # [M] train-split indices that keep their labels
    labeled_ids: list[str]
    num_train: int
    steps_per_epoch: int  # ceil(|D_L| / labeled_per_batch): SRC-MT's epoch


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
                  start_epoch: int = 0, epochs: int = 100, labeled_indices: np.ndarray | None = None,
                  label_table: np.ndarray | None = None) -> TrainData:
    """The semi-supervised training stream: `steps_per_epoch` batches an epoch, epochs start_epoch..epochs-1.

    Args:
      records: the converted dataset.
      cfg: batch composition, ratio, augmentation, seed.
      num_replicas: replicas the global batch is split over (each slice gets the same labeled share).
      steps_per_epoch: 0 = ceil(|D_L| / labeled_per_batch).
      start_epoch: the first epoch the stream yields (resume).
      epochs: the stream ends after epoch `epochs - 1`.
      labeled_indices: the labeled train-split indices (default: `labeled_subset` by ratio and seed).
      label_table: [N, K] labels of the train split to use instead of the records' (labels given by an expert for
        images converted without them); None = the records' labels.
    """
    check_batch(cfg.batch_size, cfg.labeled_per_batch, num_replicas)
    n = records.count("train")
    if n == 0:
        raise DataError(f"{records.data_dir}: the train split is empty")
    table = records.table("train")
    if labeled_indices is None:
        labeled_indices = labeled_subset(records.labels("train", table), cfg.labeled_ratio, cfg.seed)
    labeled_idx = np.asarray(sorted(labeled_indices), dtype=np.int64)
    is_labeled = np.zeros(n, bool)
    is_labeled[labeled_idx] = True
    has_unlabeled = not is_labeled.all()
    steps = steps_per_epoch or math.ceil(len(labeled_idx) / cfg.labeled_per_batch)
    per_l = cfg.labeled_per_batch // num_replicas
    per_u = (cfg.batch_size - cfg.labeled_per_batch) // num_replicas
    recs = _records(records.files("train"), records.num_classes, deterministic=True)
    if label_table is not None:
        table_t = tf.constant(np.asarray(label_table, np.float32))  # [N, K]
        recs = recs.map(lambda r: {**r, "label": tf.gather(table_t, r["index"])})
    # Traced once: every epoch's stream calls it (a plain lambda would be re-traced for each of the epochs).
    decode = tf.function(lambda r: _decoded(r, cfg.image_size), input_signature=[recs.element_spec])
    # With every sample labeled (ratio 1, the upper baseline) the second stream draws from D_L as well.
    unl_member = ~is_labeled if has_unlabeled else is_labeled
    lab_set, unl_set = _subset(recs, is_labeled, cfg, decode), _subset(recs, unl_member, cfg, decode)
    stream_decode = None if cfg.cache else decode

    def epoch(e: int) -> tf.data.Dataset:
        base = (cfg.seed * 1_000_003 + 2 * e) % 2**31  # Python ints: shuffle refuses tensor seeds under a global seed
        lab = _epoch_stream(lab_set, int(is_labeled.sum()), cfg, per_l, base, stream_decode)
        unl = _epoch_stream(unl_set, int(unl_member.sum()), cfg, per_u, base + 1, stream_decode)
        return compose(lab, unl, per_labeled=per_l, per_unlabeled=per_u, num_replicas=num_replicas,
                       has_unlabeled=has_unlabeled).take(steps)

    ds = epoch(start_epoch)
    for e in range(start_epoch + 1, max(epochs, start_epoch + 1)):
        ds = ds.concatenate(epoch(e))
    aug = Augmentation(cfg.rotation_deg, cfg.translate, cfg.hflip)

    def views(step, batch):  # the draws of a step depend on (seed, step) alone
        seeds = tf.stack([[tf.constant(cfg.seed, tf.int64), step * 2], [tf.constant(cfg.seed, tf.int64),
                                                                          step * 2 + 1]])  # [2, 2]
        return two_views(batch, seeds, cfg.image_size, aug, batch_size=cfg.batch_size)

    ds = ds.enumerate(start=start_epoch * steps).map(views, num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)
    ds = ds.with_options(_data_sharding())
    return TrainData(ds, labeled_idx, [table["id"][i] for i in labeled_idx], n, steps)


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

    ds = ds.map(prep, num_parallel_calls=AUTOTUNE, deterministic=True).batch(batch_size)
    # A known length: Keras then ends an evaluation without its "Your input ran out of data" warning.
    ds = ds.apply(tf.data.experimental.assert_cardinality(math.ceil(records.count(split) / batch_size)))
    return ds.prefetch(AUTOTUNE).with_options(_data_sharding())


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
