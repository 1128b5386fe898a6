"""Frozen configuration dataclasses: the one home of every default hyper-parameter.

Library code takes these objects, never flags. `stsc_tf/flags.py` turns absl flags into a `Config`; tests
build them directly. Where the paper is silent, the default is SRC-MT's (the protocol STSC follows) and the
comment beside it says so.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from stsc_tf.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision / SRC-MT normalisation, in [0, 1] pixel units
IMAGENET_STD = (0.229, 0.224, 0.225)
# Images above this many pixels are refused before they are decoded (converter, predict, explain, serving): a
# 40-megapixel image needs about 0.5 GB to decode and resize, and a small PNG can declare 16000 x 16000 (3.6 GB).
# 40 MP covers dermoscopy (up to 6000 x 6000), radiographs and mammograms; each command has a flag to change it.
MAX_IMAGE_PIXELS = 40_000_000

# The choices of the settings below, defined once (the flags and the code that acts on them use these).
RELATION_FEATURES = ("flatten", "avg", "avg_before_dropout")
TAU_MODES = ("zscore", "relative", "absolute", "quantile")
TSC_EDGES = ("mutual", "either")
# Settings a resumed run may change, when the user allows them by name (--allow_changes): they change neither the
# model nor the data nor the computation of a step. `epochs` is refused under lr_decay=poly (the schedule depends
# on it). Not `strategy`: with unsynchronised BatchNorm another replica count is another computation.
HARMLESS = ("train.epochs", "train.relation_every_epochs", "train.threshold", "train.jit_compile", "data.cache")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the records are and how batches are composed.

    Attributes:
      data_dir: folder written by `python -m stsc_tf.convert` (must hold a valid manifest.json).
      image_size: square side the images are resized to (SRC-MT: 224).
      batch_size: GLOBAL batch size (ISIC 64 per the paper; ChestX-ray14 48).
      labeled_per_batch: labeled samples in each global batch (SRC-MT: 12 of 48, so 16 of 64).
      labeled_ratio: share of the train split that keeps its labels, 0 < r <= 1.
      rotation_deg / translate: SRC-MT's RandomAffine(degrees=10, translate=(0.02, 0.02)).
      hflip: SRC-MT's RandomHorizontalFlip.
      shuffle_buffer: tf.data shuffle buffer (records, not batches).
      cache: keep decoded, resized uint8 images in memory (small datasets only).
      labeled_ids: '+'-separated CSV files whose `id` column lists the labeled train images (and, optionally, a
        `labels` column of '|'-separated class names that replaces the records' labels); overrides labeled_ratio.
        The files `python -m stsc_tf.suggest` feeds back: `runs/r0/labeled_ids.csv+newly_labeled.csv`.
      seed: seeds the labeled-subset choice, shuffling and augmentation draws.
    """

    data_dir: str = ""
    image_size: int = 224
    batch_size: int = 64
    labeled_per_batch: int = 16
    labeled_ratio: float = 0.2
    rotation_deg: float = 10.0
    translate: float = 0.02
    hflip: bool = True
    shuffle_buffer: int = 2048
    cache: bool = False
    labeled_ids: str = ""
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The network.

    Attributes:
      backbone: a registered backbone name (`stsc_tf.models.registered_backbones()`) or `package.module:function`.
      weights: 'imagenet', 'none', or a path to a weights file for the backbone.
      relation_layer: name of the layer whose output is the relation feature map; '' = the last feature map
        after its activation (the backbone's default).
      dropout: dropout before the classifier (SRC-MT: 0.2 after pooling).
      relation_features: 'flatten' (paper: D^l = F^l reshaped), 'avg' (SRC-MT: the pooled features after the
        classifier's dropout), or 'avg_before_dropout' (the pooled features, no dropout).
      sync_bn: synchronise BatchNorm statistics across replicas (Keras' synchronized layer).
      fused_bn: TensorFlow's fused BatchNorm kernel (numerically Keras' layer; the DenseNet-121 STSC step in 0.72x
        the time on CPU, BUILD.md).
    """

    backbone: str = "densenet121"
    weights: str = "none"
    relation_layer: str = ""
    dropout: float = 0.2
    relation_features: str = "flatten"
    sync_bn: bool = False
    fused_bn: bool = True


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Loss weights and the temporal sub-structure (TSC) settings. A weight of 0 removes its term.

    Attributes:
      consistency: lambda_max, the weight of the unsupervised objective L_u (eq. 7). SRC-MT: 1.
      consistency_rampup: ramp length L in epochs of lambda(e) = lambda_max exp(-5 (1 - e/L)^2). SRC-MT: 30.
      consistency_start_epoch: the consistency terms are on once the whole epoch index e (0-based) is > this,
        i.e. after start + 1 finished epochs; SRC-MT's `if epoch > 20`. -1 = from the first step.
      consistency_weight_c: weight of L_c inside L_u (paper: 1).
      beta: weight of L_sc (paper: 1).
      gamma: weight of L_tc (paper: 1).
      class_weighted_consistency: weight the L_c squared error per class by 10000 / class count (SRC-MT).
      class_weighted_supervised: weight L_s per class by 10000 / class count (SRC-MT's weighted CE; normalised by
        the sum of the weights, PyTorch's `CrossEntropyLoss(weight=...)`). The counts are the labeled subset's.
      tsc_start_epoch: TSC is on from this epoch (the paper's "late training stage").
      tsc_tau: the edge threshold's parameter (see tsc_tau_mode).
      tsc_tau_mode: 'zscore' (default: an edge where R_ij >= mean + tau * std of row i's off-diagonal entries; on
        real post-ReLU features the entries all sit near 1/sqrt(B), and only a rule relative to each row's spread
        yields sub-structures, BUILD.md) | 'relative' (tau / sqrt(B)) | 'absolute' (tau, eq. 5 literally) |
        'quantile' (the tau-quantile of the off-diagonal entries: a fixed edge density).
      tsc_edges: 'mutual' (default: a pair is connected when R_ij and R_ji both pass the threshold) | 'either'.
      tsc_substructure: 'component' (connected components of the stable graph) | 'edge' (ablation: P = S).
      tsc_memory_dtype: dtype of the per-sample relation-feature memory.
    """

    consistency: float = 1.0
    consistency_rampup: float = 30.0
    consistency_start_epoch: float = 20.0
    consistency_weight_c: float = 1.0
    beta: float = 1.0
    gamma: float = 1.0
    class_weighted_consistency: bool = False
    class_weighted_supervised: bool = False
    tsc_start_epoch: float = 40.0
    tsc_tau: float = 1.0
    tsc_tau_mode: str = "zscore"
    tsc_edges: str = "mutual"
    tsc_substructure: str = "component"
    tsc_memory_dtype: str = "float16"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation and run control.

    Attributes:
      model_dir: the run folder.
      epochs: SRC-MT: 100.
      steps_per_epoch: 0 = ceil(|D_L| / labeled_per_batch) (SRC-MT's meaning of an epoch).
      learning_rate: Adam's initial rate (paper: 1e-4).
      adam_epsilon: Adam's epsilon (PyTorch's default 1e-8, SRC-MT's; Keras' own default is 1e-7).
      lr_decay: 'step' (x lr_decay_rate after every epoch, SRC-MT's code) | 'poly' (the other reading of the paper).
      lr_decay_rate: 0.9 per the paper.
      weight_decay: L2 on the kernels, added to the loss (SRC-MT's Adam weight_decay=5e-4 is coupled L2).
      ema_alpha: teacher EMA decay ceiling (SRC-MT: 0.99).
      eval_with: 'student' | 'teacher', the model test_step and the checkpoint selection use.
      strategy: 'auto' | 'none' | 'mirrored' | 'multi_worker'.
      mixed_precision: 'none' | 'mixed_float16' | 'mixed_bfloat16'.
      jit_compile: XLA for train_step (fails under MirroredStrategy on logical CPU devices: a TF limitation).
      threshold: per-class probability threshold of the paper-protocol metrics (SRC-MT: 0.18).
      relation_every_epochs: relation heatmaps of a fixed validation batch every N epochs (0 = never).
      init_from: a run folder (its best checkpoint) or a weights file to start the student and teacher from
        (e.g. the previous round of `suggest` -> label -> train); the optimizer and schedules start afresh.
      seed: global seed.
    """

    model_dir: str = ""
    epochs: int = 100
    steps_per_epoch: int = 0
    learning_rate: float = 1e-4
    adam_epsilon: float = 1e-8
    lr_decay: str = "step"
    lr_decay_rate: float = 0.9
    weight_decay: float = 5e-4
    ema_alpha: float = 0.99
    eval_with: str = "teacher"
    strategy: str = "auto"
    mixed_precision: str = "none"
    jit_compile: bool = False
    threshold: float = 0.18
    relation_every_epochs: int = 5
    init_from: str = ""
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a run needs; written to `<model_dir>/config.json`."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "Config":
        """The Config of a dict (missing settings take their defaults). Raises ConfigError naming an unknown key."""
        sections = {"data": DataConfig, "model": ModelConfig, "loss": LossConfig, "train": TrainConfig}
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object with sections {sorted(sections)}")
        unknown = [f"{k}" for k in d if k not in sections]
        for name, section in sections.items():
            fields = {f.name for f in dataclasses.fields(section)}
            unknown += [f"{name}.{k}" for k in d.get(name, {}) if k not in fields]
        if unknown:
            raise ConfigError(f"{source}: unknown setting(s) {unknown} (written by another version of stsc_tf, or "
                              "edited by hand)")
        return cls(**{name: section(**d.get(name, {})) for name, section in sections.items()})


@dataclasses.dataclass(frozen=True)
class ConvertConfig:
    """What `python -m stsc_tf.convert` does.

    Attributes:
      dataset: 'isic2018' | 'chestxray14' | 'csv_folder'.
      source_dir: the raw layout's folder.
      output_dir: where shards, split CSVs and manifest.json go (default: tfrecords/<dataset>).
      image_size: shorter side of the stored image (re-encoded, downscale only); 0 keeps the original bytes.
      num_shards: shards of the train split; val and test get proportionally fewer (at least 1).
      workers: processes that decode, validate and write (1 = in this process).
      split: 'random' (group-aware stratified 7:1:2 by seed) | 'official' (the dataset's own lists).
      split_dir: SRC-MT style training.csv / validation.csv / testing.csv (overrides `split`).
      seed: seeds the split and the order of records in the shards.
      on_error: 'fail' (first bad row or image is an error) | 'skip' (counted, reported, listed in manifest).
      overwrite: replace a finished conversion in output_dir.
      verify: read everything back and check it against the manifest.
      csv_path, image_dir, image_column, label_column, group_column, class_names, task: csv_folder options.
      max_image_pixels: images with more pixels are refused (or skipped with on_error='skip'), read from the header
        before decoding; PIL's decompression-bomb guard is set to the same limit.
      allow_external_paths: accept image paths (or symlinks) that resolve outside the source / image folder.
    """

    dataset: str = "isic2018"
    source_dir: str = ""
    output_dir: str = ""
    image_size: int = 256
    num_shards: int = 16
    workers: int = 2
    split: str = "random"
    split_dir: str = ""
    seed: int = 0
    on_error: str = "fail"
    overwrite: bool = False
    verify: bool = False
    csv_path: str = ""
    image_dir: str = ""
    image_column: str = "image"
    label_column: str = ""
    group_column: str = ""
    class_names: tuple = ()
    task: str = "single_label"
    max_image_pixels: int = MAX_IMAGE_PIXELS
    allow_external_paths: bool = False


def check_tsc_tau(tau: float, mode: str) -> None:
    """Refuses a TSC threshold parameter its rule cannot use (NaN, a quantile outside [0, 1], a negative level)."""
    if not math.isfinite(tau):
        raise ConfigError(f"--tsc_tau must be a finite number, got {tau}")
    if mode == "quantile" and not 0.0 <= tau <= 1.0:
        raise ConfigError(f"--tsc_tau={tau}: with --tsc_tau_mode=quantile it is a quantile in [0, 1]")
    if mode in ("relative", "absolute") and tau < 0:
        raise ConfigError(f"--tsc_tau={tau}: with --tsc_tau_mode={mode} it is a level >= 0")
