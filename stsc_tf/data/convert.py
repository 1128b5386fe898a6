"""Raw layout -> sharded TFRecords + split CSVs + manifest.json (sharded, parallel, atomic).

    python -m stsc_tf.convert --dataset=isic2018 --source_dir=../shared/data/isic2018 --output_dir=/tmp/isic

Stages: load and validate the tables -> decode every image in parallel (a missing, truncated, corrupt or oversized
file is an error naming it, or a counted skip) -> split -> write the shards -> split CSVs -> manifest.json -> read
the shards back against the manifest -> move the finished folder into place.

Everything is written into a hidden work folder beside the output folder (`.<name>.converting-<pid>`, marked by a
file the converter writes), so the output folder only ever holds a finished conversion: a kill leaves the old
folder untouched, and the next run removes the work folders it recognises by their marker. With `overwrite`, the
old conversion is replaced only after the new one is complete and verified (old aside, new in, old removed; a kill
between the two renames is repaired by the next run, which puts the old one back). Files the converter did not
write are never deleted: an output folder holding anything but a finished conversion is refused.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import multiprocessing
import os
import re
import shutil
import time

import numpy as np
import pandas as pd
import tensorflow as tf

from stsc_tf.config import ConvertConfig
from stsc_tf.data import features
from stsc_tf.data.images import encode_task, validate_image
from stsc_tf.data.sources import Row, Source, load_source
from stsc_tf.data.splits import DEFAULT_RATIOS, read_split_dir, stratified_group_split
from stsc_tf.errors import DataError
from stsc_tf.files import atomic_write_csv, atomic_write_json, read_csv, sha256, try_lock

log = logging.getLogger("stsc_tf.convert")
TMP_SUFFIX = ".incomplete"
WORK_MARK = ".stsc_convert_work"  # inside a work folder: this converter made it
OLD_MARK = ".stsc_convert_replaced"  # inside an old conversion moved aside by --overwrite
SHARD_NAME = re.compile(r"(train|val|test)-\d{5}-of-\d{5}\.tfrecord")  # features.shard_name's form


# ----------------------------------------------------------------------------------------------------------------
# Shards and the worker pool (image decoding and validation live in images.py, which imports no TensorFlow, so the
# validation workers start fast).
# ----------------------------------------------------------------------------------------------------------------
def _imap(fn, tasks, pool, workers: int, what: str):
    """fn over tasks, in order, in `pool` of `workers` (or here when None); logs progress about every 10%."""
    total, t0 = len(tasks), time.time()
    step = max(1, total // 10)
    if pool is None or total <= 1:
        mapped = map(fn, tasks)
    else:
        mapped = pool.imap(fn, tasks, chunksize=max(1, min(16, total // (8 * workers))))
    for done, r in enumerate(mapped, start=1):
        yield r
        if done % step == 0 or done == total:
            log.info("%s: %d/%d (%.1f/s)", what, done, total, done / max(time.time() - t0, 1e-9))


def _write_shards(shards: list[tuple[str, list]], out_dir: str, image_size: int, pool, workers: int,
                  max_pixels: int) -> list[dict]:
    """Workers re-encode images (PIL), or only read them when the original bytes are kept; this process writes each
    shard under a temporary name, hashes it and renames it. Returns the manifest entries in shard order."""
    encoded = _imap(encode_task, [(r[2], image_size, r[5], max_pixels) for _, records in shards for r in records],
                    pool, workers, "written images")
    entries = []
    for name, records in shards:
        tmp = os.path.join(out_dir, name + TMP_SUFFIX)
        with tf.io.TFRecordWriter(tmp) as writer:
            for index, row_id, _, label, group, _ in records:
                data, fmt, h, w = next(encoded)
                writer.write(features.make_example(encoded=data, fmt=fmt, image_id=row_id, height=h, width=w,
                                                   label=label, group=group, index=index))
        os.replace(tmp, os.path.join(out_dir, name))
        entries.append({"file": name, "records": len(records), "sha256": sha256(os.path.join(out_dir, name)),
                        "bytes": os.path.getsize(os.path.join(out_dir, name))})
    return entries


# ----------------------------------------------------------------------------------------------------------------
# The output folder: built aside, moved into place when finished.
# ----------------------------------------------------------------------------------------------------------------
def _siblings(out_dir: str, kind: str) -> list[str]:
    parent, name = os.path.split(os.path.abspath(out_dir))
    prefix = f".{name}.{kind}-"
    return [os.path.join(parent, e) for e in sorted(os.listdir(parent)) if e.startswith(prefix)]


def _conversion_files(out_dir: str) -> set[str]:
    """The names a finished conversion consists of: the shards its manifest lists (even if some are damaged), the
    split CSVs, skipped.csv and the manifest."""
    own = {f"{split}.csv" for split in features.SPLITS} | {"skipped.csv", features.MANIFEST}
    try:
        with open(os.path.join(out_dir, features.MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
        listed = {s["file"] for info in manifest["splits"].values() for s in info["shards"]}
        return own | {f for f in listed if SHARD_NAME.fullmatch(str(f))}  # a hand-edited entry names no user file
    except (OSError, ValueError, KeyError, TypeError):
        return own


def _is_conversion(out_dir: str) -> bool:
    """True when the folder's manifest.json is one this converter wrote (another tool's manifest is not)."""
    try:
        with open(os.path.join(out_dir, features.MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return False
    return (isinstance(manifest, dict) and {"format_version", "task", "class_names", "splits"} <= set(manifest)
            and isinstance(manifest["splits"], dict))


def lock_path(out_dir: str) -> str:
    """The lock file of a conversion folder, beside it: a conversion holds it exclusively, readers shared."""
    parent, name = os.path.split(os.path.realpath(out_dir))  # one lock whatever link a process came through
    return os.path.join(parent, f".{name}.lock")


@contextlib.contextmanager
def reading_lock(data_dir: str):
    """Held while a process reads a conversion: a conversion into that folder is refused meanwhile, and the other
    way round. Where the lock cannot be created (a read-only place), nothing can convert there either: no lock."""
    try:
        handle = open(lock_path(data_dir), "a+")  # readable too: NFS emulates a shared flock with a read lock
    except OSError:
        handle = None
    try:
        if handle is not None and not try_lock(handle, fcntl.LOCK_SH):
            raise DataError(f"{data_dir}: a conversion into it is running (python -m stsc_tf.convert); wait for it "
                            "to finish")
        yield
    finally:
        if handle is not None:
            handle.close()


class OutputFolder:
    """The output folder of one conversion: a lock for it, its work folder, and the final move (see module doc)."""

    def __init__(self, out_dir: str, overwrite: bool):
        self.out_dir = os.path.abspath(out_dir)
        self.overwrite = overwrite
        parent, name = os.path.split(self.out_dir)
        os.makedirs(parent, exist_ok=True)
        self.work = os.path.join(parent, f".{name}.converting-{os.getpid()}")
        self._lock_path = lock_path(self.out_dir)
        self._lock = None

    def __enter__(self) -> "OutputFolder":
        self._lock = open(self._lock_path, "a+")
        if not try_lock(self._lock, fcntl.LOCK_EX):
            self._lock.close()
            raise DataError(f"another process uses {self.out_dir}: a conversion into it, or a training, evaluation "
                            "or prediction reading it; wait for it to finish")
        self._recover()
        self._check_target()
        os.makedirs(self.work)
        atomic_write_json(os.path.join(self.work, WORK_MARK), {"pid": os.getpid(), "target": self.out_dir})
        return self

    def __exit__(self, *exc):
        shutil.rmtree(self.work, ignore_errors=True)  # a finished work folder has been moved away already
        self._lock.close()  # releases the flock
        return False

    def _recover(self) -> None:
        """Cleans what killed runs left: their work folders; an old conversion moved aside but not replaced."""
        for work in _siblings(self.out_dir, "converting"):
            if os.path.isfile(os.path.join(work, WORK_MARK)):
                shutil.rmtree(work, ignore_errors=True)
                log.info("removed %s, the work folder of a conversion that did not finish", work)
        for old in _siblings(self.out_dir, "replaced"):
            if not os.path.isfile(os.path.join(old, OLD_MARK)):
                continue
            if not os.path.exists(self.out_dir):
                os.remove(os.path.join(old, OLD_MARK))
                os.rename(old, self.out_dir)
                log.info("put back %s: an --overwrite was killed before its new conversion was in place",
                         self.out_dir)
            else:
                shutil.rmtree(old, ignore_errors=True)

    def _check_target(self) -> None:
        if not os.path.exists(self.out_dir):
            return
        if not os.path.isdir(self.out_dir):
            raise DataError(f"--output_dir={self.out_dir} is a file, not a folder")
        entries = sorted(os.listdir(self.out_dir))
        if not entries:
            return
        if features.MANIFEST not in entries or not _is_conversion(self.out_dir):
            raise DataError(f"output folder {self.out_dir} is not empty and holds no finished conversion "
                            f"({entries[:5]}); the converter never deletes files it did not write: choose an empty "
                            "or new folder")
        if not self.overwrite:
            raise DataError(f"output folder {self.out_dir} already holds a finished conversion (manifest.json); "
                            "pass --overwrite to replace it (the old one stays until the new one is complete)")
        foreign = sorted(set(entries) - _conversion_files(self.out_dir))
        if foreign:  # --overwrite replaces a conversion, never what a user put beside it
            raise DataError(f"output folder {self.out_dir} holds files the converter did not write ({foreign[:5]}); "
                            "move them out before --overwrite replaces the conversion")

    def commit(self) -> None:
        """Moves the finished work folder into place (replacing an old conversion only now)."""
        os.remove(os.path.join(self.work, WORK_MARK))
        if os.path.isdir(self.out_dir) and os.listdir(self.out_dir):
            old = os.path.join(os.path.dirname(self.out_dir),
                               f".{os.path.basename(self.out_dir)}.replaced-{os.getpid()}")
            atomic_write_json(os.path.join(self.out_dir, OLD_MARK), {"replaced_by": os.getpid()})
            os.rename(self.out_dir, old)
            os.rename(self.work, self.out_dir)
            shutil.rmtree(old, ignore_errors=True)
            log.info("replaced the conversion in %s", self.out_dir)
        else:
            if os.path.isdir(self.out_dir):
                os.rmdir(self.out_dir)  # empty
            os.rename(self.work, self.out_dir)


# ----------------------------------------------------------------------------------------------------------------
# Splits.
# ----------------------------------------------------------------------------------------------------------------
def assign_splits(source: Source, rows: list[Row], cfg: ConvertConfig) -> np.ndarray:
    """Returns a split name per row ('train' | 'val' | 'test')."""
    labels = np.stack([r.label for r in rows])
    if cfg.split_dir:
        assignment = read_split_dir(cfg.split_dir, {r.id for r in rows})
        return np.array([assignment[r.id] for r in rows], dtype=object)
    if cfg.split == "random":
        return stratified_group_split(labels, [r.group for r in rows], DEFAULT_RATIOS, cfg.seed)
    if cfg.split != "official":
        raise DataError(f"--split must be 'random' or 'official', got {cfg.split!r}")
    if not source.has_official_split:
        raise DataError(f"--split=official: {source.source_dir} has no official split files for {source.dataset}")
    out = np.array([r.split for r in rows], dtype=object)
    trainval = np.flatnonzero(out == "trainval")  # ChestX-ray14: train_val_list split 7:1 by patient
    if len(trainval):
        sub = stratified_group_split(labels[trainval], [rows[i].group for i in trainval], (0.7, 0.1), cfg.seed,
                                     names=("train", "val"))
        out[trainval] = sub
    return out


def check_no_group_straddles(rows: list[Row], splits: np.ndarray) -> None:
    seen: dict[str, str] = {}
    for r, s in zip(rows, splits):
        if seen.setdefault(r.group, s) != s:
            raise DataError(f"group {r.group!r} is in both {seen[r.group]!r} and {s!r} splits (image {r.id})")


# ----------------------------------------------------------------------------------------------------------------
# Reading back.
# ----------------------------------------------------------------------------------------------------------------
def load_manifest(data_dir: str) -> dict:
    """Reads and checks `manifest.json`: every shard present with its recorded size and counts that add up.

    Raises DataError naming the folder and what disagrees. (`verify_dataset` also checks hashes and contents.)
    """
    path = os.path.join(data_dir, features.MANIFEST)
    if not os.path.isfile(path):
        raise DataError(f"{data_dir}: no {features.MANIFEST}; it is not a finished conversion "
                        "(run python -m stsc_tf.convert)")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if manifest.get("format_version") != features.FORMAT_VERSION:
        raise DataError(f"{path}: format_version {manifest.get('format_version')} != {features.FORMAT_VERSION}")
    for split, info in manifest["splits"].items():
        if sum(s["records"] for s in info["shards"]) != info["count"]:
            raise DataError(f"{path}: split {split!r} shard records do not add up to its count {info['count']}")
        for shard in info["shards"]:
            p = os.path.join(data_dir, shard["file"])
            if not os.path.isfile(p):
                raise DataError(f"{data_dir}: shard {shard['file']} listed in the manifest is missing")
            if os.path.getsize(p) != shard["bytes"]:
                raise DataError(f"{data_dir}: shard {shard['file']} has {os.path.getsize(p)} bytes, the manifest "
                                f"says {shard['bytes']}")
    return manifest


def shard_paths(data_dir: str, manifest: dict, split: str) -> list[str]:
    if split not in manifest["splits"]:
        raise DataError(f"{data_dir}: no split {split!r} (have {sorted(manifest['splits'])})")
    return [os.path.join(data_dir, s["file"]) for s in manifest["splits"][split]["shards"]]


def damaged_shards(data_dir: str, manifest: dict | None = None) -> list[str]:
    """The shards whose SHA-256 differs from the manifest's (bytes changed on disk)."""
    manifest = manifest or load_manifest(data_dir)
    return [shard["file"] for info in manifest["splits"].values() for shard in info["shards"]
            if sha256(os.path.join(data_dir, shard["file"])) != shard["sha256"]]


def verify_dataset(data_dir: str, decode: bool = True) -> dict:
    """Reads every record back: hashes, counts, dense indices, ids against the CSVs, labels, and (with `decode`)
    that every image decodes to its recorded size. Raises DataError naming what disagrees."""
    manifest = load_manifest(data_dir)
    k = len(manifest["class_names"])
    summary = {}
    damaged = damaged_shards(data_dir, manifest)
    if damaged:
        raise DataError(f"{data_dir}: shard(s) {damaged} differ from the manifest (SHA-256): the files changed on "
                        "disk after the conversion; convert again")
    for split, info in manifest["splits"].items():
        indices, ids, class_counts = [], [], np.zeros(k)
        ds = tf.data.TFRecordDataset(shard_paths(data_dir, manifest, split))
        for rec in ds.map(lambda s: features.parse_example(s, k)):
            image = tf.io.decode_image(rec["encoded"], channels=3, expand_animations=False) if decode else None
            if decode and tuple(image.shape[:2]) != (int(rec["height"]), int(rec["width"])):
                raise DataError(f"{data_dir}: record {rec['id'].numpy().decode()} has image {image.shape[:2]} but "
                                f"height/width {int(rec['height'])}x{int(rec['width'])}")
            indices.append(int(rec["index"]))
            ids.append(rec["id"].numpy().decode())
            class_counts += rec["label"].numpy()
        if sorted(indices) != list(range(info["count"])):
            raise DataError(f"{data_dir}: split {split!r} indices are not 0..{info['count'] - 1}")
        table = read_csv(os.path.join(data_dir, f"{split}.csv"), dtype={"id": str, "group": str})
        if dict(zip(ids, indices)) != dict(zip(table["id"], table["index"])):
            raise DataError(f"{data_dir}: {split}.csv disagrees with the {split} shards")
        expected = [info["class_counts"][c] for c in manifest["class_names"]]
        if not np.array_equal(class_counts, expected):
            raise DataError(f"{data_dir}: split {split!r} class counts {class_counts.tolist()} != manifest {expected}")
        summary[split] = len(indices)
    log.info("verified %s: %s records%s", data_dir, summary, "" if decode else " (images not decoded)")
    return summary


# ----------------------------------------------------------------------------------------------------------------
# The conversion.
# ----------------------------------------------------------------------------------------------------------------
def convert(cfg: ConvertConfig) -> dict:
    """Runs the whole conversion; returns the manifest."""
    t0 = time.time()
    out_dir = cfg.output_dir or os.path.join("tfrecords", cfg.dataset)
    if cfg.num_shards < 1:
        raise DataError(f"--num_shards must be >= 1, got {cfg.num_shards}")
    if cfg.image_size < 0:
        raise DataError(f"--image_size must be >= 0, got {cfg.image_size}")
    if cfg.workers < 1:
        raise DataError(f"--workers must be >= 1, got {cfg.workers}")
    if cfg.max_image_pixels < 1:
        raise DataError(f"--max_image_pixels must be >= 1, got {cfg.max_image_pixels}")
    if os.path.realpath(out_dir) == os.path.realpath(cfg.source_dir):
        raise DataError(f"--output_dir={out_dir} is the --source_dir; choose another folder")
    csv_options = {}
    if cfg.dataset == "csv_folder":
        csv_options = dict(csv_path=cfg.csv_path, image_dir=cfg.image_dir, image_column=cfg.image_column,
                           label_column=cfg.label_column, group_column=cfg.group_column,
                           class_names=list(cfg.class_names) or None, task=cfg.task)
    source = load_source(cfg.dataset, cfg.source_dir, on_error=cfg.on_error,
                         allow_external_paths=cfg.allow_external_paths, **csv_options)
    for note in source.notes:
        log.info("%s", note)
    with OutputFolder(out_dir, cfg.overwrite) as folder:
        # One pool of spawned workers for both stages; they decode and encode images with PIL and never import TF.
        pool = multiprocessing.get_context("spawn").Pool(cfg.workers) if cfg.workers > 1 else None
        try:
            manifest = _convert(cfg, source, folder.work, pool)
        finally:
            if pool is not None:
                pool.terminate()
        verify_dataset(folder.work, decode=cfg.verify)  # before it replaces anything
        folder.commit()
    log.info("%s", summary_text(manifest, out_dir, time.time() - t0))
    return manifest


def _where(row, source: Source) -> str:
    """The row and its file (or where the file was looked for), for a message or the skipped list."""
    return f"{row.where or row.id} ({row.path or 'looked for ' + (row.expected or 'under ' + source.source_dir)})"


def _convert(cfg: ConvertConfig, source: Source, out_dir: str, pool) -> dict:
    rows = source.rows if (cfg.split == "official" or cfg.split_dir) else source.random_rows()
    log.info("%s: %d rows in the tables (%d skipped)", source.dataset, len(rows), len(source.skipped))
    skipped = list(source.skipped)
    # Decode every image once, in parallel, before anything is written.
    checked = list(_imap(validate_image, [(i, r.path, cfg.max_image_pixels) for i, r in enumerate(rows)], pool,
                         cfg.workers, "checked images"))
    problems = [(i, why) for i, why, _ in checked if why]
    if problems and cfg.on_error == "fail":
        lines = [f"{_where(rows[i], source)}: {why}" for i, why in problems[:5]]
        raise DataError(f"{len(problems)} bad image(s) (pass --on_error=skip to skip them):\n  " + "\n  ".join(lines))
    skipped += [(_where(rows[i], source), why) for i, why in problems]
    known = {r.id: meta for r, (_, why, meta) in zip(rows, checked) if not why}  # id -> (format, height, width)
    rows = [r for r in rows if r.id in known]
    if not rows:
        raise DataError(f"{source.source_dir}: every image was skipped")

    splits = assign_splits(source, rows, cfg)
    check_no_group_straddles(rows, splits)
    rng = np.random.default_rng(cfg.seed)
    manifest_splits, tasks, tables = {}, [], {}
    n_train = max(1, int(np.sum(splits == "train")))
    for split in features.SPLITS:
        members = [rows[i] for i in np.flatnonzero(splits == split)]
        if not members:
            continue
        members = [members[i] for i in rng.permutation(len(members))]  # mix classes across shards
        n_shards = min(len(members), max(1, round(cfg.num_shards * len(members) / n_train)))
        bounds = np.linspace(0, len(members), n_shards + 1).astype(int)
        for s in range(n_shards):
            chunk = [(j, members[j].id, members[j].path, members[j].label, members[j].group, known[members[j].id])
                     for j in range(bounds[s], bounds[s + 1])]
            tasks.append((features.shard_name(split, s, n_shards), chunk))
        counts = np.sum([r.label for r in members], axis=0)
        manifest_splits[split] = {"count": len(members), "groups": len({r.group for r in members}),
                                  "class_counts": {c: int(n) for c, n in zip(source.class_names, counts)},
                                  "shards": []}
        tables[split] = members

    for entry in _write_shards(tasks, out_dir, cfg.image_size, pool, cfg.workers, cfg.max_image_pixels):
        split = entry["file"].split("-", 1)[0]
        manifest_splits[split]["shards"].append(entry)
    for split, members in tables.items():  # the csv module's quoting: ids with commas or quotes survive
        atomic_write_csv(os.path.join(out_dir, f"{split}.csv"), pd.DataFrame({
            "id": [r.id for r in members], "index": range(len(members)), "group": [r.group for r in members],
            "labels": ["|".join(c for c, v in zip(source.class_names, r.label) if v) for r in members]}))
    if skipped:
        atomic_write_csv(os.path.join(out_dir, "skipped.csv"), pd.DataFrame(skipped, columns=["where", "why"]))

    manifest = {
        "format_version": features.FORMAT_VERSION,
        "dataset": source.dataset,
        "task": source.task,
        "class_names": source.class_names,
        "image_size": cfg.image_size,
        "seed": cfg.seed,
        "split": "split_dir" if cfg.split_dir else cfg.split,
        "source": {"dir": os.path.abspath(source.source_dir), "notes": source.notes,
                   "split_dir": os.path.abspath(cfg.split_dir) if cfg.split_dir else None},
        "skipped": len(skipped),
        "max_image_pixels": cfg.max_image_pixels,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "splits": manifest_splits,
    }
    atomic_write_json(os.path.join(out_dir, features.MANIFEST), manifest)  # last: now the folder is complete
    return manifest


def summary_text(manifest: dict, out_dir: str, seconds: float | None = None) -> str:
    """A human summary: written / skipped / per split / per class."""
    names = manifest["class_names"]
    width = max(len(n) for n in names + ["class"])
    splits = list(manifest["splits"])
    lines = [f"{manifest['dataset']} ({manifest['task']}) -> {out_dir}",
             f"written {sum(s['count'] for s in manifest['splits'].values())} records, skipped {manifest['skipped']}"
             + (f", in {seconds:.1f} s" if seconds is not None else ""),
             f"{'class':<{width}} " + " ".join(f"{s:>7}" for s in splits)]
    for c in names:
        lines.append(f"{c:<{width}} " + " ".join(f"{manifest['splits'][s]['class_counts'][c]:>7}" for s in splits))
    lines.append(f"{'images':<{width}} " + " ".join(f"{manifest['splits'][s]['count']:>7}" for s in splits))
    lines.append(f"{'groups':<{width}} " + " ".join(f"{manifest['splits'][s]['groups']:>7}" for s in splits))
    lines.append(f"{'shards':<{width}} " + " ".join(f"{len(manifest['splits'][s]['shards']):>7}" for s in splits))
    return "\n".join(lines)

