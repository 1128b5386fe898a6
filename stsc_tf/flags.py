"""Every absl flag, in one place, and their translation into the frozen Configs.

Nothing is defined at import time: each CLI calls its `define_*_flags()` under `if __name__ == "__main__"`, and
the first line of its `main()` turns the parsed flags into a Config. Library code never reads flags. Defaults
come from the dataclasses in `stsc_tf.config`, so there is one source of truth for each of them.
"""

from __future__ import annotations

import dataclasses

from absl import flags

from stsc_tf import config as config_lib
from stsc_tf.data.sources import DATASETS
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
    "dataset": ("raw layout", DATASETS),
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
    "max_image_pixels": ("images with more pixels (height x width, read from the header) are refused, or skipped "
                         "with --on_error=skip", None),
    "allow_external_paths": ("accept image paths or symlinks that resolve outside --source_dir / --image_dir "
                             "(refused by default, naming the row)", None),
}


def define_convert_flags() -> None:
    defaults = _defaults(config_lib.ConvertConfig)
    for name, (text, enum) in CONVERT_HELP.items():
        _define(name, defaults[name], text, enum)


def convert_config() -> config_lib.ConvertConfig:
    """The conversion's Config. `--verify` without `--source_dir` verifies an existing `--output_dir` instead."""
    kwargs = {name: FLAGS[name].value for name in CONVERT_HELP}
    kwargs["class_names"] = tuple(kwargs["class_names"] or ())
    if not kwargs["source_dir"] and not (kwargs["verify"] and kwargs["output_dir"]):
        raise ConfigError("--source_dir is required (or --verify --output_dir=DIR to check an existing conversion)")
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
    if FLAGS.num_images < 1 or FLAGS.image_size < 16:
        raise ConfigError("--num_images must be >= 1 and --image_size >= 16")
    return FLAGS.layout, FLAGS.out, FLAGS.num_images, FLAGS.image_size, FLAGS.seed


# Training flags: one per Config field (DataConfig.seed and TrainConfig.seed share --seed). Enums list the choices.
TRAIN_FLAGS = {
    "data": {
        "data_dir": "folder written by python -m stsc_tf.convert",
        "image_size": "square input side in pixels (SRC-MT: 224)",
        "batch_size": "GLOBAL batch size (paper: ISIC 64, ChestX-ray14 48)",
        "labeled_per_batch": "labeled samples in each global batch (SRC-MT: 12 of 48)",
        "labeled_ratio": "share of the train split that keeps its labels, in (0, 1]",
        "rotation_deg": "augmentation: max rotation in degrees (SRC-MT: 10)",
        "translate": "augmentation: max translation as a fraction of the size (SRC-MT: 0.02)",
        "hflip": "augmentation: random horizontal flip",
        "shuffle_buffer": "tf.data shuffle buffer in records",
        "cache": "keep decoded images in memory (small datasets)",
        "labeled_ids": ("'+'-separated CSVs with an 'id' column (and optionally 'labels': '|'-separated class names) "
                        "listing the labeled train images; overrides --labeled_ratio. E.g. "
                        "runs/r0/labeled_ids.csv+newly_labeled.csv after python -m stsc_tf.suggest"),
    },
    "model": {
        "backbone": "a registered backbone ({backbones}) or package.module:function, a builder of your own",
        "weights": "imagenet | none | PATH to a weights file of the backbone",
        "relation_layer": "layer whose output is the relation feature map ('' = last feature map)",
        "dropout": "dropout before the classifier (SRC-MT: 0.2)",
        "relation_features": ("flatten: the paper's reshaped map; avg: SRC-MT's pooled features after the "
                              "classifier's dropout (with --relation_layer: that layer's map, averaged); "
                              "avg_before_dropout: pooled, no dropout", config_lib.RELATION_FEATURES),
        "sync_bn": "synchronise BatchNorm statistics across replicas (Keras' synchronized layer)",
        "fused_bn": "TensorFlow's fused BatchNorm kernel (numerically Keras' layer; 0.72x the CPU STSC step time)",
    },
    "loss": {
        "consistency": "lambda_max, weight of the unsupervised objective (0 removes it)",
        "consistency_rampup": "ramp-up length in epochs (SRC-MT: 30; lambda changes once per epoch, as SRC-MT's)",
        "consistency_start_epoch": ("the consistency terms are on once the 0-based epoch index is > this (SRC-MT's "
                                    "'if epoch > 20': on from the 22nd epoch); -1 = from the first step"),
        "consistency_weight_c": "weight of L_c inside L_u (0 removes it)",
        "beta": "weight of L_sc (0 removes it)",
        "gamma": "weight of L_tc (0 removes it)",
        "class_weighted_consistency": ("weight L_c per class by 10000 / class count (SRC-MT), counted on the labeled "
                                       "subset and scaled to the dataset's size (SRC-MT counts the whole dataset)"),
        "class_weighted_supervised": ("weight the CE per class by 10000 / class count (as above), normalised by the "
                                      "summed weights (SRC-MT / PyTorch's CrossEntropyLoss(weight=...))"),
        "tsc_start_epoch": ("TSC is on once the fractional epoch is >= this (the paper's late training stage; note: "
                            "not the 'index > N' rule of --consistency_start_epoch)"),
        "tsc_tau": "TSC edge threshold's parameter (see --tsc_tau_mode); watch tsc_largest_component",
        "tsc_tau_mode": ("zscore: R_ij >= row mean + tau * row std (default); relative: tau/sqrt(B); absolute: tau; "
                         "quantile: the tau-quantile of R", config_lib.TAU_MODES),
        "tsc_edges": ("mutual: a pair is connected when R_ij and R_ji both pass the threshold; either: one of them",
                      config_lib.TSC_EDGES),
        "tsc_substructure": ("component: connected components; edge: stable edges only (ablation)",
                             ("component", "edge")),
        "tsc_memory_dtype": ("dtype of the TSC memory", ("float16", "float32")),
    },
    "train": {
        "model_dir": "the run folder (created; rerun the same command to resume)",
        "epochs": "epochs (SRC-MT: 100)",
        "steps_per_epoch": "0 = ceil(|D_L| / labeled_per_batch) (SRC-MT's epoch)",
        "learning_rate": "Adam's initial learning rate (paper: 1e-4)",
        "adam_epsilon": "Adam's epsilon (SRC-MT / PyTorch: 1e-8; Keras' own default is 1e-7)",
        "lr_decay": ("step: x rate after every epoch (SRC-MT); poly: (1 - e/E)^rate", ("step", "poly")),
        "lr_decay_rate": "the decay rate (paper: 0.9)",
        "weight_decay": "L2 coefficient (SRC-MT: 5e-4)",
        "ema_alpha": "teacher EMA decay ceiling (SRC-MT: 0.99)",
        "eval_with": ("network used for validation and checkpoint selection", ("student", "teacher")),
        "strategy": ("distribution strategy", ("auto", "none", "mirrored", "multi_worker")),
        "mixed_precision": ("precision policy", ("none", "mixed_float16", "mixed_bfloat16")),
        "jit_compile": "XLA-compile the train step (not under MirroredStrategy on logical CPU devices)",
        "threshold": "per-class threshold of the paper-protocol metrics (SRC-MT: 0.18)",
        "relation_every_epochs": "relation heatmaps every N epochs",
        "init_from": ("a run folder (its best checkpoint) or a student weights file to start from; the optimizer "
                      "and schedules start afresh"),
        "seed": "seed of the labeled subset, shuffling, augmentation and initialisation",
    },
}
_SECTIONS = {"data": config_lib.DataConfig, "model": config_lib.ModelConfig, "loss": config_lib.LossConfig,
             "train": config_lib.TrainConfig}


def define_train_flags(backbones: list[str] | None = None) -> None:
    """Defines the training flags; `backbones`, the registry's names, go into --backbone's help (the CLIs that
    train pass `stsc_tf.models.registered_backbones()`: this module stays free of TensorFlow)."""
    names = ", ".join(backbones) if backbones else "see stsc_tf.models.registered_backbones()"
    for section, entries in TRAIN_FLAGS.items():
        defaults = _defaults(_SECTIONS[section])
        for name, spec in entries.items():
            text, enum = spec if isinstance(spec, tuple) else (spec, None)
            _define(name, defaults[name], text.replace("{backbones}", names), enum)
    harmless = ", ".join(h.split(".", 1)[1] for h in config_lib.HARMLESS)
    _define("allow_changes", (), f"on a resume, settings that may differ from the stored run's (only: {harmless})")


def allowed_changes() -> tuple[str, ...]:
    return tuple(FLAGS.allow_changes or ())


def train_config() -> config_lib.Config:
    parts = {}
    for section, entries in TRAIN_FLAGS.items():
        kwargs = {name: FLAGS[name].value for name in entries}
        if section == "data":
            kwargs["seed"] = FLAGS.seed
        parts[section] = _SECTIONS[section](**kwargs)
    return config_lib.Config(**parts)


def define_evaluate_flags() -> None:
    _define("model_dir", "", "the run folder of python -m stsc_tf.train")
    _define("split", "test", "split to evaluate", ("train", "val", "test"))
    _define("networks", "both", "which network(s)", ("student", "teacher", "both"))
    _define("checkpoint", "best", "which checkpoint", ("best", "last"))
    _define("bootstrap", 200, "bootstrap resamples for the 95% intervals (0 = none)")
    _define("data_dir", "", "records folder (default: the run's; its classes must be the run's)")
    _define("fit_thresholds", False, "first fit per-class thresholds and a calibration on the VALIDATION split and "
            "store them in <model_dir>/calibration.json (used by predict, export and the tables)")
    _define("threshold_criterion", "youden", "how --fit_thresholds chooses each class's threshold: Youden's J "
            "(max TPR - FPR) or max F1", ("youden", "f1"))
    _define("calibration", "temperature", "--fit_thresholds' calibration: temperature scaling, or per-class Platt "
            "(multi-label only)", ("temperature", "platt"))
    _define("thresholds", "paper", "paper: tables at the paper's 0.18 (plus validated rows when calibration.json "
            "exists); validated: require calibration.json", ("paper", "validated"))


def evaluate_args() -> dict:
    if not FLAGS.model_dir:
        raise ConfigError("--model_dir is required")
    if FLAGS.bootstrap < 0:
        raise ConfigError(f"--bootstrap must be >= 0, got {FLAGS.bootstrap}")
    which = ("student", "teacher") if FLAGS.networks == "both" else (FLAGS.networks,)
    return dict(model_dir=FLAGS.model_dir, split=FLAGS.split, which=which, checkpoint=FLAGS.checkpoint,
                bootstrap=FLAGS.bootstrap, data_dir=FLAGS.data_dir, thresholds=FLAGS.thresholds,
                fit=FLAGS.fit_thresholds, criterion=FLAGS.threshold_criterion, method=FLAGS.calibration)


def define_reproduce_flags() -> None:
    _define("table", 4, "which table of the paper: 4 (consistency terms) or 3 (labeled ratios)")
    flags.register_validator("table", lambda v: v in (3, 4), message="--table must be 3 or 4")


def define_export_flags() -> None:
    _define("model_dir", "", "the run folder of python -m stsc_tf.train")
    _define("export_dir", "export", "base folder; the model goes to <export_dir>/<name>/<version>/")
    _define("name", "stsc", "model name (TF Serving's MODEL_NAME)")
    _define("version", 1, "version number (an existing version folder is never overwritten)")
    _define("model", "", "student or teacher (default: the run's --eval_with)")
    _define("checkpoint", "best", "which checkpoint", ("best", "last"))
    _define("max_image_pixels", config_lib.MAX_IMAGE_PIXELS, "serving refuses images with more pixels (height x "
            "width from the header, before decoding) with InvalidArgumentError")


def _check_model() -> None:
    if FLAGS.model not in ("", "student", "teacher"):
        raise ConfigError(f"--model must be student or teacher, got {FLAGS.model!r}")


def export_args() -> dict:
    if not FLAGS.model_dir:
        raise ConfigError("--model_dir is required")
    _check_model()
    return dict(model_dir=FLAGS.model_dir, export_dir=FLAGS.export_dir, name=FLAGS.name, version=FLAGS.version,
                which=FLAGS.model, checkpoint=FLAGS.checkpoint, max_pixels=FLAGS.max_image_pixels)


def define_explain_flags() -> None:
    _define("model_dir", "", "the run folder of python -m stsc_tf.train")
    _define("images", "", "gradcam: image files (comma list or globs, ** recurses); default: the first test images")
    _define("out", "", "output folder (default: <model_dir>/gradcam, <model_dir>/relations, <model_dir>)")
    _define("model", "", "student or teacher (default: the run's --eval_with)")
    _define("class_name", "", "gradcam: explain this class (default: the predicted one)")
    _define("layer", "", "gradcam: layer of the map (default: the relation feature map)")
    _define("plus_plus", False, "gradcam: Grad-CAM++ instead of Grad-CAM")
    _define("num_images", 8, "gradcam: how many test images when --images is not given")
    _define("checkpoint", "best", "which checkpoint", ("best", "last"))
    _define("max_image_pixels", config_lib.MAX_IMAGE_PIXELS, "gradcam: images with more pixels are refused")
    _define("tsc_tau", -1.0, "substructures: the edge threshold (default: the run's --tsc_tau)")
    _define("tsc_tau_mode", "", "substructures: the threshold rule (default: the run's --tsc_tau_mode)",
            ("",) + config_lib.TAU_MODES)
    _define("data_dir", "", "where the run's records are now, if they moved (default: the folder in run.json)")


def explain_args(command: str) -> dict:
    if not FLAGS.model_dir:
        raise ConfigError("--model_dir is required")
    if command == "relations":
        return dict(model_dir=FLAGS.model_dir, out=FLAGS.out, checkpoint=FLAGS.checkpoint, data_dir=FLAGS.data_dir)
    if command == "substructures":
        return dict(model_dir=FLAGS.model_dir, out=FLAGS.out, checkpoint=FLAGS.checkpoint,
                    tau=None if FLAGS.tsc_tau < 0 else FLAGS.tsc_tau, tau_mode=FLAGS.tsc_tau_mode,
                    data_dir=FLAGS.data_dir)
    _check_model()
    if FLAGS.num_images < 1:
        raise ConfigError(f"--num_images must be >= 1, got {FLAGS.num_images}")
    return dict(model_dir=FLAGS.model_dir, images=FLAGS.images, out=FLAGS.out or f"{FLAGS.model_dir}/gradcam",
                which=FLAGS.model, class_name=FLAGS.class_name, layer=FLAGS.layer, plus_plus=FLAGS.plus_plus,
                checkpoint=FLAGS.checkpoint, num_images=FLAGS.num_images, max_pixels=FLAGS.max_image_pixels,
                data_dir=FLAGS.data_dir)


def define_predict_flags() -> None:
    _define("model_dir", "", "the run folder of python -m stsc_tf.train")
    _define("images", "", "image files: comma list or globs ('new/**/*.jpg' recurses)")
    _define("image_list", "", "a text file with one image path per line (instead of --images)")
    _define("data_dir", "", "records folder to predict a split of (with --split; instead of --images)")
    _define("split", "test", "with --data_dir: the split", ("train", "val", "test"))
    _define("out", "predictions.csv",
            "the output CSV (written atomically); skipped files go to <out stem>.skipped.csv beside it")
    _define("model", "", "student or teacher (default: the run's --eval_with)")
    _define("batch_size", 32, "images per forward pass")
    _define("thresholds", "paper", "decisions at the paper's 0.18, or at the thresholds and calibration fitted by "
            "evaluate --fit_thresholds", ("paper", "validated"))
    _define("checkpoint", "best", "which checkpoint", ("best", "last"))
    _define("max_image_pixels", config_lib.MAX_IMAGE_PIXELS, "larger images are skipped (listed with the reason)")


def predict_args() -> dict:
    if not FLAGS.model_dir:
        raise ConfigError("--model_dir is required")
    sources = [bool(FLAGS.images), bool(FLAGS.image_list), bool(FLAGS.data_dir)]
    if sum(sources) != 1:
        raise ConfigError("give exactly one of --images, --image_list or --data_dir (with --split)")
    _check_model()
    if FLAGS.batch_size < 1:
        raise ConfigError(f"--batch_size must be >= 1, got {FLAGS.batch_size}")
    if not FLAGS.out:
        raise ConfigError("--out is required")
    return dict(model_dir=FLAGS.model_dir, images=FLAGS.images, image_list=FLAGS.image_list,
                data_dir=FLAGS.data_dir, split=FLAGS.split, out=FLAGS.out, which=FLAGS.model,
                batch_size=FLAGS.batch_size, thresholds=FLAGS.thresholds, checkpoint=FLAGS.checkpoint,
                max_pixels=FLAGS.max_image_pixels)


def define_suggest_flags() -> None:
    _define("model_dir", "", "the run folder of python -m stsc_tf.train")
    _define("budget", 200, "how many images to suggest")
    _define("out", "", "the output CSV (default: <model_dir>/to_label.csv); a thumbnail sheet beside it")
    _define("diversity", 1.0, "weight of the redundancy penalty (max cosine similarity to the chosen and labeled "
            "images); 0 = rank by uncertainty alone")
    _define("batch_size", 64, "images per forward pass")
    _define("checkpoint", "best", "which checkpoint", ("best", "last"))
    _define("data_dir", "", "where the run's records are now, if they moved (default: the folder in run.json)")


def suggest_args() -> dict:
    if not FLAGS.model_dir:
        raise ConfigError("--model_dir is required")
    if FLAGS.budget < 1:
        raise ConfigError(f"--budget must be >= 1, got {FLAGS.budget}")
    return dict(model_dir=FLAGS.model_dir, budget=FLAGS.budget, out=FLAGS.out, diversity=FLAGS.diversity,
                batch_size=FLAGS.batch_size, checkpoint=FLAGS.checkpoint, data_dir=FLAGS.data_dir)
