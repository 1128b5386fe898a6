"""STSC training batches: their composition, their two augmented views, and a builder for in-memory data.

A batch (what `STSCModel.train_step` takes; `stsc_tf.models.stsc.REQUIRED_KEYS`):
    student_view [B, S, S, 3] float32   teacher_view [B, S, S, 3] float32 (independent draws of the augmentation)
    label        [B, K] float32 (zeros for unlabeled samples: their labels never reach the model)
    labeled      [B] float32 1/0        index [B] int64 (the sample's row of the TSC memory: 0..N-1)
(`labeled` is a float 0/1 mask, not bool: under a distribution strategy Keras may average a batch, and a bool tensor
cannot be averaged.)

Keras hands replica r of R the contiguous rows [r B/R, (r+1) B/R) of a global batch, so each batch is composed of R
slices, each holding `labeled_per_batch / R` samples of D_L followed by `(B - labeled_per_batch) / R` of D_U. An
"epoch" is ceil(|D_L| / labeled_per_batch) batches (SRC-MT's meaning) unless given.

`stsc_dataset` builds such batches from what a Keras user has: arrays (`images, labels, labeled_mask`) or a
`tf.data.Dataset` of `(image, label)` pairs plus a labeled mask. Views are resized to `image_size`, augmented
(SRC-MT's affine + flip, `stsc_tf.data.augment`) and normalised by `preprocess` ('imagenet' as the record pipeline
does, or None for 0..255 pixels); `preprocess_images` applies the same evaluation preprocessing for `evaluate` and
`predict`.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import tensorflow as tf

from stsc_tf.data import augment
from stsc_tf.errors import ConfigError

AUTOTUNE = tf.data.AUTOTUNE


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """SRC-MT's view augmentation: RandomAffine(degrees=10, translate=(0.02, 0.02)) + RandomHorizontalFlip."""

    rotation_deg: float = 10.0
    translate: float = 0.02
    hflip: bool = True


def check_batch(batch_size: int, labeled_per_batch: int, num_replicas: int) -> None:
    """Raises ConfigError naming the flag when the batch cannot be composed as asked."""
    if batch_size < 1 or labeled_per_batch < 1:
        raise ConfigError(f"--batch_size ({batch_size}) and --labeled_per_batch ({labeled_per_batch}) must be >= 1")
    if labeled_per_batch >= batch_size:
        raise ConfigError(f"--labeled_per_batch ({labeled_per_batch}) must be smaller than --batch_size "
                          f"({batch_size}): the rest of the batch is unlabeled data")
    if batch_size % num_replicas:
        raise ConfigError(f"--batch_size ({batch_size}) is not divisible by the {num_replicas} replicas")
    if labeled_per_batch % num_replicas:
        raise ConfigError(f"--labeled_per_batch ({labeled_per_batch}) is not divisible by the {num_replicas} "
                          "replicas: every replica's slice must hold the same share of labeled samples")


def compose(labeled: tf.data.Dataset, unlabeled: tf.data.Dataset, *, per_labeled: int, per_unlabeled: int,
            num_replicas: int, has_unlabeled: bool) -> tf.data.Dataset:
    """Zips two endless streams of {image, label, index} slices into global batches of R replica slices.

    Args:
      labeled, unlabeled: datasets already batched per slice ([per_labeled, ...] and [per_unlabeled, ...]).
      has_unlabeled: False when every sample is labeled (ratio 1): the second stream then keeps its labels.
    """

    def one_slice(l, u):  # labeled rows first, then unlabeled
        mask = tf.concat([tf.ones([per_labeled]), tf.fill([per_unlabeled], 0.0 if has_unlabeled else 1.0)], 0)  # [b]
        label = tf.concat([l["label"], u["label"]], 0) * mask[:, None]  # [b, K]
        return {"image": tf.concat([l["image"], u["image"]], 0), "label": label, "labeled": mask,
                "index": tf.concat([l["index"], u["index"]], 0)}

    ds = tf.data.Dataset.zip(labeled, unlabeled).map(one_slice).batch(num_replicas, drop_remainder=True)
    # [R, b, ...] -> [R * b, ...]
    return ds.map(lambda s: {k: tf.reshape(v, tf.concat([[-1], tf.shape(v)[2:]], 0)) for k, v in s.items()})


def two_views(batch: dict, seeds: tf.Tensor, image_size: int, aug: Augmentation, preprocess="imagenet",
              batch_size: int | None = None) -> dict:
    """The batch's images -> two independently augmented, preprocessed views.

    Args:
      batch: {image [B, S, S, 3] uint8/float 0..255, label, labeled, index}.
      seeds: [2, 2] int64, one stateless seed per view.
    """
    image = tf.cast(batch["image"], tf.float32)
    image.set_shape([batch_size, image_size, image_size, 3])
    views = []
    for v in range(2):
        view = augment.random_affine(image, seeds[v], aug.rotation_deg, aug.translate, aug.hflip)
        views.append(_preprocess(view, preprocess))
    return {"student_view": views[0], "teacher_view": views[1], "label": batch["label"],
            "labeled": batch["labeled"], "index": batch["index"]}


def _preprocess(pixels: tf.Tensor, preprocess) -> tf.Tensor:
    if preprocess == "imagenet":
        return augment.normalize(pixels)
    if preprocess is None:
        return pixels
    if callable(preprocess):
        return preprocess(pixels)
    raise ValueError(f"preprocess must be 'imagenet', None or a function, got {preprocess!r}")


def preprocess_images(images, image_size: int, preprocess="imagenet") -> tf.Tensor:
    """Evaluation inputs from pixels (0..255, [N, H, W, C], grayscale or RGB): resize (antialiased) + preprocess.

    The same evaluation preprocessing as the record pipeline and serving (`augment.eval_preprocess`) when
    preprocess='imagenet'.
    """
    images = _as_rgb(tf.convert_to_tensor(images))
    return _preprocess(augment.resize(images, image_size), preprocess)


def _as_rgb(images: tf.Tensor) -> tf.Tensor:
    if images.shape[-1] == 1:
        return tf.image.grayscale_to_rgb(images)
    if images.shape[-1] != 3:
        raise ValueError(f"images must have 1 or 3 channels, got shape {images.shape}")
    return images


def _labels_2d(labels: np.ndarray, n: int, num_classes: int | None) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim == 1:  # class indices
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError("labels must be class indices [N] (integers) or one-hot / multi-hot [N, K]")
        if num_classes is None:  # the highest index present would silently drop an absent last class
            raise ValueError("class indices need num_classes=K (the model's number of classes)")
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"class indices must lie in 0..{num_classes - 1}; found {labels.min()}..{labels.max()}")
        labels = np.eye(num_classes, dtype=np.float32)[labels]
    if labels.ndim != 2 or len(labels) != n:
        raise ValueError(f"labels must be [N, K] or [N] with N = {n} images, got shape {labels.shape}")
    if num_classes is not None and labels.shape[1] != num_classes:
        raise ValueError(f"labels have {labels.shape[1]} columns; num_classes is {num_classes}")
    return labels.astype(np.float32)


def stsc_dataset(images, labels=None, labeled=None, *, batch_size: int, labeled_per_batch: int,
                 image_size: int | None = None, num_classes: int | None = None, num_samples: int | None = None,
                 num_replicas: int = 1, steps_per_epoch: int | None = None, augmentation: Augmentation = Augmentation(),
                 preprocess="imagenet", shuffle_buffer: int = 4096, seed: int = 0) -> tf.data.Dataset:
    """STSC training batches from in-memory arrays or a dataset of (image, label) pairs.

    One pass over the returned dataset is one epoch (`steps_per_epoch` batches, default
    ceil(|D_L| / labeled_per_batch)); every pass reshuffles and draws new augmentations (deterministic by `seed`),
    so `model.fit(ds, epochs=E)` needs no other argument.

    Args:
      images: [N, H, W, C] array (uint8 or float pixels 0..255; C = 1 or 3), or a finite `tf.data.Dataset` of
        (image [H, W, C], label) pairs — the labeled mask then refers to the dataset's order.
      labels: [N, K] one-hot / multi-hot or [N] class indices (arrays only; indices need `num_classes`).
      labeled: [N] bool mask of the samples whose labels the model may see (default: all).
      batch_size, labeled_per_batch: the GLOBAL batch and its labeled share (SRC-MT: 48 and 12).
      image_size: side of the square views (default: the images' height).
      num_classes: K; required for class indices (arrays, or a dataset's scalar labels), checked otherwise.
      num_samples: N for a dataset whose length is unknown.
      num_replicas: replicas the global batch is split over (each slice gets the same labeled share).
      preprocess: 'imagenet' (ImageNet mean/std, as the record pipeline), None (0..255), or a function of
        float pixels [B, S, S, 3].

    Returns:
      A tf.data.Dataset of the batch dicts described in the module docstring; its cardinality is the epoch length
      (STSCModel.fit reads it for its schedules).
    """
    check_batch(batch_size, labeled_per_batch, num_replicas)
    if isinstance(images, tf.data.Dataset):
        source = images
        n = num_samples or int(source.cardinality())
        if n <= 0:
            raise ValueError("the dataset's length is unknown: pass num_samples=N")
        if labels is not None:
            raise ValueError("with a dataset of (image, label) pairs, leave labels=None")
        spec = source.element_spec
        if isinstance(spec, dict):
            raise ValueError(f"a dataset of dicts (keys {sorted(spec)}) is not taken: map it to (image, label) pairs, "
                             "e.g. ds.map(lambda d: (d['image'], d['label']))")
        if not isinstance(spec, tuple) or len(spec) != 2:
            raise ValueError(f"the dataset's elements must be (image, label) pairs, got {spec}; unlabeled images "
                             "too need a label slot (any value) with labeled=False")
        if spec[0].shape.rank not in (None, 3):
            raise ValueError(f"the dataset's images have shape {spec[0].shape}; expected one image [H, W, C] per "
                             "element: pass the dataset unbatched (ds.unbatch())")
        label_spec = spec[1]
        if label_spec.shape.rank == 0 or (label_spec.shape.rank == 1 and label_spec.shape[0] == 1
                                          and label_spec.dtype.is_integer and num_classes != 1):
            if not label_spec.dtype.is_integer or num_classes is None:
                raise ValueError("a dataset of (image, class index) pairs needs integer indices and num_classes=K")
            def to_label(y):  # an index outside 0..K-1 would be a row of zeros: refused
                y = tf.reshape(y, [])
                with tf.control_dependencies([tf.debugging.assert_non_negative(
                        y, message=f"class indices must lie in 0..{num_classes - 1}"), tf.debugging.assert_less(
                        y, tf.cast(num_classes, y.dtype), message=f"class indices must lie in 0..{num_classes - 1}")]):
                    return tf.one_hot(y, num_classes)
        elif label_spec.shape.rank != 1 or (num_classes is not None and label_spec.shape[0] not in (None,
                                                                                                   num_classes)):
            raise ValueError(f"the dataset's labels have shape {label_spec.shape}; expected [K] one-hot / multi-hot "
                             "or a scalar class index")
        else:
            to_label = lambda y: tf.cast(y, tf.float32)  # noqa: E731
        source = source.enumerate().map(lambda i, pair: {"image": pair[0], "label": to_label(pair[1]), "index": i})
    else:
        images = np.asarray(images)
        if images.ndim != 4:
            raise ValueError(f"images must be [N, H, W, C], got shape {images.shape}")
        n = len(images)
        if labels is None:
            raise ValueError("labels are required with an image array")
        source = tf.data.Dataset.from_tensor_slices({"image": images, "label": _labels_2d(labels, n, num_classes),
                                                     "index": np.arange(n, dtype=np.int64)})
    mask = np.ones(n, bool) if labeled is None else np.asarray(labeled, bool)
    if mask.shape != (n,):
        raise ValueError(f"labeled must be a [N] mask with N = {n}, got shape {mask.shape}")
    if not mask.any():
        raise ValueError("labeled marks no sample: STSC needs labeled samples")
    size = image_size or int(source.element_spec["image"].shape[0] or 0)
    if not size:
        raise ValueError("image_size is required when the images' height is not static")

    def prepare(element):  # [H, W, C] -> [S, S, 3] float 0..255
        image = _as_rgb(tf.cast(element["image"], tf.float32))
        image = tf.image.resize(image, [size, size], method="bilinear", antialias=True)
        return {**element, "image": image}

    has_unlabeled = not mask.all()
    member = tf.constant(mask)
    per_l = labeled_per_batch // num_replicas
    per_u = (batch_size - labeled_per_batch) // num_replicas
    unl_member = tf.logical_not(member) if has_unlabeled else member

    def stream(keep, count, stream_seed, per_slice):
        ds = source.filter(lambda e: tf.gather(keep, e["index"])).map(prepare, num_parallel_calls=AUTOTUNE)
        ds = ds.shuffle(min(shuffle_buffer, count), seed=stream_seed, reshuffle_each_iteration=True).repeat()
        return ds.batch(per_slice, drop_remainder=True)

    lab = stream(member, int(mask.sum()), seed, per_l)
    unl = stream(unl_member, int((~mask).sum()) if has_unlabeled else int(mask.sum()), seed + 1, per_u)
    steps = steps_per_epoch or math.ceil(int(mask.sum()) / labeled_per_batch)
    batches = compose(lab, unl, per_labeled=per_l, per_unlabeled=per_u, num_replicas=num_replicas,
                      has_unlabeled=has_unlabeled).take(steps)
    # New augmentation draws on every pass, deterministic by seed: one [2, 2] stateless seed pair per batch.
    view_seeds = tf.data.Dataset.random(seed=seed + 2, rerandomize_each_iteration=True).batch(4).map(
        lambda s: tf.reshape(s, [2, 2]))
    ds = tf.data.Dataset.zip(batches, view_seeds).map(
        lambda b, s: two_views(b, s, size, augmentation, preprocess, batch_size), num_parallel_calls=AUTOTUNE)
    return ds.apply(tf.data.experimental.assert_cardinality(steps)).prefetch(AUTOTUNE)
