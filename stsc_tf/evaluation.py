"""Predictions and evaluation of a run: metrics tables, ROC curves, validated thresholds and calibration, and
predictions for new images.

    python -m stsc_tf.evaluate --model_dir=runs/isic --split=test
    python -m stsc_tf.evaluate --model_dir=runs/isic --fit_thresholds      # on the validation split only
    python -m stsc_tf.predict --model_dir=runs/isic --images='new/**/*.jpg' --out=preds.csv

Paper protocol: every class thresholded at p >= 0.18 (SRC-MT's metric code), right for reproducing the paper's
tables. For deployment, `--fit_thresholds` chooses per-class thresholds (Youden's J, or max F1) and a calibration
(temperature, or per-class Platt for multi-label) on the VALIDATION split and stores them in `calibration.json`;
the test split is never read for that. Once stored, the test tables show both protocols side by side, with the
expected calibration error of each, and `predict` and `export` use them.
"""

from __future__ import annotations

import concurrent.futures
import csv
import datetime
import itertools
import logging
import os
import time

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from stsc_tf import calibration as calibration_lib
from stsc_tf import figures, selection
from stsc_tf import metrics as metrics_lib
from stsc_tf.config import MAX_IMAGE_PIXELS, Config
from stsc_tf.data import augment
from stsc_tf.data.image_files import decode_reason, expand_images, read_image_bytes
from stsc_tf.data.pipeline import RecordSet, eval_dataset
from stsc_tf.errors import ConfigError, DataError
from stsc_tf.files import atomic_path, atomic_write_csv, atomic_write_json, remove_stale_temps, sha256
from stsc_tf.losses import probabilities
from stsc_tf.run_folder import (CALIBRATION, check_records, check_replaceable_output, check_writable, checkpoint_path,
                                load_run, read_calibration, record_outputs, run_records, write_metrics)

log = logging.getLogger("stsc_tf.evaluate")
NETWORKS = ("student", "teacher")


def predict_split(network: keras.Model, records: RecordSet, split: str, image_size: int, batch_size: int,
                  multi_label: bool) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(ids, labels [N, K], probabilities [N, K], logits [N, K]) of one network on a split, in its record order."""
    ids, ys, zs = [], [], []
    for batch in eval_dataset(records, split, image_size, batch_size):
        _, logits = network(batch["image"], training=False)
        zs.append(np.asarray(logits, np.float64))
        ys.append(batch["label"].numpy())
        ids += [i.decode() for i in batch["id"].numpy()]
    logits = np.concatenate(zs)
    return ids, np.concatenate(ys), probabilities(logits, multi_label).numpy().astype(np.float64), logits


def refuse_nonfinite(name: str, split: str, ids: list[str], logits: np.ndarray) -> None:
    bad = ~np.isfinite(logits).all(axis=1)
    if bad.any():
        raise DataError(f"the {name}'s predictions on the {split} split are not finite for {int(bad.sum())} of "
                        f"{len(ids)} images (first: {ids[int(np.argmax(bad))]}); the checkpoint is damaged or the "
                        "training diverged: no metric is computed from them")


def calibrated(fitted: dict, logits: np.ndarray) -> np.ndarray:
    """Calibrated probabilities [N, K] of one network's logits with its stored calibration."""
    return calibration_lib.Calibration.from_dict(fitted["calibration"]).apply(logits)


def evaluate_networks(model, records: RecordSet, split: str, cfg: Config, which=NETWORKS, bootstrap: int = 200,
                      on_predictions=None, fitted: dict | None = None) -> dict:
    """Metrics of each network on a split (paper protocol; and validated thresholds when `fitted` has them).

    `on_predictions(name, labels, probabilities)` sees the raw predictions (ROC curves).
    """
    results = {}
    for name in which:
        network = model.student if name == "student" else model.teacher
        ids, y, p, z = predict_split(network, records, split, cfg.data.image_size, cfg.data.batch_size,
                                     model.multi_label)
        refuse_nonfinite(name, split, ids, z)
        result = metrics_lib.evaluate_predictions(y, p, multi_label=model.multi_label, threshold=cfg.train.threshold,
                                                  bootstrap=bootstrap, seed=cfg.train.seed)
        result["ece"] = calibration_lib.expected_calibration_error(y, p, multi_label=model.multi_label)
        if fitted and name in fitted.get("networks", {}):
            entry = fitted["networks"][name]
            pc = calibrated(entry, z)
            result["validated"] = {
                "paper": metrics_lib.paper_metrics(y, pc, entry["thresholds"]),
                "ece": calibration_lib.expected_calibration_error(y, pc, multi_label=model.multi_label),
                "criterion": fitted["criterion"], "calibration": entry["calibration"]["method"]}
        results[name] = result
        if on_predictions is not None:
            on_predictions(name, y, p)
    return results


def results_table(results: dict, split: str, labeled_share: float, threshold: float) -> str:
    rows = {}
    for name, r in results.items():
        rows[f"STSC ({name}), p >= {threshold:g} (paper)"] = r
        if "validated" in r:
            v = r["validated"]
            rows[f"STSC ({name}), validated {v['criterion']} thresholds, {v['calibration']}-calibrated"] = v
    return (f"Metrics (%) on the {split} split; AUC is one-vs-rest, the rest at the per-class threshold; D_L is the "
            f"labeled share of the training split as used; ECE = expected calibration error.\n\n"
            + metrics_lib.paper_table(rows, labeled_share))


def test_metrics(model, records: RecordSet, split: str, cfg: Config, model_dir: str, labeled_share: float,
                 bootstrap: int) -> tuple[dict, str]:
    """The end-of-training metrics of both networks (best checkpoint): metrics.json and metrics.md."""
    fitted = read_calibration(model_dir, "best")
    results = evaluate_networks(model, records, split, cfg, bootstrap=bootstrap, fitted=fitted)
    table = results_table(results, split, labeled_share, cfg.train.threshold)
    write_metrics(model_dir, split, results, table)
    return results, table


def fit_thresholds(model, records: RecordSet, cfg: Config, model_dir: str, which=NETWORKS, criterion: str = "youden",
                   method: str = "temperature", checkpoint: str = "best", loaded_sha256: str = "") -> dict:
    """Fits thresholds and calibration on the VALIDATION split; writes calibration.json and reliability PNGs.

    `loaded_sha256` is the hash of the checkpoint file the model was loaded from, taken before loading: the
    calibration is bound to it, and refused when the file changed since (a training still writing this run).
    """
    if records.count("val") == 0:
        raise ConfigError(f"--fit_thresholds needs a validation split; {records.data_dir} has none")
    if method == "platt" and not model.multi_label:
        raise ConfigError("--calibration=platt is per class, for multi-label runs; use temperature")
    networks = {}
    for name in which:
        network = model.student if name == "student" else model.teacher
        ids, y, p, z = predict_split(network, records, "val", cfg.data.image_size, cfg.data.batch_size,
                                     model.multi_label)
        refuse_nonfinite(name, "val", ids, z)
        cal = calibration_lib.fit_calibration(z, y, multi_label=model.multi_label, method=method)
        pc = cal.apply(z)
        chosen = calibration_lib.fit_thresholds(y, pc, criterion, default=cfg.train.threshold)
        before = calibration_lib.expected_calibration_error(y, p, multi_label=model.multi_label)
        after = calibration_lib.expected_calibration_error(y, pc, multi_label=model.multi_label)
        networks[name] = {"calibration": cal.to_dict(), "thresholds": chosen["thresholds"],
                          "per_class": chosen["per_class"], "ece_before": before, "ece_after": after}
        curves = {"before": calibration_lib.reliability_curve(y, p, multi_label=model.multi_label),
                  "after": calibration_lib.reliability_curve(y, pc, multi_label=model.multi_label)}
        figures.reliability_figure(curves, {"before": before, "after": after},
                                   f"{name}, validation split ({method})",
                                   os.path.join(model_dir, f"reliability_val_{name}.png"))
        undefined = [records.class_names[c["class"]] for c in chosen["per_class"] if not c["defined"]]
        log.info("%s: %s calibration, ECE %.4f -> %.4f on val; %s thresholds %s%s", name, method, before, after,
                 criterion, dict(zip(records.class_names, np.round(chosen["thresholds"], 4).tolist())),
                 f" (no optimum for {undefined}: {cfg.train.threshold} kept)" if undefined else "")
    fitted = {"split": "val", "n": records.count("val"), "criterion": criterion, "method": method,
              "checkpoint": checkpoint, "class_names": records.class_names,
              "weights_sha256": _unchanged(model_dir, checkpoint, loaded_sha256),
              "fitted": datetime.datetime.now().isoformat(timespec="seconds"), "networks": networks}
    atomic_write_json(os.path.join(model_dir, CALIBRATION), fitted)
    return fitted


def _unchanged(model_dir: str, checkpoint: str, loaded_sha256: str) -> str:
    """The checkpoint's hash, refusing a file replaced since the model was loaded from it."""
    now = sha256(checkpoint_path(model_dir, checkpoint))
    if loaded_sha256 and now != loaded_sha256:
        raise ConfigError(f"{checkpoint_path(model_dir, checkpoint)} changed while it was being evaluated (is a "
                          "training still writing this run?); nothing was written: run again when it has finished")
    return now


def evaluate_run(model_dir: str, split: str = "test", which=NETWORKS, checkpoint: str = "best", bootstrap: int = 200,
                 data_dir: str = "", thresholds: str = "paper", fit: bool = False, criterion: str = "youden",
                 method: str = "temperature") -> dict:
    """`python -m stsc_tf.evaluate`: optionally fits thresholds + calibration on val, then evaluates `split`."""
    check_writable(model_dir, create=False)  # its tables, curves and calibration go there: say so before the work
    weights = checkpoint_path(model_dir, checkpoint)
    loaded_sha256 = sha256(weights) if fit and os.path.isfile(weights) else ""  # before loading: see fit_thresholds
    cfg, run, model = load_run(model_dir, checkpoint)
    records = run_records(model_dir, run, data_dir)  # the run's own records, by content: its splits, no leak
    records.check([split] + (["val"] if fit else []))
    with records.reading():
        return _evaluate(model_dir, cfg, run, model, records, split, which, checkpoint, bootstrap, thresholds,
                         loaded_sha256, criterion, method)


def _evaluate(model_dir, cfg, run, model, records, split, which, checkpoint, bootstrap, thresholds, loaded_sha256,
              criterion, method) -> dict:
    if loaded_sha256:
        fit_thresholds(model, records, cfg, model_dir, which, criterion, method, checkpoint, loaded_sha256)
        print(f"wrote {os.path.join(model_dir, CALIBRATION)} and reliability_val_*.png (fitted on the validation "
              "split)")
    if records.count(split) == 0:
        raise ConfigError(f"--split={split!r}: the records in {records.data_dir} have no such split")
    fitted = read_calibration(model_dir, checkpoint, required=thresholds == "validated")

    def draw_roc(name, y, p):
        figures.roc_figure(y, p, records.class_names, f"{name}, {split} split",
                           os.path.join(model_dir, f"roc_{split}_{name}.png"))

    results = evaluate_networks(model, records, split, cfg, which, bootstrap, on_predictions=draw_roc, fitted=fitted)
    table = results_table(results, split, run.get("labeled_share", run["labeled"] / run["num_train"]),
                          cfg.train.threshold)
    write_metrics(model_dir, split, results, table, prefix=f"eval_{split}")
    print(table)
    for name, r in results.items():
        s = r["standard"]
        extra = (f"top-1 {s['top1_accuracy']:.4f}, balanced accuracy {s['balanced_accuracy']:.4f}, "
                 f"macro F1 {s['macro_f1']:.4f}") if "top1_accuracy" in s else f"mean AUC {s['mean_auc']}"
        print(f"{name}: {extra}; AUC 95% CI {r.get('paper_ci95', {}).get('auc')}")
    print(f"wrote {os.path.join(model_dir, f'eval_{split}.json')}, eval_{split}.md and roc_{split}_*.png")
    return results


# ----------------------------------------------------------------------------------------------------------------
# Predicting new images: python -m stsc_tf.predict
# ----------------------------------------------------------------------------------------------------------------
def _image_input(path: str, image_size: int, max_pixels: int):
    """(model input [S, S, 3], None) of one file, or (None, the reason it cannot be read)."""
    try:
        data = read_image_bytes(path)
        image = augment.decode(tf.constant(data), max_pixels)
        return augment.eval_preprocess(image, image_size).numpy(), None
    except DataError as e:
        return None, str(e)
    except tf.errors.InvalidArgumentError as e:
        return None, decode_reason(e)


def _path_batches(paths, image_size: int, max_pixels: int, batch_size: int):
    """Yields [(path, input or None, reason or None)] per batch, decoding the next batch while the model runs."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        iterator = iter(paths)

        def load(path):
            return (path, *_image_input(path, image_size, max_pixels))

        pending = list(pool.map(load, itertools.islice(iterator, batch_size)))
        while pending:
            upcoming = pool.map(load, list(itertools.islice(iterator, batch_size)))  # runs while we yield
            yield pending
            pending = list(upcoming)


def _list_file(path: str):
    """The paths of an --image_list file, one per line, read lazily (blank lines and # comments left out).

    The file is checked whole first (a UTF-8 text file, a byte-order mark allowed), so a bad byte never stops a run
    half-way."""
    if os.path.isdir(path):
        raise ConfigError(f"--image_list={path!r} is a folder; give a text file with one image path per line")
    if not os.path.isfile(path):
        raise ConfigError(f"--image_list={path!r}: no such file")
    try:
        with open(path, encoding="utf-8-sig") as f:
            for _ in f:
                pass
    except UnicodeDecodeError as e:
        raise ConfigError(f"--image_list={path!r} is not a UTF-8 text file (byte {e.start}: {e.reason}); give one "
                          "image path per line") from None

    def lines():
        listed = 0
        with open(path, encoding="utf-8-sig") as f:
            for line in f:
                line = line.strip()
                if line and not line.startswith("#"):
                    listed += 1
                    yield line
        if not listed:
            raise ConfigError(f"--image_list={path!r} lists no image path")

    return lines()


def _check_output(out: str) -> None:
    """--out must be a .csv path, not a folder (checked before the run is loaded)."""
    if not out.lower().endswith(".csv"):
        raise ConfigError(f"--out={out!r}: give a .csv path")
    if os.path.isdir(out):
        raise ConfigError(f"--out={out!r} is a folder; give a .csv path")
    check_writable(os.path.dirname(os.path.abspath(out)), "--out")


def _check_replaceable(path: str, header: list[str], flag: str) -> None:
    """A file predict would replace must be one it wrote: a CSV with exactly `header` (never a user's file)."""
    if os.path.isdir(path):
        raise ConfigError(f"{flag}: {path!r} is a folder; predict writes a CSV there")
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        first = f.readline().rstrip("\r\n")
    if first != ",".join(header):
        raise ConfigError(f"{flag}: {path!r} exists and is not a list predict wrote for this run (its first line is "
                          f"{first[:80]!r}); it is not replaced: choose another --out")


def decisions(probs: np.ndarray, thresholds, class_names: list[str], multi_label: bool) -> dict[str, list[str]]:
    """The decision columns: single-label `prediction` (argmax) and `flagged` (classes with p >= threshold, a
    one-vs-rest screen); multi-label `positive` (the findings with p >= threshold, '|'-joined)."""
    above = probs >= np.asarray(thresholds, np.float64)[None, :]  # [N, K]
    joined = ["|".join(c for c, on in zip(class_names, row) if on) for row in above]
    if multi_label:
        return {"positive": joined}
    return {"prediction": [class_names[i] for i in probs.argmax(1)], "flagged": joined}


def predict_run(model_dir: str, images: str = "", image_list: str = "", data_dir: str = "", split: str = "test",
                out: str = "predictions.csv", which: str = "", batch_size: int = 32, thresholds: str = "paper",
                checkpoint: str = "best", max_pixels: int = MAX_IMAGE_PIXELS) -> dict:
    """Predicts image files (or a split of records) with a run's network, streaming to a CSV written atomically.

    Columns: path (or id), p_<class> per class (calibrated with thresholds='validated'), the decisions
    (`decisions`), entropy and disagreement (student vs teacher; `selection.uncertainty_components`) and their
    mean, `uncertainty`. Unreadable files go to `<out>.skipped.csv` with the reason, and are counted.
    """
    _check_output(out)
    cfg, run, model = load_run(model_dir, checkpoint)
    which = which or cfg.train.eval_with
    class_names, multi_label = run["class_names"], run["task"] == "multi_label"
    if thresholds == "validated":
        fitted = read_calibration(model_dir, checkpoint, required=True)
        if which not in fitted["networks"]:
            raise ConfigError(f"--thresholds=validated: {model_dir}/{CALIBRATION} has no calibration for the "
                              f"{which}; run python -m stsc_tf.evaluate --fit_thresholds --networks=both")
        entry = fitted["networks"][which]
        cal, cuts = calibration_lib.Calibration.from_dict(entry["calibration"]), entry["thresholds"]
    else:
        cal, cuts = None, [cfg.train.threshold] * len(class_names)
    header = (["id" if data_dir else "path"] + [f"p_{c}" for c in class_names]
              + (["positive"] if multi_label else ["prediction", "flagged"]) + ["entropy", "disagreement",
                                                                                  "uncertainty"])
    skipped_path = os.path.splitext(out)[0] + ".skipped.csv"
    _check_replaceable(out, header, "--out")
    _check_replaceable(skipped_path, ["path", "why"], "--out's skipped list")
    check_replaceable_output(model_dir, out, "--out")
    check_replaceable_output(model_dir, skipped_path, "--out's skipped list")
    t0 = time.time()
    progress = keras.utils.Progbar(None, unit_name="image")

    def write(writer, names, z_chosen, z_s, z_t):
        probs = cal.apply(z_chosen) if cal is not None else probabilities(z_chosen, multi_label).numpy()
        parts = selection.uncertainty_components(probabilities(z_s, multi_label).numpy().astype(np.float64),
                                                 probabilities(z_t, multi_label).numpy().astype(np.float64),
                                                 multi_label=multi_label)
        decided = decisions(probs, cuts, class_names, multi_label)
        mean = (parts["entropy"] + parts["disagreement"]) / 2
        for i, name in enumerate(names):
            writer.writerow([name, *(f"{p:.6f}" for p in probs[i]), *(decided[k][i] for k in decided),
                             f"{parts['entropy'][i]:.6f}", f"{parts['disagreement'][i]:.6f}", f"{mean[i]:.6f}"])

    @tf.function(input_signature=[tf.TensorSpec([None, cfg.data.image_size, cfg.data.image_size, 3], tf.float32)],
                 reduce_retracing=True)
    def logits(x):  # both networks in one traced call (eager DenseNet calls cost more than the maths here)
        return model.student(x, training=False)[1], model.teacher(x, training=False)[1]

    def forward(x):
        z_s, z_t = (np.asarray(z, np.float64) for z in logits(tf.convert_to_tensor(x, tf.float32)))
        return (z_s if which == "student" else z_t), z_s, z_t

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    for folder, name in {(os.path.dirname(os.path.abspath(p)), os.path.basename(p)) for p in (out, skipped_path)}:
        remove_stale_temps(folder, (name,))  # what a killed predict of the same --out left
    count, skipped = 0, 0
    with atomic_path(out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f, \
            atomic_path(skipped_path) as tmp_skipped, open(tmp_skipped, "w", newline="", encoding="utf-8") as g:
        # both streamed (memory stays constant); "\n" line ends, as the package's other CSVs (pandas)
        writer, skip_writer = csv.writer(f, lineterminator="\n"), csv.writer(g, lineterminator="\n")
        writer.writerow(header)
        skip_writer.writerow(["path", "why"])
        if data_dir:
            records = RecordSet.open(data_dir)
            check_records(records, run)
            records.check([split])
            with records.reading():
                for batch in eval_dataset(records, split, cfg.data.image_size, batch_size):
                    z, z_s, z_t = forward(batch["image"])
                    refuse_nonfinite(which, split, [i.decode() for i in batch["id"].numpy()], z)
                    write(writer, [i.decode() for i in batch["id"].numpy()], z, z_s, z_t)
                    count += len(z)
                    progress.add(len(z))
        else:
            paths = expand_images(images) if images else _list_file(image_list)
            for batch in _path_batches(paths, cfg.data.image_size, max_pixels, batch_size):
                good = [(p, x) for p, x, _ in batch if x is not None]
                bad_files = [(p, why) for p, x, why in batch if x is None]
                if good:
                    z, z_s, z_t = forward(np.stack([x for _, x in good]))
                    bad = ~np.isfinite(z).all(axis=1)
                    bad_files += [(p, "the network's output is not finite") for (p, _), b in zip(good, bad) if b]
                    write(writer, [p for (p, _), b in zip(good, bad) if not b], z[~bad], z_s[~bad], z_t[~bad])
                    count += int((~bad).sum())
                skip_writer.writerows(bad_files)
                skipped += len(bad_files)
                progress.add(len(batch))
    if not skipped:
        os.remove(skipped_path)
    record_outputs(model_dir, [out] + ([skipped_path] if skipped else []))
    seconds = time.time() - t0
    summary = {"predicted": count, "skipped": skipped, "out": os.path.abspath(out),
               "skipped_csv": os.path.abspath(skipped_path) if skipped else None, "network": which,
               "thresholds": thresholds, "images_per_s": count / max(seconds, 1e-9)}
    print(f"\npredicted {count} image(s), skipped {skipped}, with the {which} ({thresholds} thresholds) in "
          f"{seconds:.1f} s ({summary['images_per_s']:.1f} images/s)\n  predictions: {summary['out']}"
          + (f"\n  skipped:     {summary['skipped_csv']}" if skipped else ""))
    return summary
