"""STSCModel: a Keras model that trains any student network with STSC (mean teacher + relation structure).

    f_s, z_s = student(student_view, training=True)     # f: relation features (map or vector), z: logits
    f_t, z_t = teacher(teacher_view, training=True)     # no gradient; dropout / batch-statistics BN are eta'
    L = L_s + lambda(e) (w_c L_c + beta L_sc + gamma L_tc)                    (eq. 7)

The student is any keras.Model with outputs (relation features, logits): `STSCModel.from_backbone(...)` builds one
from a registered backbone, `stsc_tf.models.with_relation_output` turns an ordinary classifier into one. The teacher
is made here: a clone of the student (functional and Sequential students via `keras.models.clone_model`, subclassed
ones via `from_config(get_config())`) that starts with the student's weights.

A batch is a dict (`stsc_tf.data.stsc_dataset` and the record pipeline both produce it; `REQUIRED_KEYS`):
    student_view [B, S, S, 3], teacher_view [B, S, S, 3]  two augmented views of the same images
    label [B, K]   (zeros where unlabeled)   labeled [B] 1/0   index [B] int64 (the sample's row of the TSC memory)

Loss terms are composable: `loss_terms(step)` returns `{name: Term(weight, value, reduction)}`; the total, the
per-replica scaling and the logged values follow from it. A subclass adds a term by extending `TERMS` and
`loss_terms` (README, "Subclass it").

Several replicas: relation features and indices are all-gathered, so R is over the GLOBAL batch; a per-sample term
(`reduction="sum"`) is this replica's share, divided by a global count; a term over the gathered batch
(`reduction="replicated"`) is divided by the replica count here, once. The replicas' summed gradients then equal the
single-device gradient (tested on 2 and 4 logical CPU devices). With unsynchronised BatchNorm each replica normalises
its own slice; `sync_bn` makes the replicas equal one device.

Teacher: never seen by the optimizer or the gradient tape, and out of `trainable_weights` (its variables are marked
non-trainable), while its layers stay `trainable` so its BatchNormalization normalises with batch statistics in
training mode, as SRC-MT's teacher does (Keras runs a non-trainable BatchNormalization layer in inference mode). The
EMA covers the student's trainable weights; BatchNorm moving statistics are NOT averaged: the teacher keeps its own,
from its own batches (SRC-MT's / mean teacher's `parameters()` loop).

Saved state: the weights of both networks, the TSC memory and seen flags, and the random state of every dropout
(and other seeded) layer, so a run restored from a checkpoint continues exactly, dropout included.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import keras
import numpy as np
import tensorflow as tf

from stsc_tf import losses, schedules
from stsc_tf.config import LossConfig
from stsc_tf.models import backbones
from stsc_tf.models.keras_internals import SkipSymbolicBuild, build_compiled_metrics, compiled_metrics, mark_built

REQUIRED_KEYS = ("student_view", "teacher_view", "label", "labeled", "index")


class Term(NamedTuple):
    """One loss term: its weight in the total and its value.

    reduction: 'sum' — `value` is this replica's share of a per-sample term (divided by a GLOBAL count), so the
    replicas' values add up to the term; 'replicated' — `value` is computed on the all-gathered global batch and is
    the same on every replica (the total takes 1 / replicas of it).
    """

    weight: Any
    value: tf.Tensor
    reduction: str = "sum"


@dataclasses.dataclass
class Step:
    """What one training step computed, for `loss_terms` (global = over the all-gathered global batch)."""

    data: dict  # this replica's slice of the batch
    labeled: tf.Tensor  # [b] bool
    student_logits: tf.Tensor  # [b, K]
    teacher_logits: tf.Tensor  # [b, K]
    r_student: tf.Tensor  # [B, B] global
    r_teacher: tf.Tensor  # [B, B] global
    r_prev: tf.Tensor  # [B, B] global, from the TSC memory
    seen: tf.Tensor  # [B] bool: the memory row holds a previous visit
    epoch: tf.Tensor  # fractional epoch of this step
    lam: tf.Tensor  # lambda(e)
    tsc_on: tf.Tensor  # bool scalar
    global_batch: tf.Tensor  # float scalar B
    monitors: dict = dataclasses.field(default_factory=dict)


def _replica_context():
    """The replica context when running under a multi-replica strategy, else None."""
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return None
    return ctx


def _for_keras(results: dict) -> dict:
    """Step results as Keras' trainer can reduce them.

    Under MultiWorkerMirroredStrategy Keras 3.15 reduces step results with strategy.reduce("MEAN", v, axis=0),
    which fails on scalars; the values here are already global (identical on every replica), so a [1] tensor
    reduces back to the same scalar.
    """
    if isinstance(tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy):
        return {k: tf.reshape(v, [1]) for k, v in results.items()}
    return results


def clone_network(student: keras.Model, image_shape=None, name: str = "teacher") -> keras.Model:
    """A new network of the student's architecture holding a copy of its weights (the teacher)."""
    if getattr(student, "inputs", None):
        teacher = keras.models.clone_model(student)
    else:
        try:
            teacher = student.__class__.from_config(student.get_config())
        except NotImplementedError as e:
            raise ValueError(f"the student {student.name!r} is a subclassed model without get_config(); STSCModel "
                             "makes the teacher with from_config(get_config()): implement get_config (and "
                             "from_config if needed), or build the network functionally") from e
        if image_shape is None:
            raise ValueError("a subclassed student needs image_shape=(H, W, C) so the teacher can be built")
        teacher(keras.ops.zeros((1, *image_shape)), training=False)
    if len(teacher.weights) != len(student.weights):
        raise ValueError(f"the teacher made from {student.name!r} has {len(teacher.weights)} weights, the student "
                         f"{len(student.weights)}: the student must be buildable from its config alone")
    for t, s in zip(teacher.weights, student.weights):
        t.assign(s)
    for v in teacher.weights:
        v.trainable = False  # out of trainable_weights; the layers stay trainable (batch-statistics BN)
    teacher.name = name
    return teacher


def _random_states(network: keras.Model) -> list:
    """The network's seed-generator states (dropout masks and other random ops), in layer order."""
    weights = {id(v) for v in network.weights}
    return [v for v in network.variables if id(v) not in weights]


@keras.saving.register_keras_serializable(package="stsc_tf")
class STSCModel(SkipSymbolicBuild, keras.Model):
    """The STSC mean teacher around a student network.

    Args:
      student: a keras.Model mapping images [B, S, S, C] to (relation features [B, h, w, D] or [B, D], logits
        [B, K]). See `from_backbone` and `stsc_tf.models.with_relation_output`.
      num_train: N, rows of the TSC memory (the training set's size; a batch's `index` selects rows).
      multi_label: sigmoid + BCE (ChestX-ray14) instead of softmax + CE.
      relation_reduction: how a 4-D relation map becomes [B, D]: 'flatten' (the paper's D^l) or 'avg' (spatial
        mean). A 2-D relation output is used as it is.
      loss_config: a LossConfig (or its dict): weights, ramp-up, TSC settings.
      steps_per_epoch: steps of one epoch, for the schedules' fractional epoch; None = taken from `fit`
        (its `steps_per_epoch` or the dataset's length).
      ema_alpha: the teacher's EMA decay ceiling.
      weight_decay: L2 coefficient (PyTorch Adam's coupled weight_decay: wd/2 ||w||^2 added to the loss).
      eval_with: 'student' | 'teacher': the network `call`, `evaluate` and `predict` use.
      class_weights: optional [K] list, used where the loss config asks for class weighting.
      image_shape: (H, W, C); needed only for a subclassed student (to build its teacher).
    """

    TERMS = ("sup", "cons", "sc", "tc", "l2")
    MONITORS = ("lambda", "ema_decay", "tsc_edge_density", "tsc_stable_pairs", "tsc_components",
                "tsc_largest_component")

    def __init__(self, student: keras.Model, *, num_train: int, multi_label: bool = False,
                 relation_reduction: str = "flatten", loss_config: LossConfig | dict | None = None,
                 steps_per_epoch: int | None = None, ema_alpha: float = 0.99, weight_decay: float = 0.0,
                 eval_with: str = "teacher", class_weights: list | None = None, image_shape=None, **kwargs):
        super().__init__(**kwargs)
        if relation_reduction not in ("flatten", "avg"):
            raise ValueError(f"relation_reduction must be 'flatten' or 'avg', got {relation_reduction!r}")
        if eval_with not in ("student", "teacher"):
            raise ValueError(f"eval_with must be 'student' or 'teacher', got {eval_with!r}")
        if not isinstance(student, keras.Model):
            raise TypeError(f"student must be a keras.Model, got {type(student).__name__}")
        self.student = student
        self.image_shape = tuple(image_shape) if image_shape else (
            tuple(student.inputs[0].shape[1:]) if getattr(student, "inputs", None) else None)
        outputs = self._probe_outputs()
        self.num_classes = int(outputs[1].shape[-1])
        self.num_train = int(num_train)
        self.multi_label = bool(multi_label)
        self.relation_reduction = relation_reduction
        if isinstance(loss_config, LossConfig):
            loss_config = dataclasses.asdict(loss_config)
        self.loss_config = LossConfig(**(loss_config or {}))
        self.steps_per_epoch = None if steps_per_epoch is None else int(steps_per_epoch)
        self.ema_alpha = float(ema_alpha)
        self.weight_decay = float(weight_decay)
        self.eval_with = eval_with
        self.class_weights = None if class_weights is None else [float(w) for w in class_weights]
        if self.class_weights is not None and len(self.class_weights) != self.num_classes:
            raise ValueError(f"class_weights has {len(self.class_weights)} entries for {self.num_classes} classes")
        self.teacher = clone_network(student, self.image_shape)

        # Through the (overridable) hook, so a subclass's features size the memory.
        self.relation_dim = int(self.relation_features(tf.zeros([1, *outputs[0].shape[1:]])).shape[-1])
        # TSC memory: each training sample's student relation features at its last visit, and a seen flag.
        self.tsc_memory = self.add_weight(shape=(max(self.num_train, 1), self.relation_dim), initializer="zeros",
                                          dtype=self.loss_config.tsc_memory_dtype, trainable=False,
                                          name="tsc_memory", aggregation="only_first_replica")
        self.tsc_seen = self.add_weight(shape=(max(self.num_train, 1),), initializer="zeros", dtype="float32",
                                        trainable=False, name="tsc_seen", aggregation="only_first_replica")
        self.trackers = {name: keras.metrics.Mean(name=name) for name in ("loss", *self.TERMS, *self.MONITORS)}
        self.val_loss_tracker = keras.metrics.Mean(name="loss")
        self.val_auc = keras.metrics.AUC(multi_label=True, num_labels=self.num_classes, name="auc")
        self.val_nonfinite = keras.metrics.Sum(name="nonfinite")
        mark_built(self)  # every variable exists now; no build() from data is needed

    @classmethod
    def from_backbone(cls, backbone: str, *, num_classes: int, image_size: int, weights: str = "none",
                      dropout: float = 0.2, relation_layer: str = "", relation_features: str = "flatten",
                      sync_bn: bool = False, fused_bn: bool = True, **kwargs) -> "STSCModel":
        """An STSCModel on a registered backbone (or `package.module:function`) with SRC-MT's head.

        See `stsc_tf.models.backbones.build_network` for the network arguments; `kwargs` go to the constructor.
        """
        student = backbones.build_network(backbone, num_classes=num_classes, image_size=image_size, weights=weights,
                                          dropout=dropout, relation_layer=relation_layer,
                                          relation_features=relation_features, sync_bn=sync_bn, fused_bn=fused_bn)
        return cls(student, relation_reduction=backbones.relation_reduction(relation_features), **kwargs)

    def _probe_outputs(self) -> list:
        """The student's two outputs (symbolic for a functional student, else from a forward pass on zeros)."""
        if getattr(self.student, "outputs", None):
            outputs = list(self.student.outputs)
        elif self.image_shape is not None:
            outputs = list(self.student(keras.ops.zeros((1, *self.image_shape)), training=False))
        else:
            raise ValueError("a subclassed student needs image_shape=(H, W, C)")
        if len(outputs) != 2 or len(outputs[1].shape) != 2:
            raise ValueError(f"the student {self.student.name!r} must output (relation features, logits [B, K]); it "
                             f"has {len(outputs)} output(s). Use stsc_tf.models.with_relation_output(model, layer=...)"
                             " to turn a classifier into that form")
        return outputs

    # ------------------------------------------------------------------------------------------------ Keras API
    @property
    def trainable_weights(self):
        """The student's trainable weights only: the teacher and the TSC memory are never optimised."""
        return self.student.trainable_weights

    @property
    def trainable_variables(self):
        return self.trainable_weights

    @property
    def non_trainable_weights(self):
        trainable = {id(v) for v in self.trainable_weights}
        return [v for v in self.weights if id(v) not in trainable]

    def count_params(self) -> int:
        """The student's parameters: the network being trained (the teacher is its moving average, the TSC memory
        is state, and `summary()` lists both as non-trainable)."""
        return self.student.count_params()

    @property
    def metrics(self):
        own = [*self.trackers.values(), self.val_loss_tracker, self.val_auc, self.val_nonfinite]
        compiled = compiled_metrics(self)
        return own + ([compiled] if compiled is not None else [])

    @property
    def eval_network(self) -> keras.Model:
        return self.teacher if self.eval_with == "teacher" else self.student

    def compile(self, optimizer="adam", loss=None, metrics=None, **kwargs):
        """Keras compile, with STSC's rules.

        `loss` is refused: the losses are STSC's (`loss_terms`, configured by `loss_config`). `metrics` are honoured
        in evaluation: each is updated with (labels [N, K], probabilities [N, K]) of the `eval_with` network, e.g.
        `keras.metrics.AUC(multi_label=True, num_labels=K)`, `keras.metrics.F1Score(threshold=0.5)`. The optimizer's
        slots are built at once, so a checkpoint restores them before the first step.
        """
        if loss is not None or kwargs.get("loss_weights") is not None:
            raise ValueError("STSCModel computes its own losses (loss_terms; weights in loss_config); compile(loss=...)"
                             " would not be used — leave it out")
        if kwargs.get("weighted_metrics"):
            raise ValueError("STSCModel does not support weighted_metrics; use metrics=[...] (unweighted, on the "
                             "evaluated network's probabilities)")
        super().compile(optimizer=optimizer, metrics=metrics, **kwargs)
        build_compiled_metrics(self, self.num_classes)
        self.optimizer.build(self.student.trainable_variables)

    def compile_from_config(self, config):
        """Re-compiles a loaded model (through the `compile` above, so the optimizer's slots match the checkpoint)."""
        self.compile(**keras.saving.deserialize_keras_object(config))

    def fit(self, x=None, y=None, *args, steps_per_epoch=None, **kwargs):
        """keras.Model.fit; takes the schedules' epoch length from `steps_per_epoch` or the dataset when unset."""
        if y is not None or isinstance(x, (np.ndarray, tf.Tensor, list, tuple)):
            raise ValueError(f"STSCModel.fit takes STSC batches, dicts with keys {list(REQUIRED_KEYS)}, not (x, y) "
                             "arrays: build them with stsc_tf.data.batches.stsc_dataset(images, labels, labeled, "
                             "batch_size=..., labeled_per_batch=...) and pass that dataset")
        if self.steps_per_epoch is None:
            steps = steps_per_epoch
            if steps is None and isinstance(x, tf.data.Dataset):
                cardinality = int(x.cardinality())
                steps = cardinality if cardinality > 0 else None
            if steps is None:
                raise ValueError("STSCModel needs the epoch length for its schedules: pass steps_per_epoch to fit or "
                                 "to the constructor (the dataset's length is unknown or infinite)")
            self.steps_per_epoch = int(steps)
        if isinstance(x, tf.data.Dataset):  # composed and shuffled by the pipeline (Keras would warn about shuffle)
            kwargs.setdefault("shuffle", False)
        return super().fit(x, y, *args, steps_per_epoch=steps_per_epoch, **kwargs)

    def call(self, images, training=False):
        """Probabilities [B, K] of the `eval_with` network. Takes images, an (images, labels) pair, or a batch dict
        ('image' or the views)."""
        if isinstance(images, (tuple, list)):
            images = images[0]
        if isinstance(images, dict):
            images = images["image"] if "image" in images else images["student_view"]
        _, logits = self.eval_network(images, training=training)
        return losses.probabilities(logits, self.multi_label)

    def get_config(self):
        config = super().get_config()
        config.update(student=keras.saving.serialize_keras_object(self.student), num_train=self.num_train,
                      multi_label=self.multi_label, relation_reduction=self.relation_reduction,
                      loss_config=dataclasses.asdict(self.loss_config), steps_per_epoch=self.steps_per_epoch,
                      ema_alpha=self.ema_alpha, weight_decay=self.weight_decay, eval_with=self.eval_with,
                      class_weights=self.class_weights, image_shape=self.image_shape)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["student"] = keras.saving.deserialize_keras_object(config["student"])
        return cls(**config)

    # The random state of dropout layers is not part of Keras' weights; it is saved beside the model's own variables
    # (the TSC memory and seen flags) so a restored run draws the masks an uninterrupted one would.
    def save_own_variables(self, store):
        super().save_own_variables(store)
        for i, v in enumerate(_random_states(self.student) + _random_states(self.teacher)):
            store[f"rng_{i}"] = v

    def load_own_variables(self, store):
        own = {k: store[k] for k in store.keys() if not k.startswith("rng_")}
        super().load_own_variables(own)
        states = _random_states(self.student) + _random_states(self.teacher)
        saved = [k for k in store.keys() if k.startswith("rng_")]
        if len(saved) == len(states):  # a checkpoint written before random states were saved has none
            for i, v in enumerate(states):
                v.assign(np.asarray(store[f"rng_{i}"]))

    # ------------------------------------------------------------------------------------------------ hooks
    def relation_features(self, features: tf.Tensor) -> tf.Tensor:
        """[b, h, w, C] or [b, D] -> [b, D] in float32 ('flatten': the paper's D^l; 'avg': spatial mean)."""
        features = tf.cast(features, tf.float32)
        if len(features.shape) == 2:
            return features
        if self.relation_reduction == "avg":
            return tf.reduce_mean(features, axis=[1, 2])
        return tf.reshape(features, [tf.shape(features)[0], -1])

    def relation_matrix(self, features: tf.Tensor) -> tf.Tensor:
        """[B, D] -> [B, B] (eq. 3)."""
        return losses.relation_matrix(features)

    def supervised_loss(self, step: Step) -> tf.Tensor:
        """This replica's share of L_s (class-weighted when the loss config asks; normalised over the global batch)."""
        weights = self._class_weights() if self.loss_config.class_weighted_supervised else None
        sample_weights = losses.supervised_weights(step.data["label"], step.labeled, multi_label=self.multi_label,
                                                   class_weights=weights)
        normalizer = self._sum_over_replicas(tf.reduce_sum(sample_weights))
        return losses.supervised_loss(step.student_logits, step.data["label"], step.labeled,
                                      multi_label=self.multi_label, normalizer=tf.maximum(normalizer, 1e-12),
                                      class_weights=weights)

    def consistency_loss(self, student_logits, teacher_logits, global_batch) -> tf.Tensor:
        """L_c on this replica's slice, divided by the global batch (eq. 2)."""
        weights = self._class_weights() if self.loss_config.class_weighted_consistency else None
        return losses.consistency_loss(student_logits, teacher_logits, multi_label=self.multi_label,
                                       global_batch=global_batch, class_weights=weights)

    def structure_losses(self, r_student, r_teacher, r_prev, seen, tsc_on) -> tuple[tf.Tensor, tf.Tensor, dict]:
        """(L_sc, L_tc, monitors) over the global batch (eq. 4, 6). `tsc_on` is a bool scalar."""
        cfg = self.loss_config
        sc = losses.spatial_structure_loss(r_student, r_teacher)
        mask, monitors = losses.stable_substructure_mask(r_student, r_prev, seen=seen, tau=cfg.tsc_tau,
                                                         tau_mode=cfg.tsc_tau_mode, mode=cfg.tsc_substructure,
                                                         edges=cfg.tsc_edges)
        tc = tf.where(tsc_on, losses.temporal_structure_loss(r_student, r_prev, mask), 0.0)
        return sc, tc, monitors

    def l2_loss(self) -> tf.Tensor:
        """wd/2 ||w||^2 over the student's trainable weights (PyTorch Adam's coupled weight_decay)."""
        if not self.weight_decay:
            return tf.constant(0.0)
        return 0.5 * self.weight_decay * tf.add_n([tf.reduce_sum(tf.square(tf.cast(w, tf.float32)))
                                                   for w in self.student.trainable_weights])

    def loss_terms(self, step: Step) -> dict[str, Term]:
        """The named terms of the loss with their weights (eq. 7). Override to add, drop or reweight terms.

        Every name returned must be in `TERMS` (its tracker is made in `__init__`). The total is
        sum(weight * value); each value is logged unweighted under its name, the total as `loss`.
        """
        cfg = self.loss_config
        sc, tc, monitors = self.structure_losses(step.r_student, step.r_teacher, step.r_prev, step.seen, step.tsc_on)
        step.monitors.update(monitors)
        lam = step.lam
        return {
            "sup": Term(1.0, self.supervised_loss(step)),
            "cons": Term(lam * cfg.consistency_weight_c,
                         self.consistency_loss(step.student_logits, step.teacher_logits, step.global_batch)),
            "sc": Term(lam * cfg.beta, sc, "replicated"),
            "tc": Term(lam * cfg.gamma, tc, "replicated"),
            "l2": Term(1.0, self.l2_loss(), "replicated"),
        }

    def update_teacher(self, decay: tf.Tensor) -> None:
        """theta' <- decay theta' + (1 - decay) theta, over the trainable weights (BN statistics stay the teacher's)."""
        for t, s in self.ema_pairs():
            t.assign(decay * t + (1.0 - decay) * tf.cast(s, t.dtype))

    def ema_pairs(self) -> list:
        """(teacher weight, student weight) for each trainable student weight (a clone: same order)."""
        return [(t, s) for t, s in zip(self.teacher.weights, self.student.weights) if s.trainable]

    # ------------------------------------------------------------------------------------------------ helpers
    def _class_weights(self) -> tf.Tensor | None:
        return None if self.class_weights is None else tf.constant(self.class_weights, tf.float32)

    def _gather(self, x: tf.Tensor) -> tf.Tensor:
        """All replicas' rows, in replica order (= the global batch's order: Keras splits it in contiguous chunks)."""
        ctx = _replica_context()
        if ctx is None:
            return x
        devices = tf.distribute.get_strategy().extended.worker_devices
        if not x.device and len(devices) == 1:
            # MultiWorkerMirroredStrategy with one device per worker places nothing in the replica function, and its
            # gather needs a device to send to: the worker's only device.
            with tf.device(devices[0]):
                x = tf.identity(x)
        return ctx.all_gather(x, axis=0)

    def _sum_over_replicas(self, x: tf.Tensor) -> tf.Tensor:
        ctx = _replica_context()
        return x if ctx is None else ctx.all_reduce(tf.distribute.ReduceOp.SUM, x)

    def global_mean(self, values: tf.Tensor, mask: tf.Tensor | None = None) -> tf.Tensor:
        """This replica's share of the mean of `values` [b] over the GLOBAL batch's rows where `mask` [b] is true.

        For a per-sample term of a subclass: return `Term(weight, self.global_mean(per_sample, mask))`.
        """
        values = tf.cast(values, tf.float32)
        mask = tf.ones_like(values) if mask is None else tf.cast(mask, tf.float32)
        count = self._sum_over_replicas(tf.reduce_sum(mask))
        return tf.reduce_sum(values * mask) / tf.maximum(count, 1.0)

    def epoch(self) -> tf.Tensor:
        """The fractional epoch of the step being taken (iterations / steps_per_epoch)."""
        return schedules.fractional_epoch(self.optimizer.iterations, self.steps_per_epoch or 1)

    def _check_batch(self, data) -> dict:
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        missing = [k for k in REQUIRED_KEYS if not isinstance(x, dict) or k not in x]
        if y is not None or sample_weight is not None or missing:
            got = sorted(x) if isinstance(x, dict) else f"a {type(data).__name__}"
            raise ValueError(f"STSCModel.fit needs batches that are dicts with keys {list(REQUIRED_KEYS)} (got "
                             f"{got}); build them with stsc_tf.data.stsc_dataset(images, labels, labeled_mask, ...) "
                             "or a dataset of (image, label) pairs")
        width = x["label"].shape[-1] if x["label"].shape.rank == 2 else None
        if x["label"].shape.rank != 2 or (width is not None and width != self.num_classes):
            raise ValueError(f"the batch's 'label' has shape {x['label'].shape}; this model has {self.num_classes} "
                             f"classes, so labels must be [B, {self.num_classes}] one-hot / multi-hot (pass "
                             f"num_classes={self.num_classes} to stsc_dataset for class indices)")
        return x

    # ------------------------------------------------------------------------------------------------ the step
    def compute_step(self, data: dict) -> tuple[tf.Tensor, dict, dict]:
        """Forward passes and losses of one step on this replica's slice (no update).

        Returns:
          (this replica's share of the loss: the replicas' shares sum to L; the global value of every term and
          monitor; the values the updates need: gathered features and indices).
        """
        cfg = self.loss_config
        n_rep = tf.distribute.get_strategy().num_replicas_in_sync
        global_b = tf.cast(tf.shape(data["student_view"])[0] * n_rep, tf.float32)
        epoch = self.epoch()
        lam = schedules.consistency_weight(epoch, maximum=cfg.consistency, rampup=cfg.consistency_rampup,
                                           start_epoch=cfg.consistency_start_epoch)
        tsc_on = tf.logical_and(epoch >= cfg.tsc_start_epoch, cfg.gamma > 0)

        f_t, z_t = self.teacher(data["teacher_view"], training=True)
        d_t = tf.stop_gradient(self._gather(self.relation_features(f_t)))  # [B, D]
        index = self._gather(tf.cast(data["index"], tf.int64))  # [B]
        # An index past the memory would be dropped silently by a GPU scatter: refused on every device.
        with tf.control_dependencies([
                tf.debugging.assert_less(index, tf.constant(self.num_train, tf.int64),
                                         message=f"a batch 'index' is >= num_train ({self.num_train}), the TSC "
                                                 "memory's rows"),
                tf.debugging.assert_non_negative(index, message="a batch 'index' is negative")]):
            index = tf.identity(index)  # every use of the index waits for the checks
        d_prev = tf.cast(tf.gather(self.tsc_memory, index), tf.float32)  # [B, D]
        seen = tf.gather(self.tsc_seen, index) > 0.5  # [B]
        f_s, z_s = self.student(data["student_view"], training=True)
        d_s = self._gather(self.relation_features(f_s))  # [B, D]
        step = Step(data=data, labeled=tf.cast(data["labeled"], tf.bool), student_logits=z_s,
                    teacher_logits=tf.stop_gradient(z_t), r_student=self.relation_matrix(d_s),
                    r_teacher=self.relation_matrix(d_t), r_prev=tf.stop_gradient(self.relation_matrix(d_prev)),
                    seen=seen, epoch=epoch, lam=lam, tsc_on=tsc_on, global_batch=global_b)
        terms = self.loss_terms(step)
        unknown = [name for name in terms if name not in self.TERMS]
        if unknown:
            raise ValueError(f"loss_terms returned {unknown}, which are not in {type(self).__name__}.TERMS "
                             f"{self.TERMS}; add them there so they are tracked and logged")
        n = tf.cast(n_rep, tf.float32)
        share = tf.add_n([tf.cast(t.weight, tf.float32) * (t.value / n if t.reduction == "replicated" else t.value)
                          for t in terms.values()])
        per_sample = [name for name, t in terms.items() if t.reduction == "sum"]
        values = {name: t.value for name, t in terms.items()}
        if per_sample:  # one all-reduce for every per-sample term's global value
            summed = tf.unstack(self._sum_over_replicas(tf.stack([values[k] for k in per_sample])))
            values.update(zip(per_sample, summed))
        total = tf.add_n([tf.cast(t.weight, tf.float32) * values[name] for name, t in terms.items()])
        logs = {"loss": total, **values, "lambda": lam}
        logs.update({f"tsc_{k}": v for k, v in step.monitors.items()})
        return share, logs, {"d_s": tf.stop_gradient(d_s), "index": index}

    def train_step(self, data):
        data = self._check_batch(data)
        variables = self.student.trainable_variables
        with tf.GradientTape(watch_accessed_variables=False) as tape:  # the teacher is never recorded
            tape.watch([v.value for v in variables])
            share, logs, state = self.compute_step(data)
            scaled = self.optimizer.scale_loss(share)
        grads = tape.gradient(scaled, variables)
        self.optimizer.apply(grads, variables)
        decay = schedules.ema_decay(self.optimizer.iterations - 1, self.ema_alpha)
        self.update_teacher(decay)
        self.tsc_memory.value.scatter_update(
            tf.IndexedSlices(tf.cast(state["d_s"], self.tsc_memory.dtype), state["index"]))
        self.tsc_seen.value.scatter_update(tf.IndexedSlices(tf.ones_like(state["index"], tf.float32), state["index"]))
        logs["ema_decay"] = decay
        for name, value in logs.items():
            if name in self.trackers:
                self.trackers[name].update_state(value)
        return _for_keras({name: tracker.result() for name, tracker in self.trackers.items()
                           if name in logs})

    @staticmethod
    def _eval_inputs(data) -> tuple:
        """(images, labels) of an evaluation batch: (x, y), (x, y, w), or a dict with 'image' and 'label'."""
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        if y is None and isinstance(x, (tuple, list)) and len(x) == 2:  # evaluate((x, y)): the pair came as x
            x, y = x
        if isinstance(x, dict):
            y = x.get("label", y)
            x = x.get("image", x.get("student_view"))
        if x is None or y is None:
            raise ValueError("STSCModel.evaluate needs (images, labels) pairs or dicts with 'image' and 'label'")
        return x, y

    def _indices_one_hot(self, indices) -> tf.Tensor:
        """[b, K] one-hot rows of class indices; an index outside 0..K-1 is refused (tf.one_hot would give a row of
        zeros, and metrics computed on it)."""
        indices = tf.reshape(indices, [-1])
        k = self.num_classes
        checks = [tf.debugging.assert_non_negative(indices, message=f"class indices must lie in 0..{k - 1}"),
                  tf.debugging.assert_less(indices, tf.cast(k, indices.dtype),
                                           message=f"class indices must lie in 0..{k - 1}")]
        with tf.control_dependencies(checks):
            return tf.one_hot(indices, k)

    def _one_hot(self, labels) -> tf.Tensor:
        """[b, K] float labels from one-hot / multi-hot [b, K] or class indices [b] / [b, 1]."""
        labels = tf.convert_to_tensor(labels)
        k = self.num_classes
        wrong = (f"labels must be [B, {k}] one-hot / multi-hot or [B] class indices: this model has {k} classes")
        static = labels.shape.rank is not None and (labels.shape.rank == 1 or labels.shape[-1] is not None)
        if not static:  # a relaxed retrace ([None, None] or unknown rank): decided at run time
            if labels.dtype.is_integer and not self.multi_label:
                indices = tf.logical_or(tf.equal(tf.rank(labels), 1), tf.equal(tf.shape(labels)[-1], 1) & (k > 1))
                labels = tf.cond(indices, lambda: self._indices_one_hot(labels),
                                 lambda: tf.cast(labels, tf.float32))
            shape = tf.shape(labels)
            with tf.control_dependencies([tf.debugging.assert_equal(tf.size(shape), 2, message=wrong),
                                          tf.debugging.assert_equal(shape[-1], k, message=wrong)]):
                return tf.ensure_shape(tf.cast(tf.reshape(labels, [-1, k]), tf.float32), [None, k])
        if labels.dtype.is_integer and (labels.shape.rank == 1 or (labels.shape[-1] == 1 and k > 1)):
            if self.multi_label:
                raise ValueError("class indices cannot describe multi-label targets: pass [B, K] multi-hot labels")
            labels = self._indices_one_hot(labels)
        if labels.shape.rank != 2 or labels.shape[-1] != k:
            raise ValueError(f"{wrong} (got shape {labels.shape})")
        return tf.cast(labels, tf.float32)

    def test_step(self, data):
        images, labels = self._eval_inputs(data)
        _, logits = self.eval_network(images, training=False)
        labels = self._one_hot(labels)
        n = tf.cast(tf.shape(labels)[0], tf.float32)
        everyone = tf.ones([tf.shape(labels)[0]], tf.bool)
        loss = losses.supervised_loss(logits, labels, everyone, multi_label=self.multi_label, normalizer=n)
        probs = losses.probabilities(logits, self.multi_label)  # [b, K]
        finite = tf.math.is_finite(probs)
        self.val_nonfinite.update_state(tf.reduce_sum(tf.cast(~finite, tf.float32)))
        probs = tf.where(finite, probs, 0.0)  # so the AUC's buckets stay valid; `nonfinite` reports the count
        self.val_loss_tracker.update_state(loss, sample_weight=n)
        self.val_auc.update_state(labels, probs)
        results = {"loss": self.val_loss_tracker.result(), "auc": self.val_auc.result(),
                   "nonfinite": self.val_nonfinite.result()}
        compiled = compiled_metrics(self)
        if compiled is not None:
            compiled.update_state(labels, probs)
            results.update(compiled.result())
        return _for_keras(results)

    def predict_step(self, data):
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        if isinstance(x, dict):
            x = x.get("image", x.get("student_view"))
        return self(x, training=False)
