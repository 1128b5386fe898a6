"""NIH ChestX-ray14 in its released layout.

    Data_Entry_2017.csv          Image Index,Finding Labels,Follow-up #,Patient ID,...
                                 (2020 revision; the 2017 original has one more, empty, trailing column. The
                                 bracketed headers 'OriginalImage[Width,Height]' contain commas, so the header has
                                 more fields than names: only the three named columns above are read.)
    images/*.png  or  images_0NN/images/*.png
    train_val_list.txt, test_list.txt   (optional: the official patient-wise split)

Labels are multi-hot over the 14 findings in FINDINGS order (the order of the NIH release and of CheXNet /
SRC-MT); 'No Finding' is the all-zero vector. Groups are patients.
"""

from __future__ import annotations

import glob
import os

import numpy as np

from stsc_tf.data.sources.common import (MULTI_LABEL, Row, Source, check_unique_ids, read_csv_rows, require_columns,
                                        row_problem)
from stsc_tf.errors import DataError

FINDINGS = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
            "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia"]
NO_FINDING = "No Finding"
ENTRY_CSV = "Data_Entry_2017.csv"
OFFICIAL_LISTS = {"trainval": "train_val_list.txt", "test": "test_list.txt"}


def parse_findings(text: str, where: str) -> np.ndarray:
    """'Effusion|Mass' -> multi-hot [14]; 'No Finding' -> zeros. Raises DataError on an unknown name."""
    names = [n.strip() for n in text.split("|") if n.strip()]
    if not names:
        raise DataError(f"{where}: empty 'Finding Labels'")
    label = np.zeros(len(FINDINGS), np.float32)
    if names == [NO_FINDING]:
        return label
    for name in names:
        if name not in FINDINGS:
            hint = " ('No Finding' cannot be combined with a finding)" if name == NO_FINDING else ""
            raise DataError(f"{where}: unknown finding {name!r}{hint}; known: {FINDINGS + [NO_FINDING]}")
        label[FINDINGS.index(name)] = 1.0
    return label


def _image_index(source_dir: str) -> dict[str, str]:
    paths = glob.glob(os.path.join(source_dir, "images", "*.png"))
    paths += glob.glob(os.path.join(source_dir, "images_[0-9]*", "images", "*.png"))
    return {os.path.basename(p): p for p in paths}


def _official(source_dir: str) -> dict[str, str] | None:
    lists = {k: os.path.join(source_dir, v) for k, v in OFFICIAL_LISTS.items()}
    if not all(os.path.isfile(p) for p in lists.values()):
        return None
    assignment: dict[str, str] = {}
    for split, path in lists.items():
        with open(path) as f:
            for line_no, line in enumerate(f, start=1):
                image_id = line.strip()
                if not image_id:
                    continue
                if image_id in assignment:
                    where = "twice in" if assignment[image_id] == split else "in both split lists, again in"
                    raise DataError(f"{path} line {line_no}: {image_id!r} listed {where} this file")
                assignment[image_id] = split
    return assignment


def load(source_dir: str, *, on_error: str = "fail") -> Source:
    path = os.path.join(source_dir, ENTRY_CSV)
    header, rows, lines = read_csv_rows(path)
    require_columns(header, ["Image Index", "Finding Labels", "Patient ID"], path)
    i_id, i_lab, i_pat = (header.index(c) for c in ("Image Index", "Finding Labels", "Patient ID"))
    ids = [r[i_id].strip() for r in rows]
    check_unique_ids(ids, path, lines)
    images = _image_index(source_dir)
    official = _official(source_dir)
    skipped: list[tuple[str, str]] = []
    out = []
    for line, image_id, r in zip(lines, ids, rows):
        where = f"{path} row {line} ({image_id})"
        try:
            label = parse_findings(r[i_lab], where)
        except DataError as e:
            row_problem(skipped, on_error, where, str(e).split(": ", 1)[1])
            continue
        split = None
        if official is not None:
            split = official.get(image_id)
            if split is None:
                raise DataError(f"{where}: not listed in {OFFICIAL_LISTS['trainval']} or {OFFICIAL_LISTS['test']}")
        out.append(Row(image_id, images.get(image_id), label, "patient-" + r[i_pat].strip(), split, where,
                       expected=os.path.join(source_dir, "images", image_id) + " or images_NNN/images/"))
    notes = ["groups are patients (Patient ID)"]
    if official is not None:
        listed_only = sorted(set(official) - set(ids))
        if listed_only:
            notes.append(f"{len(listed_only)} ids in the official lists have no row in {ENTRY_CSV} (e.g. "
                         f"{listed_only[0]}); they are not part of this source")
    return Source("chestxray14", MULTI_LABEL, list(FINDINGS), out, source_dir, skipped, notes,
                  has_official_split=official is not None)
