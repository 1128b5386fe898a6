"""A whole training run: validate -> strategy -> data -> model -> fit (resumable) -> test metrics.

    python -m stsc_tf.train --flagfile=configs/demo.flags

The run folder (`model_dir`):
    config.json            the full Config          run.json         what the data fixed (classes, N, steps)
    labeled_ids.csv        the labeled subset       log.csv          per-epoch terms, monitors, val metrics
    best.weights.h5        best val AUC             last.weights.h5  end of the last epoch
    backup/                Keras BackupAndRestore (epoch-end state: weights, teacher, TSC memory, optimizer)
    tensorboard/           every term and monitor per step, metrics per epoch, relation heatmaps
    relations/             R_s, R_t of a fixed val batch every N epochs (npz, PNG) and ||R_s - R_t|| per epoch
    metrics.json / metrics.md   test metrics of student and teacher (best checkpoint), Table-1 layout
Running the same command again after a kill continues from the last finished epoch and ends with the weights an
uninterrupted run would have (the data stream is a function of (seed, epoch)).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time

import keras
import numpy as np
import tensorflow as tf

from stsc_tf import metrics as metrics_lib
from stsc_tf.config import Config
from stsc_tf.data.pipeline import RecordSet, check_batch, distribute_per_worker, eval_dataset, train_dataset
from stsc_tf.errors import ConfigError, DataError, STSCError
from stsc_tf.models.backbones import BACKBONES
from stsc_tf.models.stsc import STSCModel
from stsc_tf.schedules import EpochDecay

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
    if not 0.0 < d.labeled_ratio <= 1.0:
        raise ConfigError(f"--labeled_ratio must be in (0, 1], got {d.labeled_ratio}")
    if m.backbone not in BACKBONES:
        raise ConfigError(f"--backbone={m.backbone!r} is unknown; choose one of {sorted(BACKBONES)}")
    if d.image_size < 16:
        raise ConfigError(f"--image_size must be >= 16, got {d.image_size}")
    if t.epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {t.epochs}")
    for name in ("consistency", "beta", "gamma", "consistency_weight_c"):
        if getattr(l, name) < 0:
            raise ConfigError(f"--{name} must be >= 0 (0 removes the term), got {getattr(l, name)}")
    if not 0.0 <= t.ema_alpha < 1.0:
        raise ConfigError(f"--ema_alpha must be in [0, 1), got {t.ema_alpha}")
    check_batch(d.batch_size, d.labeled_per_batch, num_replicas)
    try:
        records = RecordSet.open(d.data_dir)
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


def class_weights(labels: np.ndarray) -> list[float]:
    """SRC-MT's class weights: 10000 / class count (a count of 0 counts as 1)."""
    return [10000.0 / max(c, 1.0) for c in labels.sum(0)]


def build_model(cfg: Config, *, num_classes: int, multi_label: bool, num_train: int, steps_per_epoch: int,
                weights_by_class: list[float] | None) -> STSCModel:
    m, t = cfg.model, cfg.train
    return STSCModel(num_classes=num_classes, image_size=cfg.data.image_size, num_train=num_train,
                     multi_label=multi_label, backbone=m.backbone, weights=m.weights, dropout=m.dropout,
                     relation_layer=m.relation_layer, sync_bn=m.sync_bn, relation_features=m.relation_features,
                     loss=dataclasses.asdict(cfg.loss), steps_per_epoch=steps_per_epoch, ema_alpha=t.ema_alpha,
                     weight_decay=t.weight_decay, eval_with=t.eval_with, class_weights=weights_by_class)


def make_optimizer(cfg: Config, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """Adam with the per-epoch decay (one definition: a checkpoint's optimizer state must match it on reload)."""
    t = cfg.train
    return keras.optimizers.Adam(EpochDecay(t.learning_rate, steps_per_epoch, t.lr_decay_rate, t.lr_decay, t.epochs))


# ----------------------------------------------------------------------------------------------------------------
# Callbacks.
# ----------------------------------------------------------------------------------------------------------------
class NonFiniteGuard(keras.callbacks.Callback):
    """TerminateOnNaN that says which term went non-finite, and at which step."""

    def __init__(self):
        super().__init__()
        self.message = None

    def on_train_batch_end(self, batch, logs=None):
        bad = [k for k, v in (logs or {}).items() if not math.isfinite(float(v))]
        if bad:
            step = int(self.model.optimizer.iterations)
            self.message = (f"non-finite {', '.join(bad)} at step {step}; lower --learning_rate, check the data, or "
                            "set the weight of that term to 0")
            log.error("stopping: %s", self.message)
            self.model.stop_training = True


class ProgressLog(keras.callbacks.Callback):
    """One line per epoch with every term, monitor and val metric (plus Keras' own progress bar)."""

    def on_epoch_end(self, epoch, logs=None):
        text = " ".join(f"{k}={float(v):.4g}" for k, v in sorted((logs or {}).items()))
        log.info("epoch %d: %s", epoch + 1, text)


def _resume_epoch(backup_dir: str) -> int:
    path = os.path.join(backup_dir, "training_metadata.json")
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        return int(json.load(f)["epoch"])


# ----------------------------------------------------------------------------------------------------------------
# Predictions and test metrics.
# ----------------------------------------------------------------------------------------------------------------
def predict_split(network: keras.Model, records: RecordSet, split: str, image_size: int, batch_size: int,
                  multi_label: bool) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(ids, labels [N, K], probabilities [N, K]) of one network on a split, in the split's deterministic order."""
    from stsc_tf.losses import probabilities

    ids, ys, ps = [], [], []
    for batch in eval_dataset(records, split, image_size, batch_size):
        _, logits = network(batch["image"], training=False)
        ps.append(probabilities(logits, multi_label).numpy())
        ys.append(batch["label"].numpy())
        ids += [i.decode() for i in batch["id"].numpy()]
    return ids, np.concatenate(ys), np.concatenate(ps)


def evaluate_networks(model: STSCModel, records: RecordSet, split: str, cfg: Config, which=("student", "teacher"),
                      bootstrap: int = 200, on_predictions=None) -> dict:
    """Metrics of each network on a split; `on_predictions(name, labels, probabilities)` sees the raw predictions."""
    results = {}
    for name in which:
        network = model.student if name == "student" else model.teacher
        _, y, p = predict_split(network, records, split, cfg.data.image_size, cfg.data.batch_size, model.multi_label)
        results[name] = metrics_lib.evaluate_predictions(y, p, multi_label=model.multi_label,
                                                         threshold=cfg.train.threshold, bootstrap=bootstrap,
                                                         seed=cfg.train.seed)
        if on_predictions is not None:
            on_predictions(name, y, p)
    return results


def write_metrics(model_dir: str, split: str, results: dict, ratio: float, prefix: str = "metrics") -> str:
    with open(os.path.join(model_dir, f"{prefix}.json"), "w") as f:
        json.dump({"split": split, **results}, f, indent=2)
    table = metrics_lib.paper_table({f"STSC ({k})": v for k, v in results.items()}, ratio=ratio)
    with open(os.path.join(model_dir, f"{prefix}.md"), "w") as f:
        f.write(f"Paper-protocol metrics (%) on the {split} split; AUC is one-vs-rest, the rest at the per-class "
                "threshold.\n\n" + table + "\n")
    return table


# ----------------------------------------------------------------------------------------------------------------
# The run.
# ----------------------------------------------------------------------------------------------------------------
def run_training(cfg: Config, extra_callbacks=(), bootstrap: int = 200) -> dict:
    """Trains (or resumes) a run and writes its folder; returns the test metrics."""
    t0 = time.time()
    keras.utils.set_random_seed(cfg.train.seed)
    strategy = make_strategy(cfg.train.strategy)
    records = validate(cfg, strategy.num_replicas_in_sync)
    if cfg.train.mixed_precision != "none":
        keras.mixed_precision.set_global_policy(cfg.train.mixed_precision)
    model_dir, is_chief = writer_dir(cfg.train.model_dir, strategy)
    os.makedirs(model_dir, exist_ok=True)
    backup_dir = os.path.join(model_dir, "backup")
    start_epoch = _resume_epoch(backup_dir)
    if start_epoch >= cfg.train.epochs and os.path.isfile(os.path.join(model_dir, "metrics.json")):
        log.info("%s already finished %d epochs", model_dir, start_epoch)
    data = train_dataset(records, cfg.data, strategy.num_replicas_in_sync, cfg.train.steps_per_epoch, start_epoch,
                         cfg.train.epochs)
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        f.write(cfg.to_json())
    run_info = {"class_names": records.class_names, "task": records.task, "num_train": data.num_train,
                "steps_per_epoch": data.steps_per_epoch, "labeled": len(data.labeled_indices),
                "replicas": strategy.num_replicas_in_sync, "data_dir": os.path.abspath(records.data_dir)}
    with open(os.path.join(model_dir, "run.json"), "w") as f:
        json.dump(run_info, f, indent=2)
    with open(os.path.join(model_dir, "labeled_ids.csv"), "w") as f:
        f.write("id,index\n" + "".join(f"{i},{j}\n" for i, j in zip(data.labeled_ids, data.labeled_indices)))
    log.info("data: %d train (%d labeled), %d val, %d test; %d steps/epoch; %d replica(s)%s", data.num_train,
             len(data.labeled_indices), records.count("val"), records.count("test"), data.steps_per_epoch,
             strategy.num_replicas_in_sync, f"; resuming at epoch {start_epoch + 1}" if start_epoch else "")

    multi_label = records.task == "multi_label"
    weights = None
    if cfg.loss.class_weighted_consistency or cfg.loss.class_weighted_supervised:
        weights = class_weights(records.labels("train"))
    with strategy.scope():
        model = build_model(cfg, num_classes=records.num_classes, multi_label=multi_label, num_train=data.num_train,
                            steps_per_epoch=data.steps_per_epoch, weights_by_class=weights)
        model.compile(optimizer=make_optimizer(cfg, data.steps_per_epoch), jit_compile=cfg.train.jit_compile)

    guard = NonFiniteGuard()
    has_val = records.count("val") > 0
    monitor = "val_auc" if has_val else "loss"
    callbacks = [
        keras.callbacks.BackupAndRestore(backup_dir, save_freq="epoch", delete_checkpoint=False),
        guard,
        keras.callbacks.ModelCheckpoint(os.path.join(model_dir, "best.weights.h5"), monitor=monitor,
                                        mode="max" if has_val else "min", save_best_only=True,
                                        save_weights_only=True),
        keras.callbacks.ModelCheckpoint(os.path.join(model_dir, "last.weights.h5"), save_weights_only=True),
        keras.callbacks.CSVLogger(os.path.join(model_dir, "log.csv"), append=start_epoch > 0),
        keras.callbacks.TensorBoard(os.path.join(model_dir, "tensorboard"), update_freq="batch", write_graph=False),
        ProgressLog(),
        *extra_callbacks,
    ]
    val = eval_dataset(records, "val", cfg.data.image_size, cfg.data.batch_size) if has_val else None
    if cfg.train.relation_every_epochs > 0:  # relation heatmaps of a fixed batch (the paper's Fig. 3)
        from stsc_tf.explaining import RelationMonitor

        split = "val" if has_val else "train"
        fixed = next(iter(eval_dataset(records, split, cfg.data.image_size, min(32, records.count(split)))))
        callbacks.append(RelationMonitor(fixed["image"].numpy(), os.path.join(model_dir, "relations"),
                                         os.path.join(model_dir, "tensorboard", "relations"),
                                         cfg.train.relation_every_epochs))
    train_input = data.dataset
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        train_input = distribute_per_worker(data.dataset, strategy)
    if start_epoch < cfg.train.epochs:
        model.fit(train_input, epochs=cfg.train.epochs, steps_per_epoch=data.steps_per_epoch, validation_data=val,
                  callbacks=callbacks, verbose=2)
    if guard.message:
        raise TrainingError(guard.message)

    best = os.path.join(model_dir, "best.weights.h5")
    if os.path.isfile(best):
        model.load_weights(best)
    split = "test" if records.count("test") else "val"
    results = evaluate_networks(model, records, split, cfg, bootstrap=bootstrap)
    table = write_metrics(model_dir, split, results, cfg.data.labeled_ratio)
    log.info("test metrics (best checkpoint by %s):\n%s", monitor, table)
    log.info("run folder: %s (%.0f s)", os.path.abspath(model_dir), time.time() - t0)
    if cfg.train.mixed_precision != "none":
        keras.mixed_precision.set_global_policy("float32")
    return results


def load_run(model_dir: str, checkpoint: str = "best") -> tuple[Config, dict, STSCModel]:
    """Rebuilds a finished (or running) run's model from its folder and loads a checkpoint ('best' | 'last')."""
    for name in ("config.json", "run.json"):
        if not os.path.isfile(os.path.join(model_dir, name)):
            raise ConfigError(f"--model_dir={model_dir!r}: no {name}; is it a run folder of python -m stsc_tf.train?")
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = Config.from_dict(json.load(f))
    with open(os.path.join(model_dir, "run.json")) as f:
        run = json.load(f)
    weights_path = os.path.join(model_dir, f"{checkpoint}.weights.h5")
    if not os.path.isfile(weights_path):
        raise ConfigError(f"--model_dir={model_dir!r}: no {checkpoint}.weights.h5")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, weights="none"))
    model = build_model(cfg, num_classes=len(run["class_names"]), multi_label=run["task"] == "multi_label",
                        num_train=run["num_train"], steps_per_epoch=run["steps_per_epoch"], weights_by_class=None)
    model.compile(optimizer=make_optimizer(cfg, run["steps_per_epoch"]))
    model.load_weights(weights_path)
    return cfg, run, model


