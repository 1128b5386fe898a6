"""A user's own images: one CSV plus an image folder.

The CSV has an image column (a path relative to the image folder, or an id to which '.jpg', '.jpeg' or '.png'
is added) and EITHER one 0/1 column per class (class names = those columns, in file order, unless given) OR one
column of '|'-separated class names (`label_column`; class names = the sorted set found, unless given). An
optional group column (patient, lesion) keeps a group's images in one split; without it each image is its own
group. `task='single_label'` demands exactly one positive class per row.
"""

from __future__ import annotations

import os

import numpy as np

from stsc_tf.data.sources.common import (MULTI_LABEL, SINGLE_LABEL, Row, Source, check_unique_ids, one_hot_label,
                                        read_csv_rows, require_columns, row_problem)
from stsc_tf.errors import DataError

EXTENSIONS = ("", ".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")


def _resolve(image_dir: str, name: str) -> str | None:
    for ext in EXTENSIONS:
        path = os.path.join(image_dir, name + ext)
        if os.path.isfile(path):
            return path
    return None


def load(source_dir: str, *, on_error: str = "fail", csv_path: str = "", image_dir: str = "",
         image_column: str = "image", label_column: str = "", group_column: str = "",
         class_names: list[str] | None = None, task: str = SINGLE_LABEL) -> Source:
    """Loads a CSV + folder source. `csv_path` and `image_dir` default to `<source_dir>/labels.csv`, `<source_dir>`."""
    if task not in (SINGLE_LABEL, MULTI_LABEL):
        raise DataError(f"task must be {SINGLE_LABEL!r} or {MULTI_LABEL!r}, got {task!r}")
    csv_path = csv_path or os.path.join(source_dir, "labels.csv")
    image_dir = image_dir or source_dir
    header, rows, lines = read_csv_rows(csv_path)
    require_columns(header, [image_column] + ([label_column] if label_column else [])
                    + ([group_column] if group_column else []), csv_path)
    if label_column:
        found = sorted({n.strip() for r in rows for n in r[header.index(label_column)].split("|") if n.strip()})
        names = list(class_names) if class_names else found
    else:
        reserved = {image_column, group_column}
        names = list(class_names) if class_names else [c for c in header if c and c not in reserved]
        require_columns(header, names, csv_path)
    if not names:
        raise DataError(f"{csv_path}: no class columns found")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(f"{csv_path}: the classes {names} ({'--class_names' if class_names else 'its header'}) name "
                        f"{repeated} more than once; name each class once")
    bad = [n for n in names if "|" in n or "\n" in n or n != n.strip()]
    if bad:
        raise DataError(f"{csv_path}: class names {bad} contain '|', a line break or outer spaces ('|' separates "
                        "class names in the split CSVs); rename them")
    i_img = header.index(image_column)
    ids = [r[i_img].strip() for r in rows]
    check_unique_ids(ids, csv_path, lines)
    skipped: list[tuple[str, str]] = []
    out, ungrouped = [], []
    for line, image_id, r in zip(lines, ids, rows):
        where = f"{csv_path} row {line} ({image_id})"
        if label_column:
            label = np.zeros(len(names), np.float32)
            unknown = []
            for n in (x.strip() for x in r[header.index(label_column)].split("|")):
                if n in names:
                    label[names.index(n)] = 1.0
                elif n:
                    unknown.append(n)
            if unknown:
                row_problem(skipped, on_error, where, f"unknown class name(s) {unknown}; known: {names}")
                continue
            if task == SINGLE_LABEL and label.sum() != 1:
                row_problem(skipped, on_error, where,
                            f"single-label row has {int(label.sum())} positive classes (need exactly 1)")
                continue
        else:
            label = one_hot_label([r[header.index(c)] for c in names], where, names, task == SINGLE_LABEL,
                                  skipped, on_error)
            if label is None:
                continue
        group = r[header.index(group_column)].strip() if group_column else image_id
        if not group:  # a row without a group value shares a split with no other row
            group = f"(no {group_column}) {image_id}"
            ungrouped.append(line)
        out.append(Row(image_id, _resolve(image_dir, image_id), label, group, where=where,
                       expected=os.path.join(image_dir, image_id) + "[.jpg|.jpeg|.png]"))
    notes = [] if group_column else ["no group column: each image is its own group"]
    if ungrouped:
        notes.append(f"{len(ungrouped)} row(s) with an empty {group_column!r} cell are each their own group (rows "
                     f"{', '.join(map(str, ungrouped[:10]))}{', ...' if len(ungrouped) > 10 else ''})")
    return Source("csv_folder", task, names, out, source_dir, skipped, notes)
