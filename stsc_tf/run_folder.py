"""The run folder: its files, who may write it, how they are written, and how a run is rebuilt from it.

    config.json        the full Config (what defines the run)     run.json        what the data fixed (classes, N, ...)
    labeled_ids.csv    the labeled subset (id, index, labels)     log.csv         per-epoch terms, monitors, val metrics
    best.weights.h5    best val AUC (+ best.json: epoch, value)    last.weights.h5 end of the last finished epoch
    backup/            the resumable state of the last two finished epochs (+ state.json, written last)
    tensorboard/       every term and monitor per step            relations/      relation matrices of a val batch
    metrics.json/.md   test metrics (paper protocol, and validated thresholds when fitted)
    calibration.json   per-class thresholds and the calibration fitted on the validation split (evaluate)
    .lock              held (flock) by the one process that trains in this folder

Rules (BUILD.md, "Reliability"): a folder belongs to one run — a rerun with the same run-defining settings resumes,
anything else is refused with the differing flags listed before a file is touched; one training process at a time
(an OS lock, released by the kernel when its process dies, so a killed run never leaves it stuck); every file a later
step reads is written to a temporary name in the same folder and renamed (atomic on POSIX), so a kill leaves the old
file or the new one, never a part; a backup is written last, after the epoch's other files, and points to them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import gc
import hashlib
import json
import logging
import os
import re
import socket
import sys
import tempfile

import keras
import numpy as np
import pandas as pd

from stsc_tf.config import HARMLESS, Config
from stsc_tf.data.pipeline import RecordSet
from stsc_tf.errors import ConfigError, DataError
from stsc_tf.files import (atomic_path, atomic_write_csv, atomic_write_json, atomic_write_text, read_csv, sha256,
                           split_plus, try_lock)
from stsc_tf.models.optimizers import FusedAdam
from stsc_tf.models.stsc import STSCModel
from stsc_tf.schedules import EpochDecay

log = logging.getLogger("stsc_tf.train")

CONFIG = "config.json"
RUN = "run.json"
LABELED = "labeled_ids.csv"
LOG = "log.csv"
BEST = "best.weights.h5"
BEST_INFO = "best.json"
LAST = "last.weights.h5"
BACKUP = "backup"
BACKUP_STATE = "state.json"
CALIBRATION = "calibration.json"
TENSORBOARD = "tensorboard"
RELATIONS = "relations"
LOCK = ".lock"
OUTPUTS = "outputs.json"  # what predict / suggest / explain wrote outside the run folder: path -> SHA-256
# The files only a training process writes (under the lock): its partial files may be removed at its start.
TRAINING_FILES = (CONFIG, RUN, LABELED, LOG, BEST, BEST_INFO, LAST)

# Not compared: where the folder is (it may be moved), and data_dir (compared by the records' content instead).
IGNORED = {"train.model_dir", "data.data_dir"}


def atomic_save_weights(model: keras.Model, path: str) -> None:
    """model.save_weights to `path` (a *.weights.h5 name), whole or not at all.

    A failed write (a full disk, most often) raises one OSError naming `path`; h5py's own complaints while it
    lets go of the half-written file are not printed (they say the same thing dozens of times)."""
    with atomic_path(path, suffix=".weights.h5") as tmp, _held_stderr() as held:
        failed = None
        try:
            model.save_weights(tmp)
        except OSError as e:
            failed = e.errno or errno.EIO
        except RuntimeError as e:  # h5py reports a failed write as RuntimeError("... errno = N, ...")
            found = re.search(r"errno = (\d+)", str(e))
            if found is None:
                raise
            failed = int(found.group(1))
        if failed is not None:  # (out of the except: its traceback no longer holds h5py's objects)
            gc.collect()  # closes what h5py still holds of the temporary, while its complaints are held back
            held.discard()
            raise OSError(failed, f"could not write the weights ({os.strerror(failed)}); the previous file is kept",
                          path)


class _held_stderr(contextlib.AbstractContextManager):
    """Holds back what is written to the process's stderr (h5py's C-level tracebacks bypass Python's hooks) and
    lets it through at the end, unless discard() was called."""

    def __enter__(self):
        sys.stderr.flush()
        self._file = tempfile.TemporaryFile()
        self._saved = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        self._keep = True
        return self

    def discard(self) -> None:
        self._keep = False

    def __exit__(self, *exc):
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        if self._keep:
            self._file.seek(0)
            text = self._file.read()
            if text:
                sys.stderr.write(text.decode(errors="replace"))
        self._file.close()
        return False


# ----------------------------------------------------------------------------------------------------------------
# Ownership: writability, the lock, and "one folder, one run".
# ----------------------------------------------------------------------------------------------------------------
def check_writable(model_dir: str, flag: str = "--model_dir", create: bool = True) -> None:
    """Creates `model_dir` if needed (and allowed); raises ConfigError naming the flag if it cannot be written."""
    if not create and not os.path.isdir(model_dir):
        raise ConfigError(f"{flag}={model_dir!r}: no such folder")
    try:
        os.makedirs(model_dir, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_test.", dir=model_dir)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"{flag}={model_dir!r} cannot be written ({e.strerror or e})") from None


def _inside(model_dir: str, path: str) -> bool:
    folder = os.path.realpath(model_dir)
    where = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    return where == folder or where.startswith(folder + os.sep)


def _outputs(model_dir: str) -> dict:
    try:
        with open(os.path.join(model_dir, OUTPUTS), encoding="utf-8") as f:
            entries = json.load(f)
        return entries if isinstance(entries, dict) else {}
    except (OSError, ValueError):
        return {}


def check_replaceable_output(model_dir: str, path: str, flag: str = "--out") -> None:
    """An after-training command replaces a file only when it is new, lies in the run folder (the package's), or is
    an earlier output of this same run that nobody changed since (outputs.json holds its SHA-256). Never a
    user's file, another run's output, or a list an expert has started to edit."""
    if os.path.isdir(path):
        raise ConfigError(f"{flag}: {path!r} is a folder; a file would replace it")
    if not os.path.lexists(path) or _inside(model_dir, path):
        return
    known = _outputs(model_dir).get(os.path.realpath(path))
    if known is None or not os.path.isfile(path) or sha256(path) != known:
        raise ConfigError(f"{flag}: {path!r} exists and is not an unchanged output of this run ({model_dir}); it is "
                          "not replaced: choose another --out, or move the file away")


def record_outputs(model_dir: str, paths) -> None:
    """Remembers files written outside the run folder, so the same run's next call may replace them (and only
    them, unchanged). A read-only run folder records nothing: a rerun then needs another --out."""
    entries = _outputs(model_dir)
    changed = False
    for path in paths:
        if os.path.isfile(path) and not _inside(model_dir, path):
            entries[os.path.realpath(path)] = sha256(path)
            changed = True
    if changed:
        try:
            atomic_write_json(os.path.join(model_dir, OUTPUTS), entries)
        except OSError as e:
            log.warning("could not record the outputs in %s (%s): a rerun will not replace them", model_dir, e)


class RunLock:
    """An exclusive flock on `<model_dir>/.lock`, held while this process trains there.

    The kernel releases it when the process exits or is killed, so it never outlives its owner; the file records
    who holds it, for the refusal message.
    """

    def __init__(self, model_dir: str):
        self.path = os.path.join(model_dir, LOCK)
        self._file = None

    def acquire(self) -> "RunLock":
        f = open(self.path, "a+")
        if not try_lock(f, fcntl.LOCK_EX):
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise ConfigError(f"--model_dir={os.path.dirname(self.path)!r} is in use by {holder}; wait for it to "
                              "finish (or stop it), or choose another --model_dir")
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                f"{datetime.datetime.now().isoformat(timespec='seconds')} ({' '.join(sys.argv[:1])})\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # releases the flock
            self._file = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def _read_json(path: str, remedy: str):
    """A JSON file of the run folder, or None when it does not exist; ConfigError naming a damaged one."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); {remedy}") from None


def read_config(model_dir: str) -> Config | None:
    """The stored Config, or None when the folder holds none. Raises ConfigError naming a bad file."""
    path = os.path.join(model_dir, CONFIG)
    stored = _read_json(path, "it is not a run folder of this package, or was damaged by hand")
    return None if stored is None else Config.from_dict(stored, source=path)


PATHS = ("train.init_from", "data.labeled_ids", "model.weights")  # compared as resolved paths ('+'-separated)


def _same_path(value):
    if not isinstance(value, str) or not value or value in ("imagenet", "none"):
        return value
    return "+".join(os.path.realpath(part) for part in split_plus(value))


def config_differences(stored: Config, new: Config) -> dict[str, tuple]:
    """{'section.field': (stored value, new value)} over the run-defining settings (not IGNORED ones); paths are
    compared resolved (a trailing '/' or './' is the same file)."""
    a, b = _flat(stored.to_dict()), _flat(new.to_dict())
    for key in PATHS:
        a[key], b[key] = _same_path(a.get(key)), _same_path(b.get(key))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if k not in IGNORED and a.get(k) != b.get(k)}


def check_same_run(stored: Config, new: Config, allow: tuple[str, ...] = ()) -> None:
    """Refuses a resume whose settings differ from the stored run's, listing the flags; `allow` names harmless ones."""
    allowable = [h.split(".", 1)[1] for h in HARMLESS]
    allow = tuple(a.strip() for a in allow if a.strip())  # 'epochs,' is 'epochs'
    unknown = [a for a in allow if a not in allowable]
    if unknown:
        raise ConfigError(f"--allow_changes={','.join(allow)}: {', '.join('--' + u for u in unknown)} may not "
                          f"change on a resume; only {', '.join('--' + a for a in allowable)} may")
    diffs = config_differences(stored, new)
    allowed = {f"{section}.{name}" for section in ("data", "model", "loss", "train") for name in allow}
    blocked = {k: v for k, v in diffs.items() if not (k in HARMLESS and k in allowed)}
    if new.train.lr_decay == "poly" and "train.epochs" in diffs:
        blocked["train.epochs"] = diffs["train.epochs"]
    if not blocked:
        for k, (old, now) in diffs.items():
            log.info("resuming with --%s changed from %r to %r (allowed)", k.split(".", 1)[1], old, now)
        return
    shown = {}  # one entry per flag (data.seed and train.seed are one --seed)
    for k, (old, now) in blocked.items():
        shown.setdefault(k.split(".", 1)[1], (old, now))
    listed = ", ".join(f"--{flag} (stored {old!r}, now {now!r})" for flag, (old, now) in shown.items())
    harmless = sorted(k.split(".", 1)[1] for k in blocked if k in HARMLESS and not (
        k == "train.epochs" and new.train.lr_decay == "poly"))
    hint = (f"; the harmless one(s) may change on a resume with --allow_changes={','.join(harmless)}"
            if harmless and len(harmless) == len(blocked) else
            "; a run folder belongs to one run: use a new --model_dir, or rerun with the stored settings "
            "(config.json)")
    raise ConfigError(f"--model_dir={new.train.model_dir!r} holds a run with other settings: {listed}{hint}")


def records_fingerprint(manifest: dict) -> str:
    """What identifies a conversion's content (the shards' hashes and the classes), whatever its folder is called."""
    keyed = {"class_names": manifest["class_names"], "task": manifest["task"],
             "shards": sorted(s["sha256"] for split in manifest["splits"].values() for s in split["shards"])}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()


def read_run_info(model_dir: str) -> dict:
    info = _read_json(os.path.join(model_dir, RUN), "the run folder is damaged")
    if info is None:
        raise ConfigError(f"--model_dir={model_dir!r}: no {RUN}; is it a run folder of python -m stsc_tf.train?")
    return info


def check_same_records(model_dir: str, data_dir: str, fingerprint: str) -> None:
    """On a resume: the records must be the run's, by content (their folder may have moved)."""
    stored = read_run_info(model_dir)
    if stored.get("records_fingerprint") and stored["records_fingerprint"] != fingerprint:
        raise ConfigError(f"--data_dir={data_dir!r} holds other records than the run in {model_dir} was trained on "
                          f"({stored.get('data_dir')}); use the same conversion, or a new --model_dir")


def read_labeled(model_dir: str) -> pd.DataFrame | None:
    """The run's labeled_ids.csv (columns id, labels; ids as text), None when absent; a damaged file is named."""
    path = os.path.join(model_dir, LABELED)
    if not os.path.isfile(path):
        return None
    try:
        table = read_csv(path, dtype=str)
    except (ValueError, UnicodeDecodeError) as e:  # pandas' ParserError and EmptyDataError are ValueErrors
        raise ConfigError(f"{path} is damaged ({str(e).splitlines()[0][:120]}); it records the run's labeled "
                          "images: restore it, or use a new --model_dir") from None
    if "id" not in table:
        raise ConfigError(f"{path} is damaged (no 'id' column; columns {list(table.columns)[:5]}): restore it, or use "
                          "a new --model_dir")
    return table


def check_same_data(model_dir: str, run_info: dict, labeled: pd.DataFrame, by_ratio: bool) -> None:
    """On a resume: the classes, the train split, the labeled subset and its labels must be the run's.

    A missing labeled_ids.csv is written again when the subset comes from --labeled_ratio (a function of the seed
    and of the records, both verified); from --labeled_ids files it cannot be checked, and the resume is refused.
    A run whose records moved (same content) gets the new folder in run.json, for evaluate, suggest and explain.
    """
    stored = read_run_info(model_dir)
    for key in ("class_names", "task", "num_train"):
        if stored.get(key) != run_info[key]:
            raise ConfigError(f"--data_dir: {key} is {run_info[key]!r}, the run in {model_dir} has {stored.get(key)!r}")
    path = os.path.join(model_dir, LABELED)
    before = read_labeled(model_dir)
    if before is None:
        if not by_ratio:
            raise ConfigError(f"{path} is missing, so the labels of this --labeled_ids run cannot be checked: restore "
                              "it, or use a new --model_dir")
        log.warning("%s was missing; written again from --labeled_ratio and --seed", path)
        atomic_write_csv(path, labeled)
    elif list(before["id"]) != list(labeled["id"]):
        raise ConfigError(f"the labeled subset differs from {path} (other records or --labeled_ids); use a new "
                          "--model_dir")
    elif "labels" in before and list(before["labels"]) != list(labeled["labels"]):
        changed = [i for i, a, b in zip(before["id"], before["labels"], labeled["labels"]) if a != b]
        raise ConfigError(f"the labels of {len(changed)} labeled image(s) differ from {path} (first: {changed[0]!r}; "
                          "a --labeled_ids file changed); the run was trained with those in the file: use a new "
                          "--model_dir")
    if stored.get("data_dir") != run_info["data_dir"]:
        atomic_write_json(os.path.join(model_dir, RUN), {**stored, "data_dir": run_info["data_dir"]})
        log.info("the records moved: %s now names %s", RUN, run_info["data_dir"])


def check_records(records: RecordSet, run: dict, flag: str = "--data_dir") -> None:
    """Refuses records whose classes (by name, in order) or task differ from the run's."""
    if records.class_names != list(run["class_names"]) or records.task != run["task"]:
        raise ConfigError(f"{flag}={records.data_dir!r} holds {records.task} records with classes "
                          f"{records.class_names}; the run was trained on {run['task']} classes {run['class_names']}")


def run_records(model_dir: str, run: dict, data_dir: str = "") -> RecordSet:
    """The run's records: at `data_dir` when given (they must be the run's by content), else where run.json says."""
    where = data_dir or run["data_dir"]
    if not data_dir and not os.path.isfile(os.path.join(where, "manifest.json")):
        raise ConfigError(f"the run's records are no longer in {where} (run.json); pass --data_dir=<where they are "
                          "now>")
    try:
        records = RecordSet.open(where)
    except DataError as e:
        raise ConfigError(f"--data_dir: {e}") from None
    check_records(records, run, "--data_dir" if data_dir else "the run's data_dir")  # the plainer reason first
    if run.get("records_fingerprint") and records_fingerprint(records.manifest) != run["records_fingerprint"]:
        flag = f"--data_dir={data_dir!r}" if data_dir else f"{where} (run.json's data_dir)"
        raise ConfigError(f"{flag} holds other records than the run in {model_dir} was trained on (converted again "
                          "since?); give the run's conversion (wherever it is now), or train a new run on these")
    return records


def update_config(model_dir: str, cfg: Config) -> None:
    """Records the allowed (harmless) changes of a resumed run in its config.json."""
    atomic_write_text(os.path.join(model_dir, CONFIG), cfg.to_json() + "\n")


def write_run_files(model_dir: str, cfg: Config, run_info: dict, labeled: pd.DataFrame) -> None:
    """config.json, run.json and labeled_ids.csv of a new run, each atomically (config.json last: it marks a run)."""
    atomic_write_json(os.path.join(model_dir, RUN), run_info)
    atomic_write_csv(os.path.join(model_dir, LABELED), labeled)
    atomic_write_text(os.path.join(model_dir, CONFIG), cfg.to_json() + "\n")


# ----------------------------------------------------------------------------------------------------------------
# The model of a run.
# ----------------------------------------------------------------------------------------------------------------
def build_model(cfg: Config, *, num_classes: int, multi_label: bool, num_train: int, steps_per_epoch: int,
                class_weights: list[float] | None) -> STSCModel:
    """The run's STSCModel, from its Config (not compiled)."""
    m, t = cfg.model, cfg.train
    return STSCModel.from_backbone(
        m.backbone, num_classes=num_classes, image_size=cfg.data.image_size, weights=m.weights, dropout=m.dropout,
        relation_layer=m.relation_layer, relation_features=m.relation_features, sync_bn=m.sync_bn,
        fused_bn=m.fused_bn, num_train=num_train, multi_label=multi_label, loss_config=cfg.loss,
        steps_per_epoch=steps_per_epoch, ema_alpha=t.ema_alpha, weight_decay=t.weight_decay, eval_with=t.eval_with,
        class_weights=class_weights)


def make_optimizer(cfg: Config, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """Adam (its fused kernel) with the per-epoch decay (one definition: a checkpoint's optimizer state must match it
    on reload)."""
    t = cfg.train
    return FusedAdam(EpochDecay(t.learning_rate, steps_per_epoch, t.lr_decay_rate, t.lr_decay, t.epochs),
                     epsilon=t.adam_epsilon)


def load_weights_checked(model: keras.Model, path: str) -> None:
    """model.load_weights, with a damaged or foreign file reported by name (DataError)."""
    try:
        model.load_weights(path)
    except Exception as e:  # h5py raises OSError for a truncated file, Keras ValueError for another model's
        raise DataError(f"{path} cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0][:200]}); it is "
                        "truncated, damaged, or from another model") from None


def load_run(model_dir: str, checkpoint: str = "best") -> tuple[Config, dict, STSCModel]:
    """Rebuilds a run's model from its folder and loads a checkpoint ('best' | 'last')."""
    cfg = read_config(model_dir)
    if cfg is None:
        raise ConfigError(f"--model_dir={model_dir!r}: no {CONFIG}; is it a run folder of python -m stsc_tf.train?")
    run = read_run_info(model_dir)
    weights_path = checkpoint_path(model_dir, checkpoint)
    if not os.path.isfile(weights_path):
        raise ConfigError(f"--model_dir={model_dir!r}: no {os.path.basename(weights_path)} (the run has not finished "
                          "an epoch yet)")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, weights="none"))
    model = build_model(cfg, num_classes=len(run["class_names"]), multi_label=run["task"] == "multi_label",
                        num_train=run["num_train"], steps_per_epoch=run["steps_per_epoch"], class_weights=None)
    model.compile(optimizer=make_optimizer(cfg, run["steps_per_epoch"]))
    load_weights_checked(model, weights_path)
    return cfg, run, model


# ----------------------------------------------------------------------------------------------------------------
# Backups: the resumable state of the last two finished epochs.
# ----------------------------------------------------------------------------------------------------------------
def _backup_name(epoch: int) -> str:
    return f"epoch-{epoch:04d}.weights.h5"


def write_backup(model: keras.Model, backup_dir: str, epoch: int, extra: dict | None = None) -> None:
    """Saves the state after `epoch` finished epochs, then points state.json at it (keeping the previous one)."""
    os.makedirs(backup_dir, exist_ok=True)
    name = _backup_name(epoch)
    atomic_save_weights(model, os.path.join(backup_dir, name))
    state = read_backup_state(backup_dir)
    entries = [e for e in state.get("backups", []) if e["epoch"] < epoch][-1:]  # keep the previous good one
    entries.append({"epoch": epoch, "file": name, "sha256": sha256(os.path.join(backup_dir, name)),
                    "written": datetime.datetime.now().isoformat(timespec="seconds"), **(extra or {})})
    atomic_write_json(os.path.join(backup_dir, BACKUP_STATE), {"backups": entries})
    keep = {e["file"] for e in entries}
    for stale in os.listdir(backup_dir):
        if stale.startswith("epoch-") and stale.endswith(".weights.h5") and stale not in keep:
            os.remove(os.path.join(backup_dir, stale))


def read_backup_state(backup_dir: str) -> dict:
    path = os.path.join(backup_dir, BACKUP_STATE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        log.warning("backup: %s is damaged (%s); looking for backup files directly", path, e)
        return {}


def restore_backup(model: keras.Model, backup_dir: str) -> int:
    """Loads the newest good backup into `model`; returns its epoch (0 = none, start afresh).

    A missing, truncated or corrupt backup is reported by name and the previous good one is used.
    """
    state = read_backup_state(backup_dir)
    entries = sorted(state.get("backups", []), key=lambda e: -e["epoch"])
    if not entries and os.path.isdir(backup_dir):  # no (readable) state.json: the files themselves, newest first
        files = sorted((f for f in os.listdir(backup_dir) if f.startswith("epoch-") and f.endswith(".weights.h5")),
                       reverse=True)
        entries = [{"epoch": int(f[6:10]), "file": f} for f in files]
    for entry in entries:
        path = os.path.join(backup_dir, entry["file"])
        if not os.path.isfile(path):
            log.warning("backup: %s is missing; trying the previous one", path)
            continue
        if entry.get("sha256") and sha256(path) != entry["sha256"]:
            log.warning("backup: %s is damaged (its SHA-256 differs from %s); trying the previous one", path,
                        BACKUP_STATE)
            continue
        try:
            load_weights_checked(model, path)
        except DataError as e:
            log.warning("backup: %s; trying the previous one", e)
            continue
        return int(entry["epoch"])
    if entries:
        log.warning("backup: no usable backup in %s; starting from the first epoch", backup_dir)
    return 0


# ----------------------------------------------------------------------------------------------------------------
# Metric and calibration files.
# ----------------------------------------------------------------------------------------------------------------
def checkpoint_path(model_dir: str, checkpoint: str) -> str:
    return os.path.join(model_dir, BEST if checkpoint == "best" else LAST)


def read_calibration(model_dir: str, checkpoint: str = "best", required: bool = False) -> dict | None:
    """The thresholds and calibration `evaluate --fit_thresholds` fitted for this checkpoint's weights, or None.

    They belong to the weights they were fitted on (their SHA-256 is stored): fitted on another checkpoint, or on
    `best` before training went on, they are ignored with a warning, or refused when `required`.
    """
    path = os.path.join(model_dir, CALIBRATION)
    fitted = _read_json(path, "fit it again with evaluate --fit_thresholds")
    if fitted is None:
        if required:
            raise ConfigError(f"{model_dir} has no {CALIBRATION}; run python -m stsc_tf.evaluate --fit_thresholds "
                              "first")
        return None
    weights = checkpoint_path(model_dir, checkpoint)
    if fitted.get("weights_sha256") != (sha256(weights) if os.path.isfile(weights) else None):
        message = (f"{path} was fitted on other weights than the {checkpoint} checkpoint's (another checkpoint, or "
                   "training went on since); fit it again with python -m stsc_tf.evaluate --fit_thresholds "
                   f"--checkpoint={checkpoint}")
        if required:
            raise ConfigError(message)
        log.warning("ignored: %s", message)
        return None
    return fitted


def write_metrics(model_dir: str, split: str, results: dict, table: str, prefix: str = "metrics") -> None:
    """`<prefix>.json` (all results) and `<prefix>.md` (the Markdown `table`), each atomically."""
    atomic_write_json(os.path.join(model_dir, f"{prefix}.json"), {"split": split, **_jsonable(results)})
    atomic_write_text(os.path.join(model_dir, f"{prefix}.md"), table + "\n")


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if not np.isfinite(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
