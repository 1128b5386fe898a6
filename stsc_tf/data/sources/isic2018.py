"""ISIC 2018 Task 3 (HAM10000) in its released layout.

    ISIC2018_Task3_Training_GroundTruth.csv      image,MEL,NV,BCC,AKIEC,BKL,DF,VASC (one-hot 0.0/1.0)
    ISIC2018_Task3_Training_Input/ISIC_xxxxxxx.jpg
    HAM10000_metadata.csv                         lesion_id,image_id,dx,...   (lesion groups), or
    ISIC2018_Task3_Training_LesionGroupings.csv   image,lesion_id,...         (the official groupings file)
    ISIC2018_Task3_Validation_{Input,GroundTruth.csv}, ISIC2018_Task3_Test_{Input,GroundTruth.csv}  (optional)

Without a groupings file every image is its own group (and the converter says so: a lesion photographed twice
could then straddle splits). The official validation and test sets, when present, are the fixed val/test splits
of `--split=official`; the random 7:1:2 split (the paper's, after SRC-MT) uses the training set only.
"""

from __future__ import annotations

import os

from stsc_tf.data.sources.common import (SINGLE_LABEL, Row, Source, check_unique_ids, one_hot_label, read_csv_rows,
                                        require_columns)
from stsc_tf.errors import DataError

CLASS_NAMES = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]  # the official column order
TRAIN_CSV = "ISIC2018_Task3_Training_GroundTruth.csv"
TRAIN_DIR = "ISIC2018_Task3_Training_Input"
METADATA_CSV = "HAM10000_metadata.csv"
GROUPINGS_CSV = "ISIC2018_Task3_Training_LesionGroupings.csv"
OFFICIAL = {"val": "Validation", "test": "Test"}


def _groups(source_dir: str) -> tuple[dict[str, str], str | None]:
    for name, id_col in ((GROUPINGS_CSV, "image"), (METADATA_CSV, "image_id")):
        path = os.path.join(source_dir, name)
        if os.path.isfile(path):
            header, rows, lines = read_csv_rows(path)
            require_columns(header, [id_col, "lesion_id"], path)
            i, j = header.index(id_col), header.index("lesion_id")
            return {r[i].strip(): r[j].strip() for r in rows}, name
    return {}, None


def _read_table(source_dir: str, csv_name: str, image_dir: str, groups: dict[str, str], split: str | None,
                on_error: str, skipped: list) -> list[Row]:
    path = os.path.join(source_dir, csv_name)
    header, rows, lines = read_csv_rows(path)
    expected = ["image"] + CLASS_NAMES
    unknown = [c for c in header if c and c not in expected]
    missing = [c for c in expected if c not in header]
    if missing or unknown:
        raise DataError(f"{path}: expected columns {expected}; missing {missing}, unexpected {unknown}")
    cols = [header.index(c) for c in CLASS_NAMES]
    ids = [r[header.index("image")].strip() for r in rows]
    check_unique_ids(ids, path, lines)
    out = []
    for line, image_id, r in zip(lines, ids, rows):
        where = f"{path} row {line} ({image_id})"
        label = one_hot_label([r[c] for c in cols], where, CLASS_NAMES, True, skipped, on_error)
        if label is None:
            continue
        image_path = os.path.join(source_dir, image_dir, image_id + ".jpg")
        out.append(Row(image_id, image_path if os.path.isfile(image_path) else None, label,
                       groups.get(image_id, image_id), split, where, expected=image_path))
    return out


def load(source_dir: str, *, on_error: str = "fail") -> Source:
    groups, groups_file = _groups(source_dir)
    skipped: list[tuple[str, str]] = []
    rows = _read_table(source_dir, TRAIN_CSV, TRAIN_DIR, groups, "train", on_error, skipped)
    notes = []
    if groups_file is None:
        notes.append(f"no {METADATA_CSV} or {GROUPINGS_CSV} in {source_dir}: each image is its own group, so two "
                     "images of one lesion may land in different splits")
    else:
        notes.append(f"lesion groups from {groups_file}")
    official = True
    for split, word in OFFICIAL.items():
        csv_name = f"ISIC2018_Task3_{word}_GroundTruth.csv"
        if os.path.isfile(os.path.join(source_dir, csv_name)):
            rows += _read_table(source_dir, csv_name, f"ISIC2018_Task3_{word}_Input", {}, split, on_error, skipped)
        else:
            official = False
    check_unique_ids([r.id for r in rows], source_dir)
    return Source("isic2018", SINGLE_LABEL, list(CLASS_NAMES), rows, source_dir, skipped, notes,
                  has_official_split=official, random_pool=("train",))
