"""Every absl flag, in one place, and their translation into the frozen Configs.

Nothing is defined at import time: each CLI calls its `define_*_flags()` under `if __name__ == "__main__"`, and
the first line of its `main()` turns the parsed flags into a Config. Library code never reads flags. Defaults
come from the dataclasses in `stsc_tf.config`, so there is one source of truth for each of them.
"""

from __future__ import annotations

import dataclasses

from absl import flags

from stsc_tf import config as config_lib
from stsc_tf.errors import ConfigError

FLAGS = flags.FLAGS


def _defaults(cls) -> dict:
    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(cls)}


def _define(name: str, default, help_text: str, enum: tuple | None = None) -> None:
    if name in FLAGS:
        return
    if enum:
        flags.DEFINE_enum(name, default, list(enum), help_text)
    elif isinstance(default, bool):
        flags.DEFINE_bool(name, default, help_text)
    elif isinstance(default, int):
        flags.DEFINE_integer(name, default, help_text)
    elif isinstance(default, float):
        flags.DEFINE_float(name, default, help_text)
    elif isinstance(default, tuple):
        flags.DEFINE_list(name, list(default), help_text)
    else:
        flags.DEFINE_string(name, default, help_text)


CONVERT_HELP = {
    "dataset": ("raw layout", ("isic2018", "chestxray14", "csv_folder")),
    "source_dir": ("folder of the raw dataset", None),
    "output_dir": ("output folder (default: tfrecords/<dataset>)", None),
    "image_size": ("shorter side of the stored images, re-encoded (downscale only); 0 keeps the original bytes",
                   None),
    "num_shards": ("shards of the train split (val/test get proportionally fewer)", None),
    "workers": ("processes that decode and write", None),
    "split": ("random: group-aware stratified 7:1:2 by seed; official: the dataset's own lists",
              ("random", "official")),
    "split_dir": ("folder with SRC-MT style training.csv, validation.csv, testing.csv (overrides --split)", None),
    "seed": ("seed of the split and of the record order", None),
    "on_error": ("fail on the first bad row or image, or skip (counted, reported, listed in skipped.csv)",
                 ("fail", "skip")),
    "overwrite": ("replace a finished conversion in --output_dir", None),
    "verify": ("read everything back and check it against the manifest", None),
    "csv_path": ("csv_folder: the labels CSV (default <source_dir>/labels.csv)", None),
    "image_dir": ("csv_folder: the image folder (default <source_dir>)", None),
    "image_column": ("csv_folder: column with the image path or id", None),
    "label_column": ("csv_folder: one column of '|'-separated class names (else one 0/1 column per class)", None),
    "group_column": ("csv_folder: group (patient/lesion) column; images of a group share a split", None),
    "class_names": ("csv_folder: class names in order (default: from the CSV)", None),
    "task": ("csv_folder: single_label or multi_label", ("single_label", "multi_label")),
}


def define_convert_flags() -> None:
    defaults = _defaults(config_lib.ConvertConfig)
    for name, (text, enum) in CONVERT_HELP.items():
        _define(name, defaults[name], text, enum)


def convert_config() -> config_lib.ConvertConfig:
    kwargs = {name: FLAGS[name].value for name in CONVERT_HELP}
    kwargs["class_names"] = tuple(kwargs["class_names"] or ())
    if not kwargs["source_dir"]:
        raise ConfigError("--source_dir is required")
    return config_lib.ConvertConfig(**kwargs)


def define_synthetic_flags() -> None:
    _define("layout", "isic2018", "raw layout to write", ("isic2018", "chestxray14"))
    _define("out", "", "output folder")
    _define("num_images", 300, "number of images")
    _define("image_size", 96, "image side in pixels")
    _define("seed", 0, "seed")


def synthetic_args() -> tuple:
    if not FLAGS.out:
        raise ConfigError("--out is required")
    return FLAGS.layout, FLAGS.out, FLAGS.num_images, FLAGS.image_size, FLAGS.seed
