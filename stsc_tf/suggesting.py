"""Which unlabeled training images an expert should label next (the library behind stsc_tf.suggest).

    python -m stsc_tf.suggest --model_dir=runs/r0 --budget=200 --out=to_label.csv

The candidates are the training split's images that are not in the run's labeled subset (`labeled_ids.csv`). Each
gets two uncertainty signals the mean teacher provides (`selection.uncertainty_components`): the teacher's
predictive entropy and the student-teacher disagreement, combined by percentile rank into `uncertainty`
(`selection.uncertainty_score`). The budget is then filled greedily (`selection.select_diverse`): each pick maximises
uncertainty - diversity * max(0, s), s being its largest cosine similarity, in the teacher's pooled relation
features, to the images already chosen and to the labeled ones, so the budget is not spent on near-duplicates.

The CSV lists, in selection order: rank, id, every component, the score at selection, the teacher's prediction and
probabilities, and an empty `labels` column for the expert ('|'-separated class names). It feeds back as

    python -m stsc_tf.train ... --model_dir=runs/r1 --labeled_ids=runs/r0/labeled_ids.csv+to_label.csv \
        --init_from=runs/r0

(a row whose `labels` cell is left empty keeps the label the records hold: the benchmark setting, where every
image was converted with its label). A thumbnail sheet of the first suggestions is written beside the CSV.
"""

from __future__ import annotations

import logging
import math
import os
import shlex

import numpy as np
import pandas as pd

from stsc_tf import figures, selection
from stsc_tf.data import augment
from stsc_tf.data.pipeline import RecordSet, eval_dataset
from stsc_tf.errors import ConfigError
from stsc_tf.evaluation import refuse_nonfinite
from stsc_tf.files import atomic_write_csv, read_csv
from stsc_tf.losses import probabilities
from stsc_tf.run_folder import (LABELED, check_replaceable_output, check_writable, load_run, read_labeled,
                                record_outputs, run_records)

log = logging.getLogger("stsc_tf.suggest")
SHEET = 20  # thumbnails on the sheet


def _pooled(features) -> np.ndarray:
    """[B, h, w, C] or [B, D] relation output -> [B, C] pooled features (bounded memory for any relation mode)."""
    features = np.asarray(features, np.float32)
    return features.mean(axis=(1, 2)) if features.ndim == 4 else features


def score_train_split(model, records: RecordSet, image_size: int, batch_size: int, multi_label: bool) -> dict:
    """Both networks' probabilities and the teacher's pooled relation features for every training image."""
    ids, p_s, p_t, feats = [], [], [], []
    for batch in eval_dataset(records, "train", image_size, batch_size):
        (_, z_s), (f_t, z_t) = model.student(batch["image"], training=False), model.teacher(batch["image"],
                                                                                             training=False)
        batch_ids = [i.decode() for i in batch["id"].numpy()]
        refuse_nonfinite("teacher", "train", batch_ids, np.asarray(z_t))
        refuse_nonfinite("student", "train", batch_ids, np.asarray(z_s))
        ids += batch_ids
        p_s.append(probabilities(z_s, multi_label).numpy())
        p_t.append(probabilities(z_t, multi_label).numpy())
        feats.append(_pooled(f_t))
    return {"ids": ids, "p_student": np.concatenate(p_s).astype(np.float64),
            "p_teacher": np.concatenate(p_t).astype(np.float64), "features": np.concatenate(feats)}


def suggest_run(model_dir: str, budget: int = 200, out: str = "", diversity: float = 1.0, batch_size: int = 64,
                checkpoint: str = "best", data_dir: str = "") -> str:
    """Ranks the run's unlabeled training images for labeling; writes the CSV and a thumbnail sheet; returns the
    CSV's path."""
    if not (math.isfinite(diversity) and diversity >= 0):
        raise ConfigError(f"--diversity must be a finite number >= 0, got {diversity}")
    if batch_size < 1:
        raise ConfigError(f"--batch_size must be >= 1, got {batch_size}")
    out = out or os.path.join(model_dir, "to_label.csv")
    sheet = os.path.splitext(out)[0] + ".png"
    _check_output(out, sheet)
    for path in (out, sheet):
        check_replaceable_output(model_dir, path)
    cfg, run, model = load_run(model_dir, checkpoint)
    records = run_records(model_dir, run, data_dir)
    records.check(["train"])
    labeled = read_labeled(model_dir)
    if labeled is None:
        raise ConfigError(f"{model_dir}: no {LABELED}; suggest needs the run's list of labeled images")
    labeled_ids = set(labeled["id"])
    multi_label = run["task"] == "multi_label"
    with records.reading():
        scored = score_train_split(model, records, cfg.data.image_size, batch_size, multi_label)
    ids = np.array(scored["ids"], dtype=object)
    is_labeled = np.array([i in labeled_ids for i in ids])
    candidates = np.flatnonzero(~is_labeled)
    if not len(candidates):
        raise ConfigError(f"every training image of {records.data_dir} is labeled already: nothing to suggest")
    parts = selection.uncertainty_components(scored["p_student"][candidates], scored["p_teacher"][candidates],
                                             multi_label=multi_label)
    uncertainty = selection.uncertainty_score(parts)
    chosen = selection.select_diverse(uncertainty, scored["features"][candidates], budget,
                                      labeled_features=scored["features"][is_labeled], diversity=diversity)
    picked = candidates[chosen["order"]]
    p_t = scored["p_teacher"][picked]
    names = records.class_names
    table = pd.DataFrame({
        "rank": np.arange(1, len(picked) + 1), "id": ids[picked],
        "score": np.round(chosen["score"], 6), "uncertainty": np.round(chosen["uncertainty"], 6),
        "entropy": np.round(parts["entropy"][chosen["order"]], 6),
        "disagreement": np.round(parts["disagreement"][chosen["order"]], 6),
        "max_similarity": np.round(chosen["max_similarity"], 6),
        "teacher_prediction": (["|".join(c for c, on in zip(names, row >= cfg.train.threshold) if on) for row in p_t]
                               if multi_label else [names[i] for i in p_t.argmax(1)]),
        **{f"p_{c}": np.round(p_t[:, k], 6) for k, c in enumerate(names)},
        "labels": "",
    })
    atomic_write_csv(out, table)
    with records.reading():
        _thumbnails(records, cfg.data.image_size, table.head(SHEET), sheet)
    record_outputs(model_dir, [out, sheet])
    log.info("suggested %d of %d unlabeled images -> %s (and %s)", len(picked), len(candidates), out, sheet)
    print(f"suggested {len(picked)} of {len(candidates)} unlabeled training images\n  list:       "
          f"{os.path.abspath(out)}\n  thumbnails: {os.path.abspath(sheet)}\nfill the 'labels' column, then train on "
          f"the enlarged labeled set:\n  python -m stsc_tf.train ... --model_dir=NEW_RUN "
          f"{shlex.quote('--labeled_ids=' + os.path.join(model_dir, LABELED) + '+' + out)} "
          f"{shlex.quote('--init_from=' + model_dir)}")
    return out


def _check_output(out: str, sheet: str) -> None:
    """Never replaces a list an expert has started to label, nor a file that is not this command's own output: the
    thumbnail sheet beside the list is replaced only with the suggestion list it belongs to."""
    if not out.lower().endswith(".csv") or os.path.isdir(out):
        raise ConfigError(f"--out={out!r}: give a .csv path")
    if os.path.isdir(sheet):
        raise ConfigError(f"--out={out!r}: its thumbnail sheet {sheet!r} would replace a folder; choose another --out")
    if os.path.exists(out):
        try:
            existing = read_csv(out, dtype=str)
        except (ValueError, UnicodeDecodeError):
            existing = None
        if existing is None or "labels" not in existing or "rank" not in existing:
            raise ConfigError(f"--out={out!r} exists and is not a suggestion list; it is not replaced")
        if (existing["labels"].str.strip() != "").any():
            raise ConfigError(f"--out={out!r} holds labels an expert gave ({int((existing['labels'] != '').sum())} "
                              "rows); it is not replaced: choose another --out")
    elif os.path.exists(sheet):
        raise ConfigError(f"--out={out!r}: {sheet!r} exists without the suggestion list it would belong to; it is not "
                          "replaced: choose another --out")
    check_writable(os.path.dirname(os.path.abspath(out)), "--out")


def _thumbnails(records: RecordSet, image_size: int, rows: pd.DataFrame, path: str) -> None:
    wanted = {i: n for n, i in enumerate(rows["id"])}
    pixels = [None] * len(wanted)
    for batch in eval_dataset(records, "train", image_size, 64):
        for image, image_id in zip(batch["image"], batch["id"].numpy()):
            if image_id.decode() in wanted:
                pixels[wanted[image_id.decode()]] = augment.denormalize(image).numpy()
        if all(p is not None for p in pixels):
            break
    titles = [f"#{r.rank} {r.id}\nscore {r.score:.2f} ({r.teacher_prediction or 'none'})"
              for r in rows.itertuples(index=False)]
    figures.grid_figure(np.stack(pixels), None, titles, path, cols=5)
