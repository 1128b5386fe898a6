"""The training callbacks of a run: the non-finite guard, the epoch log, checkpoints, backups, relation heatmaps,
the TSC structure watch, and the progress line.

Order matters and `training.py` keeps it: the guard first (it decides whether an epoch may be saved), the backup
last (it declares an epoch finished only after that epoch's other files are written), so a kill at any point leaves
a folder that resumes consistently.
"""

from __future__ import annotations

import json
import logging
import math
import os

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from stsc_tf import explaining, run_folder
from stsc_tf.files import atomic_write_csv, atomic_write_json, read_csv

log = logging.getLogger("stsc_tf.train")


def _finite_logs(logs: dict | None) -> list[str]:
    """The names of non-finite values in a logs dict."""
    return [k for k, v in (logs or {}).items() if not math.isfinite(float(np.asarray(v).reshape(-1)[0]))]


def finite_weights(model: keras.Model) -> bool:
    """True when every float weight of the model and its optimizer is finite."""
    variables = list(model.weights) + list(getattr(model.optimizer, "variables", []) or [])
    checks = [tf.reduce_all(tf.math.is_finite(v)) for v in variables if v.dtype in ("float16", "bfloat16",
                                                                                      "float32", "float64")]
    return bool(tf.reduce_all(checks)) if checks else True


class NonFiniteGuard(keras.callbacks.Callback):
    """Stops training at the first non-finite term (naming it and the step), non-finite validation predictions, or
    non-finite weights at an epoch's end. Checkpoints and backups read `message`: an epoch it flags is never saved.
    """

    def __init__(self):
        super().__init__()
        self.message = None

    def _stop(self, message: str) -> None:
        if self.message is None:
            self.message = message
            log.error("stopping: %s", message)
        self.model.stop_training = True

    def on_train_batch_end(self, batch, logs=None):
        bad = _finite_logs(logs)
        if bad:
            step = int(self.model.optimizer.iterations.numpy())
            self._stop(f"non-finite {', '.join(bad)} at step {step}; nothing from this epoch was saved. Lower "
                       "--learning_rate, check the data, or set that term's weight to 0 (in a new --model_dir; "
                       "--init_from=<this run folder> starts from its best checkpoint)")

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if logs.get("val_nonfinite", 0) > 0:
            self._stop(f"non-finite validation predictions after epoch {epoch + 1} ({int(logs['val_nonfinite'])} "
                       "values); nothing from this epoch was saved. Lower --learning_rate or check the data")
        elif _finite_logs(logs):
            self._stop(f"non-finite {', '.join(_finite_logs(logs))} in epoch {epoch + 1}; nothing from this epoch "
                       "was saved")
        elif not finite_weights(self.model):
            self._stop(f"non-finite weights after epoch {epoch + 1} (the updates overflowed); nothing from this "
                       "epoch was saved. Lower --learning_rate")


class EpochLog(keras.callbacks.Callback):
    """log.csv: one row per finished epoch (every term, monitor and val metric), rewritten whole each epoch.

    On a resume the rows of epochs that are run again are dropped first, so a kill between the log and the backup
    never leaves an epoch twice.
    """

    def __init__(self, path: str, start_epoch: int):
        super().__init__()
        self.path = path
        rows = read_csv(path) if start_epoch > 0 and os.path.isfile(path) else pd.DataFrame()
        self.rows = rows[rows["epoch"] <= start_epoch] if "epoch" in rows else pd.DataFrame()

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": epoch + 1, **{k: float(np.asarray(v).reshape(-1)[0]) for k, v in (logs or {}).items()}}
        self.rows = pd.concat([self.rows[self.rows["epoch"] != epoch + 1] if "epoch" in self.rows else self.rows,
                               pd.DataFrame([row])], ignore_index=True)
        atomic_write_csv(self.path, self.rows)


class Checkpoints(keras.callbacks.Callback):
    """last.weights.h5 after every finished epoch; best.weights.h5 (+ best.json) when `monitor` improves.

    Both are written atomically, never from an epoch the guard flagged (non-finite terms, weights or validation
    predictions); a non-finite or missing monitor value never makes a checkpoint "best". The best value so far is
    read back from best.json on a resume, so a resumed run keeps comparing against it.
    """

    def __init__(self, model_dir: str, monitor: str, mode: str, guard: NonFiniteGuard):
        super().__init__()
        self.model_dir, self.monitor, self.mode, self.guard = model_dir, monitor, mode, guard
        self.best = -math.inf if mode == "max" else math.inf
        info = os.path.join(model_dir, run_folder.BEST_INFO)
        if os.path.isfile(info) and os.path.isfile(os.path.join(model_dir, run_folder.BEST)):
            try:
                with open(info, encoding="utf-8") as f:
                    stored = json.load(f)
            except (OSError, ValueError) as e:  # damaged: the next improvement of the monitor rewrites it
                log.warning("%s is damaged (%s); the best value so far is forgotten", info, e)
                stored = {}
            if stored.get("monitor") == monitor and isinstance(stored.get("value"), (int, float)):
                self.best = float(stored["value"])

    def _better(self, value: float) -> bool:
        return value > self.best if self.mode == "max" else value < self.best

    def on_epoch_end(self, epoch, logs=None):
        if self.guard.message:
            return
        run_folder.atomic_save_weights(self.model, os.path.join(self.model_dir, run_folder.LAST))
        value = (logs or {}).get(self.monitor)
        if value is None or not math.isfinite(float(value)) or not self._better(float(value)):
            return
        self.best = float(value)
        run_folder.atomic_save_weights(self.model, os.path.join(self.model_dir, run_folder.BEST))
        atomic_write_json(os.path.join(self.model_dir, run_folder.BEST_INFO),
                          {"epoch": epoch + 1, "monitor": self.monitor, "value": self.best})


class Backup(keras.callbacks.Callback):
    """The resumable state after each finished epoch (`run_folder.write_backup`), unless the guard flagged it."""

    def __init__(self, backup_dir: str, guard: NonFiniteGuard):
        super().__init__()
        self.backup_dir, self.guard = backup_dir, guard

    def on_epoch_end(self, epoch, logs=None):
        if self.guard.message:
            log.warning("epoch %d is not backed up: %s", epoch + 1, self.guard.message.split(";")[0])
            return
        run_folder.write_backup(self.model, self.backup_dir, epoch + 1,
                                {"iterations": int(self.model.optimizer.iterations.numpy())})


class ProgressLog(keras.callbacks.Callback):
    """One line per epoch with every term, monitor and val metric (plus Keras' own progress output)."""

    def on_epoch_end(self, epoch, logs=None):
        text = " ".join(f"{k}={float(np.asarray(v).reshape(-1)[0]):.4g}" for k, v in sorted((logs or {}).items()))
        log.info("epoch %d: %s", epoch + 1, text)


class RelationMonitor(keras.callbacks.Callback):
    """Every `every` epochs (and after the first), records the relations of a fixed batch
    (`explaining.record_relations`).

    The batch's ids, label names and thumbnails are saved once beside the matrices, for `explain substructures`.
    """

    def __init__(self, images: np.ndarray, folder: str, log_dir: str | None = None, every: int = 5,
                 ids: list[str] | None = None, labels: list[str] | None = None):
        super().__init__()
        self.images, self.folder, self.every = images, folder, max(1, int(every))
        self.ids, self.labels = ids, labels
        self.writer = tf.summary.create_file_writer(log_dir) if log_dir else None

    def on_train_begin(self, logs=None):
        if self.ids is not None:
            explaining.save_batch(self.folder, self.images, self.ids, self.labels)

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0 or (epoch + 1) % self.every == 0:
            d = explaining.record_relations(self.model, self.images, epoch + 1, self.folder, self.writer)
            if logs is not None:
                logs["relation_distance"] = d


class StructureWatch(keras.callbacks.Callback):
    """Warns once when one stable sub-structure holds most of the batch for `patience` epochs in a row.

    Then L_tc acts on (nearly) the whole batch, not on sub-structures: the warning names the flags to change.
    """

    def __init__(self, global_batch: int, tsc_start_epoch: float, share: float = 0.5, patience: int = 3):
        super().__init__()
        self.global_batch, self.start, self.share, self.patience = global_batch, tsc_start_epoch, share, patience
        self.streak, self.warned = 0, False

    def on_epoch_end(self, epoch, logs=None):
        largest = (logs or {}).get("tsc_largest_component")
        if largest is None or epoch + 1 <= self.start:
            return
        self.streak = self.streak + 1 if float(largest) > self.share * self.global_batch else 0
        if self.streak >= self.patience and not self.warned:
            self.warned = True
            log.warning("TSC: for %d epochs one stable sub-structure has held %.0f of the %d samples of a batch; "
                        "L_tc then acts on nearly the whole batch. Raise --tsc_tau (or change --tsc_tau_mode) so the "
                        "stable graph splits into sub-structures; `python -m stsc_tf.explain substructures` shows "
                        "them", self.streak, float(largest), self.global_batch)
