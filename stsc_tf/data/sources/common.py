"""What the raw-layout loaders share: the `Row` and `Source` types, CSV reading, row-level checks, path confinement.

Each loader module turns one layout into a `Source`: rows of (id, path, label vector, group).

A loader validates the tables (columns, label values, duplicate ids) and resolves image paths; it does not
decode images (the converter does that, in parallel). Row-level problems (a row with no or two positive classes
in a single-label table, an unknown finding name) are errors that name the file and row, or, with
`on_error='skip'`, are counted and returned in `Source.skipped`. Problems with the table itself (a missing or
renamed class column, duplicate ids, an empty folder) are always errors.
"""

from __future__ import annotations

import csv
import dataclasses
import os

import numpy as np

from stsc_tf.errors import DataError

SINGLE_LABEL = "single_label"
MULTI_LABEL = "multi_label"


@dataclasses.dataclass(frozen=True)
class Row:
    """One image. `path` is None when the image file could not be found (reported by the converter)."""

    id: str
    path: str | None
    label: np.ndarray  # [K] float32, one-hot or multi-hot
    group: str
    split: str | None = None  # official assignment: 'train' | 'val' | 'test' | 'trainval' (split further), or None
    where: str = ""  # the table file and row it comes from, for messages
    expected: str = ""  # where the image file was looked for (for a missing file's message)


@dataclasses.dataclass
class Source:
    """A loaded raw dataset."""

    dataset: str
    task: str
    class_names: list[str]
    rows: list[Row]
    source_dir: str
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (where, why)
    notes: list[str] = dataclasses.field(default_factory=list)
    has_official_split: bool = False
    # Which official assignments the random 7:1:2 split draws from (ISIC: the training set only).
    random_pool: tuple = (None, "train", "val", "test", "trainval")

    def random_rows(self) -> list[Row]:
        return [r for r in self.rows if r.split in self.random_pool]


def check_on_error(on_error: str) -> None:
    if on_error not in ("fail", "skip"):
        raise DataError(f"on_error must be 'fail' or 'skip', got {on_error!r}")


def row_problem(skipped: list, on_error: str, where: str, why: str) -> None:
    """Raises for a bad row, or records the skip when the user asked for skipping."""
    if on_error == "skip":
        skipped.append((where, why))
        return
    raise DataError(f"{where}: {why} (pass --on_error=skip to skip such rows)")


def read_csv_rows(path: str) -> tuple[list[str], list[list[str]], list[int]]:
    """Reads a CSV's header and rows with the csv module (quoted fields with commas stay one field).

    Trailing empty fields are ignored (spreadsheets add them); a row with more fields than the header is an error
    naming the file and row (its values would shift into the wrong columns); a shorter row is padded with ''.

    Returns:
      (header, rows, the file's row number of each row: blank rows are left out but counted).
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            try:
                header = [h.strip() for h in next(reader)]
            except StopIteration:
                raise DataError(f"{path}: empty file") from None
            while header and not header[-1]:
                header.pop()
            rows, lines = [], []
            for line, r in enumerate(reader, start=2):
                while r and not r[-1].strip():
                    r = r[:-1]
                if not r:
                    continue
                if len(r) > len(header):
                    raise DataError(f"{path} row {line}: {len(r)} fields, the header has {len(header)} (a value with "
                                    "an unquoted comma?)")
                rows.append(r + [""] * (len(header) - len(r)))
                lines.append(line)
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: not a readable UTF-8 CSV ({e})") from None
    return header, rows, lines


def check_one_row_per_file(rows: list[Row], skipped: list, on_error: str) -> list[Row]:
    """Refuses a second row for one image file (e.g. 'a.png' and './a.png'): the same image under two ids could land
    in two splits, with two labels."""
    first: dict[str, Row] = {}
    kept = []
    for row in rows:
        if row.path is not None:
            real = os.path.realpath(row.path)
            if real in first:
                row_problem(skipped, on_error, row.where or row.id,
                            f"the image file {real} is already the image of {first[real].where or first[real].id}")
                continue
            first[real] = row
        kept.append(row)
    return kept


def check_inside(rows: list[Row], roots: list[str], skipped: list, on_error: str) -> list[Row]:
    """Refuses rows whose image resolves (symlinks and '..' included) outside every folder in `roots`."""
    real_roots = [os.path.realpath(r) for r in roots]
    kept = []
    for row in rows:
        if row.path is not None:
            real = os.path.realpath(row.path)
            if not any(os.path.commonpath([real, root]) == root for root in real_roots):
                row_problem(skipped, on_error, row.where or row.id,
                            f"image {row.path} resolves to {real}, outside {' and '.join(roots)} (pass "
                            "--allow_external_paths if that is intended)")
                continue
        kept.append(row)
    return kept


def check_unique_ids(ids: list[str], path: str, lines: list[int] | None = None) -> None:
    seen: dict[str, int] = {}
    for line, image_id in zip(lines or range(2, len(ids) + 2), ids):
        if image_id in seen:
            raise DataError(f"{path}: duplicate image id {image_id!r} (rows {seen[image_id]} and {line})")
        seen[image_id] = line


def require_columns(header: list[str], required: list[str], path: str) -> None:
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; header is {header}")


def one_hot_label(values: list[str], where: str, class_names: list[str], single_label: bool,
                  skipped: list, on_error: str) -> np.ndarray | None:
    """Parses one row of per-class 0/1 columns. Returns None when the row was skipped."""
    try:
        label = np.array([float(v) for v in values], dtype=np.float32)
    except ValueError:
        row_problem(skipped, on_error, where, f"non-numeric label value in {values}")
        return None
    if not np.all((label == 0.0) | (label == 1.0)):
        row_problem(skipped, on_error, where, f"label values must be 0 or 1, got {values}")
        return None
    positives = int(label.sum())
    if single_label and positives != 1:
        names = [c for c, v in zip(class_names, label) if v]
        row_problem(skipped, on_error, where,
                    f"single-label row has {positives} positive classes {names} (need exactly 1)")
        return None
    return label
