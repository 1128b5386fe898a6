"""Raw dataset layouts: one loader module per layout (isic2018, chestxray14, csv_folder), and `load_source`.

A loader validates the tables (columns, label values, duplicate ids) and resolves image paths; it does not decode
images (the converter does that, in parallel). The shared types and checks are in `common.py`.
"""

from __future__ import annotations

import os
from typing import Callable

from stsc_tf.data.sources import chestxray14, csv_folder, isic2018
from stsc_tf.data.sources.common import (MULTI_LABEL, SINGLE_LABEL, Row, Source, check_inside, check_on_error,
                                         check_one_row_per_file, read_csv_rows)
from stsc_tf.errors import DataError

__all__ = ["DATASETS", "MULTI_LABEL", "SINGLE_LABEL", "Row", "Source", "load_source", "read_csv_rows"]


LOADERS: dict[str, Callable[..., Source]] = {"isic2018": isic2018.load, "chestxray14": chestxray14.load,
                                            "csv_folder": csv_folder.load}
DATASETS = tuple(LOADERS)


def load_source(dataset: str, source_dir: str, *, on_error: str = "fail", allow_external_paths: bool = False,
                **kwargs) -> Source:
    """Loads a raw layout by name ('isic2018' | 'chestxray14' | 'csv_folder').

    Unless `allow_external_paths`, an image that resolves outside the source folder (or csv_folder's image_dir) is
    refused, naming its row (or skipped and counted with on_error='skip').
    """
    if dataset not in LOADERS:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {sorted(LOADERS)}")
    check_on_error(on_error)
    if not os.path.isdir(source_dir):
        raise DataError(f"source folder {source_dir!r} does not exist")
    if not os.listdir(source_dir):
        raise DataError(f"source folder {source_dir!r} is empty")
    source = LOADERS[dataset](source_dir, on_error=on_error, **kwargs)
    if not allow_external_paths:
        roots = [source_dir] + ([kwargs["image_dir"]] if kwargs.get("image_dir") else [])
        source.rows = check_inside(source.rows, roots, source.skipped, on_error)
    source.rows = check_one_row_per_file(source.rows, source.skipped, on_error)
    if not source.rows:
        raise DataError(f"{source_dir}: no usable rows ({len(source.skipped)} skipped)")
    return source
