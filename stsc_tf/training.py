"""A whole training run: validate -> strategy -> the run folder -> data -> model -> fit (resumable) -> test metrics.

    python -m stsc_tf.train --flagfile=configs/demo.flags

The run folder's files and rules are in `stsc_tf/run_folder.py`, the callbacks in `stsc_tf/callbacks.py`, the test
metrics come from `stsc_tf/evaluation.py`; this module only orchestrates. Running the same command again after a
kill continues from the last finished epoch and ends with the weights an uninterrupted run would have (the data
stream is a function of (seed, epoch); the backup holds the weights, the teacher, the TSC memory, the optimizer and
the dropout layers' random state).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from stsc_tf import callbacks as callbacks_lib
from stsc_tf import evaluation, run_folder
from stsc_tf.config import RELATION_FEATURES, TAU_MODES, TSC_EDGES, Config, check_tsc_tau
from stsc_tf.data.batches import check_batch
from stsc_tf.data.pipeline import RecordSet, distribute_per_worker, eval_dataset, train_dataset
from stsc_tf.data.splits import labeled_subset
from stsc_tf.errors import ConfigError, DataError, STSCError
from stsc_tf.files import read_csv, remove_stale_temps, split_plus
from stsc_tf.models.backbones import resolve_backbone

log = logging.getLogger("stsc_tf.train")


class TrainingError(STSCError):
    """Training stopped on a non-finite term (named)."""


# ----------------------------------------------------------------------------------------------------------------
# Validation: every bad flag fails here, before any work, naming the flag.
# ----------------------------------------------------------------------------------------------------------------
def validate(cfg: Config, num_replicas: int = 1) -> RecordSet:
    d, m, l, t = cfg.data, cfg.model, cfg.loss, cfg.train
    if not d.data_dir:
        raise ConfigError("--data_dir is required (a folder written by python -m stsc_tf.convert)")
    if not t.model_dir:
        raise ConfigError("--model_dir is required (the run folder)")
    if not d.labeled_ids and not 0.0 < d.labeled_ratio <= 1.0:
        raise ConfigError(f"--labeled_ratio must be in (0, 1], got {d.labeled_ratio}")
    resolve_backbone(m.backbone)
    for flag, value, choices in (("relation_features", m.relation_features, RELATION_FEATURES),
                                 ("tsc_tau_mode", l.tsc_tau_mode, TAU_MODES), ("tsc_edges", l.tsc_edges, TSC_EDGES)):
        if value not in choices:  # (the CLI's enums refuse these already; a Config built in code may not)
            raise ConfigError(f"--{flag}={value!r}; choose one of {list(choices)}")
    for part in (d, m, l, t):
        for field in dataclasses.fields(part):
            value = getattr(part, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"--{field.name} must be a finite number, got {value}")
    check_tsc_tau(l.tsc_tau, l.tsc_tau_mode)
    for flag, value, low in (("steps_per_epoch", t.steps_per_epoch, 0), ("weight_decay", t.weight_decay, 0),
                             ("rotation_deg", d.rotation_deg, 0), ("translate", d.translate, 0),
                             ("shuffle_buffer", d.shuffle_buffer, 1), ("consistency_rampup", l.consistency_rampup, 0),
                             ("relation_every_epochs", t.relation_every_epochs, 0)):
        if value < low:
            raise ConfigError(f"--{flag} must be >= {low}, got {value}")
    if not 0.0 <= t.threshold <= 1.0:
        raise ConfigError(f"--threshold is a probability in [0, 1], got {t.threshold}")
    if t.lr_decay_rate <= 0 or (t.lr_decay == "step" and t.lr_decay_rate > 1):
        raise ConfigError(f"--lr_decay_rate must be > 0 (and <= 1 with --lr_decay=step), got {t.lr_decay_rate}")
    if d.image_size < 16:
        raise ConfigError(f"--image_size must be >= 16, got {d.image_size}")
    if t.epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {t.epochs}")
    for name in ("consistency", "beta", "gamma", "consistency_weight_c"):
        if getattr(l, name) < 0:
            raise ConfigError(f"--{name} must be >= 0 (0 removes the term), got {getattr(l, name)}")
    if not 0.0 <= t.ema_alpha < 1.0:
        raise ConfigError(f"--ema_alpha must be in [0, 1), got {t.ema_alpha}")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"--dropout must be in [0, 1), got {m.dropout}")
    if t.learning_rate <= 0 or t.adam_epsilon <= 0:
        raise ConfigError("--learning_rate and --adam_epsilon must be > 0")
    if t.init_from and not os.path.exists(t.init_from):
        raise ConfigError(f"--init_from={t.init_from!r}: no such run folder or weights file")
    check_batch(d.batch_size, d.labeled_per_batch, num_replicas)
    try:
        records = RecordSet.open(d.data_dir)
        records.check()  # every shard the run reads, by hash, before any work
    except DataError as e:
        raise ConfigError(f"--data_dir={d.data_dir!r}: {e}") from None
    if records.count("train") < d.batch_size:
        log.info("note: the train split (%d) is smaller than --batch_size (%d); samples repeat within a batch",
                 records.count("train"), d.batch_size)
    return records


def make_strategy(name: str) -> tf.distribute.Strategy:
    """'none' | 'auto' (MirroredStrategy when there are several GPUs) | 'mirrored' | 'multi_worker' (TF_CONFIG)."""
    if name == "none":
        return tf.distribute.get_strategy()
    if name == "auto":
        gpus = tf.config.list_logical_devices("GPU")
        return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise ConfigError("--strategy=multi_worker needs the TF_CONFIG environment variable (see README)")
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ConfigError(f"--strategy={name!r} is unknown; choose auto, none, mirrored or multi_worker")


def writer_dir(model_dir: str, strategy: tf.distribute.Strategy) -> tuple[str, bool]:
    """Where this process writes: the run folder for the chief (or a single process), else `<model_dir>/worker_<i>`.

    Under MultiWorkerMirroredStrategy every worker runs the same callbacks; only the chief's files are the run's.
    The others write to their own folder (TensorFlow's documented pattern), whose backups they resume from.
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return model_dir, True
    task_type, task_id = resolver.task_type, resolver.task_id
    chief = task_type == "chief" or (task_type == "worker" and task_id == 0 and
                                      "chief" not in resolver.cluster_spec().as_dict())
    return (model_dir, True) if chief else (os.path.join(model_dir, f"worker_{task_id}"), False)


def class_weights(labels: np.ndarray, dataset_size: int | None = None) -> list[float]:
    """SRC-MT's class weights, 10000 / class count, from the labels a user has (a count of 0 counts as 1).

    SRC-MT counts the classes over the whole dataset (labels a semi-supervised user does not have). Here the counts
    are the labeled subset's, scaled to `dataset_size` images (count x dataset_size / labeled): the proportions are
    the labeled subset's, the scale SRC-MT's, so the class-weighted consistency term (not normalised by the weights,
    as in SRC-MT) keeps SRC-MT's magnitude at any labeled ratio.
    """
    counts = labels.sum(0).astype(np.float64)  # [K]
    if dataset_size:
        counts = counts * dataset_size / max(len(labels), 1)
    return [10000.0 / max(float(c), 1.0) for c in counts]


# ----------------------------------------------------------------------------------------------------------------
# The labeled subset: by ratio, or from --labeled_ids files (the suggest -> label -> train loop).
# ----------------------------------------------------------------------------------------------------------------
def _parse_labels(text: str, where: str, class_names: list[str], multi_label: bool) -> np.ndarray:
    names = [n.strip() for n in str(text).split("|") if n.strip()]
    row = np.zeros(len(class_names), np.float32)
    if multi_label and len(names) == 1 and names[0].lower() in ("none", "no finding"):
        return row
    unknown = [n for n in names if n not in class_names]
    if unknown:
        raise ConfigError(f"{where}: unknown class name(s) {unknown}; known: {class_names}")
    if not multi_label and len(names) != 1:
        raise ConfigError(f"{where}: a single-label row needs exactly one class name, got {names}")
    row[[class_names.index(n) for n in names]] = 1.0
    return row


def labeled_selection(records: RecordSet, cfg: Config) -> tuple[np.ndarray, np.ndarray | None]:
    """(sorted labeled train indices, label table [N, K] when --labeled_ids gave labels, else None)."""
    table = records.table("train")
    labels = records.labels("train", table)
    if not cfg.data.labeled_ids:
        return labeled_subset(labels, cfg.data.labeled_ratio, cfg.data.seed), None
    index_of = dict(zip(table["id"], table["index"]))
    chosen: dict[str, int] = {}
    given = labels.copy()
    expert: dict[str, np.ndarray] = {}  # id -> the label a --labeled_ids file gave it
    for path in split_plus(cfg.data.labeled_ids):
        if not os.path.isfile(path):
            raise ConfigError(f"--labeled_ids: {path} not found")
        try:
            frame = read_csv(path, dtype=str)
        except (pd.errors.ParserError, UnicodeDecodeError) as e:
            raise ConfigError(f"--labeled_ids: {path} is not a readable CSV ({e})") from None
        if "id" not in frame:
            raise ConfigError(f"--labeled_ids: {path} has no 'id' column (columns: {list(frame.columns)})")
        for row_no, row in enumerate(frame.itertuples(index=False), start=2):
            image_id = getattr(row, "id")
            where = f"--labeled_ids: {path} row {row_no} ({image_id!r})"
            if image_id not in index_of:
                raise ConfigError(f"{where}: not an image of the train split of {records.data_dir}")
            i = int(index_of[image_id])
            text = getattr(row, "labels", "") if "labels" in frame else ""
            if str(text).strip():
                label = _parse_labels(text, where, records.class_names, records.task == "multi_label")
                if image_id in expert and not np.array_equal(expert[image_id], label):
                    raise ConfigError(f"{where}: labeled differently in an earlier row or file")
                expert[image_id] = given[i] = label
            chosen[image_id] = i
    if not chosen:
        raise ConfigError(f"--labeled_ids={cfg.data.labeled_ids!r} lists no image")
    return np.array(sorted(chosen.values()), dtype=np.int64), (given if expert else None)


# ----------------------------------------------------------------------------------------------------------------
# The run.
# ----------------------------------------------------------------------------------------------------------------
def _init_from(model, path: str) -> None:
    """Starts the student and teacher from a run folder's best checkpoint, or a student weights file."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, run_folder.CONFIG)):
            raise ConfigError(f"--init_from={path!r}: a folder without {run_folder.CONFIG}, so not a run folder; give "
                              "a run folder of python -m stsc_tf.train or a weights file")
        _, _, source = run_folder.load_run(path, "best")
        pairs = [(model.student, source.student), (model.teacher, source.teacher)]
        for target, origin in pairs:
            if [w.shape for w in target.weights] != [w.shape for w in origin.weights]:
                raise ConfigError(f"--init_from={path!r}: its network differs from this run's (--backbone, "
                                  "--image_size, --relation_features and the classes must match)")
            target.set_weights(origin.get_weights())
    else:
        run_folder.load_weights_checked(model.student, path)
        model.teacher.set_weights(model.student.get_weights())
    log.info("started from %s", path)


def run_training(cfg: Config, extra_callbacks=(), bootstrap: int = 200, allow_changes: tuple[str, ...] = ()) -> dict:
    """Trains (or resumes) a run and writes its folder; returns the test metrics."""
    t0 = time.time()
    keras.utils.set_random_seed(cfg.train.seed)
    strategy = make_strategy(cfg.train.strategy)
    records = validate(cfg, strategy.num_replicas_in_sync)
    model_dir, _ = writer_dir(cfg.train.model_dir, strategy)
    run_folder.check_writable(model_dir)
    with run_folder.RunLock(model_dir):
        backup = os.path.join(model_dir, run_folder.BACKUP)
        for folder, names in ((model_dir, run_folder.TRAINING_FILES), (backup, None)):
            for name in remove_stale_temps(folder, names):  # only what training writes: others may be writing
                log.info("removed %s, a partial file left by a killed run", os.path.join(folder, name))
        stored = run_folder.read_config(model_dir)
        if stored is not None:
            run_folder.check_same_run(stored, cfg, allow_changes)
            done = max([b["epoch"] for b in run_folder.read_backup_state(
                os.path.join(model_dir, run_folder.BACKUP)).get("backups", [])] or [0])
            if cfg.train.epochs < done:
                raise ConfigError(f"--epochs={cfg.train.epochs}: the run in {model_dir} has finished {done} epochs "
                                  f"already (its weights are those of epoch {done}); use a new --model_dir to train "
                                  "fewer")
            if run_folder.config_differences(stored, cfg):  # only allowed ones are left: the run records them
                run_folder.update_config(model_dir, cfg)
        return _train(cfg, records, strategy, model_dir, stored is not None, extra_callbacks, bootstrap, t0)


def _train(cfg: Config, records: RecordSet, strategy, model_dir: str, resuming: bool, extra_callbacks, bootstrap: int,
           t0: float) -> dict:
    fingerprint = run_folder.records_fingerprint(records.manifest)
    if resuming:  # first the records, by content (before their tables are read)
        run_folder.check_same_records(model_dir, records.data_dir, fingerprint)
    labeled_idx, label_table = labeled_selection(records, cfg)
    table = records.table("train")
    used = (label_table if label_table is not None else records.labels("train", table))[labeled_idx]  # [M, K]
    labeled = pd.DataFrame({"id": [table["id"][i] for i in labeled_idx], "index": labeled_idx,
                            "labels": ["|".join(records.class_names[k] for k in np.flatnonzero(row > 0.5))
                                       or ("none" if records.task == "multi_label" else "") for row in used]})
    num_train = records.count("train")
    steps = cfg.train.steps_per_epoch or math.ceil(len(labeled_idx) / cfg.data.labeled_per_batch)
    run_info = {"class_names": records.class_names, "task": records.task, "num_train": num_train,
                "steps_per_epoch": steps, "labeled": len(labeled_idx), "labeled_share": len(labeled_idx) / num_train,
                "replicas": strategy.num_replicas_in_sync, "data_dir": os.path.abspath(records.data_dir),
                "records_fingerprint": fingerprint}
    if cfg.loss.class_weighted_consistency or cfg.loss.class_weighted_supervised:
        # From the labels a user has: the labeled subset's (SRC-MT counts the whole dataset).
        dataset_size = sum(records.count(split) for split in ("train", "val", "test"))
        run_info["class_weights"] = class_weights(used, dataset_size)
    else:
        run_info["class_weights"] = None
    if resuming:
        run_folder.check_same_data(model_dir, run_info, labeled, by_ratio=not cfg.data.labeled_ids)
    if cfg.train.mixed_precision != "none":
        keras.mixed_precision.set_global_policy(cfg.train.mixed_precision)
    try:
        with records.reading():
            return _fit_and_test(cfg, records, strategy, model_dir, run_info, labeled, label_table, resuming,
                                 extra_callbacks, bootstrap, t0)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _without_ids(batch: dict) -> dict:
    """An evaluation batch without its string ids: a compiled step (--jit_compile) takes no string tensor."""
    return {k: v for k, v in batch.items() if k != "id"}


def _fit_and_test(cfg, records, strategy, model_dir, run_info, labeled, label_table, resuming, extra_callbacks,
                  bootstrap, t0) -> dict:
    labeled_idx = labeled["index"].to_numpy()
    steps = run_info["steps_per_epoch"]
    weights = run_info["class_weights"]
    with strategy.scope():
        model = run_folder.build_model(cfg, num_classes=records.num_classes,
                                       multi_label=records.task == "multi_label", num_train=run_info["num_train"],
                                       steps_per_epoch=steps, class_weights=weights)
        model.compile(optimizer=run_folder.make_optimizer(cfg, steps), jit_compile=cfg.train.jit_compile)
    backup_dir = os.path.join(model_dir, run_folder.BACKUP)
    start_epoch = run_folder.restore_backup(model, backup_dir) if resuming else 0
    if start_epoch == 0 and cfg.train.init_from:
        _init_from(model, cfg.train.init_from)
    if not resuming:  # only now: a flag that fails to build the model (weights, layer, init_from) leaves no run
        run_folder.write_run_files(model_dir, cfg, run_info, labeled)
    log.info("data: %d train (%d labeled, %.1f%%), %d val, %d test; %d steps/epoch; %d replica(s)%s",
             run_info["num_train"], len(labeled_idx), 100 * run_info["labeled_share"], records.count("val"),
             records.count("test"), steps, strategy.num_replicas_in_sync,
             f"; resuming after epoch {start_epoch}" if start_epoch else "")

    guard = callbacks_lib.NonFiniteGuard()
    has_val = records.count("val") > 0
    monitor = "val_auc" if has_val else "loss"
    callbacks = [
        guard,
        callbacks_lib.EpochLog(os.path.join(model_dir, run_folder.LOG), start_epoch),
        callbacks_lib.Checkpoints(model_dir, monitor, "max" if has_val else "min", guard),
        keras.callbacks.TensorBoard(os.path.join(model_dir, run_folder.TENSORBOARD), update_freq="batch",
                                    write_graph=False),
        callbacks_lib.StructureWatch(cfg.data.batch_size, cfg.loss.tsc_start_epoch),
        callbacks_lib.ProgressLog(),
        *extra_callbacks,
    ]
    val = eval_dataset(records, "val", cfg.data.image_size, cfg.data.batch_size) if has_val else None
    if cfg.train.relation_every_epochs > 0:  # relation heatmaps of a fixed batch (the paper's Fig. 3)
        split = "val" if has_val else "train"
        fixed = next(iter(eval_dataset(records, split, cfg.data.image_size, min(32, records.count(split)))))
        names = ["|".join(records.class_names[k] for k in np.flatnonzero(row > 0.5)) or "none"
                 for row in fixed["label"].numpy()]
        callbacks.insert(1, callbacks_lib.RelationMonitor(
            fixed["image"].numpy(), os.path.join(model_dir, run_folder.RELATIONS),
            os.path.join(model_dir, run_folder.TENSORBOARD, "relations"), cfg.train.relation_every_epochs,
            ids=[i.decode() for i in fixed["id"].numpy()], labels=names))
    callbacks.append(callbacks_lib.Backup(backup_dir, guard))  # last: an epoch is backed up after its other files
    if start_epoch < cfg.train.epochs:
        data = train_dataset(records, cfg.data, strategy.num_replicas_in_sync, cfg.train.steps_per_epoch,
                             start_epoch, cfg.train.epochs, labeled_indices=labeled_idx, label_table=label_table)
        train_input = data.dataset
        if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            train_input = distribute_per_worker(data.dataset, strategy)
        model.fit(train_input, epochs=cfg.train.epochs, initial_epoch=start_epoch, steps_per_epoch=steps,
                  validation_data=None if val is None else val.map(_without_ids), callbacks=callbacks, verbose=2)
    else:
        log.info("%s already finished %d epochs; writing its test metrics again", model_dir, start_epoch)
    if guard.message:
        raise TrainingError(guard.message)

    best = os.path.join(model_dir, run_folder.BEST)
    if os.path.isfile(best):
        run_folder.load_weights_checked(model, best)
    split = "test" if records.count("test") else "val"
    results, table = evaluation.test_metrics(model, records, split, cfg, model_dir, run_info["labeled_share"],
                                             bootstrap)
    log.info("test metrics (best checkpoint by %s):\n%s", monitor, table)
    log.info("run folder: %s (%.0f s)", os.path.abspath(model_dir), time.time() - t0)
    return results
