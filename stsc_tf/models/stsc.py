"""STSCModel: student, EMA teacher, temporal sub-structure memory, and the training step of DESIGN.md.

    f_s, z_s = student(student_view, training=True)     # f: relation feature map, z: logits
    f_t, z_t = teacher(teacher_view, training=True)     # no gradient; dropout / batch-statistics BN are eta'
    L = L_s + lambda(e) (w_c L_c + beta L_sc + gamma L_tc)                    (eq. 7)

Several replicas: relation features and indices are all-gathered, so R is over the GLOBAL batch; per-sample terms
are divided by the global counts, global terms by the replica count, so the replicas' summed gradients equal the
single-device gradient (tested on 2 and 4 logical CPU devices). With unsynchronised BatchNorm each replica
normalises its own slice, which is a different computation from one device's; `sync_bn=True` makes them equal.

Teacher: built by the same builder, starts as a copy of the student's weights, never seen by the optimizer or the
gradient tape. Its layers stay `trainable` on purpose: Keras runs a non-trainable BatchNormalization in inference
mode even under training=True, and the teacher must normalise with batch statistics (it runs in training mode).
The EMA covers the weights that are trainable in the student; BatchNorm moving statistics are NOT averaged: the
teacher keeps its own, from its own batches (SRC-MT's / mean teacher's `parameters()` loop).

Subclass hooks: `relation_features`, `relation_matrix`, `consistency_loss`, `structure_losses`, `update_teacher`.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from stsc_tf import losses, schedules
from stsc_tf.config import LossConfig
from stsc_tf.models.backbones import build_backbone

MONITORS = ("loss", "sup", "cons", "sc", "tc", "l2", "lambda", "ema_decay", "tsc_edge_density", "tsc_stable_pairs",
            "tsc_components")


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


@keras.saving.register_keras_serializable(package="stsc_tf")
class STSCModel(keras.Model):
    """The STSC mean teacher.

    Args:
      num_classes: K.
      image_size: input side S.
      num_train: N, rows of the TSC memory (the train split's size; `index` selects rows).
      multi_label: sigmoid + BCE (ChestX-ray14) instead of softmax + CE.
      backbone, weights, dropout, relation_layer, sync_bn: see `build_backbone`.
      relation_features: 'flatten' (paper) | 'avg' (SRC-MT).
      loss: a LossConfig as a dict (weights, ramp-up, TSC settings).
      steps_per_epoch: for the fractional epoch of the schedules.
      ema_alpha: the teacher's EMA decay ceiling.
      weight_decay: L2 coefficient (PyTorch Adam's coupled weight_decay: wd/2 ||w||^2 added to the loss).
      eval_with: 'student' | 'teacher': the network `call` and `test_step` use.
      class_weights: optional [K] list, used where the loss config asks for class weighting.
    """

    def __init__(self, *, num_classes: int, image_size: int, num_train: int, multi_label: bool = False,
                 backbone: str = "tiny", weights: str = "none", dropout: float = 0.2, relation_layer: str = "",
                 sync_bn: bool = False, relation_features: str = "flatten", loss: dict | None = None,
                 steps_per_epoch: int = 1, ema_alpha: float = 0.99, weight_decay: float = 0.0,
                 eval_with: str = "teacher", class_weights: list | None = None, **kwargs):
        super().__init__(**kwargs)
        if relation_features not in ("flatten", "avg"):
            raise ValueError(f"relation_features must be 'flatten' or 'avg', got {relation_features!r}")
        if eval_with not in ("student", "teacher"):
            raise ValueError(f"eval_with must be 'student' or 'teacher', got {eval_with!r}")
        self.num_classes = int(num_classes)
        self.image_size = int(image_size)
        self.num_train = int(num_train)
        self.multi_label = bool(multi_label)
        self.backbone_name = backbone
        self.backbone_weights = weights
        self.dropout = float(dropout)
        self.relation_layer = relation_layer
        self.sync_bn = bool(sync_bn)
        self.relation_mode = relation_features
        self.loss_config = LossConfig(**(loss or {}))
        self.steps_per_epoch = int(steps_per_epoch)
        self.ema_alpha = float(ema_alpha)
        self.weight_decay = float(weight_decay)
        self.eval_with = eval_with
        self.class_weights = None if class_weights is None else [float(w) for w in class_weights]

        build = dict(num_classes=num_classes, image_size=image_size, dropout=dropout, relation_layer=relation_layer,
                     sync_bn=sync_bn)
        self.student = build_backbone(backbone, weights=weights, model_name="student", **build)
        # The teacher never loads pretrained weights itself: it copies the student's below.
        self.teacher = build_backbone(backbone, weights="none", model_name="teacher", **build)
        for t, s in zip(self.teacher.weights, self.student.weights):
            t.assign(s)

        feature_shape = self.student.outputs[0].shape[1:]  # [h, w, C]
        # Through the (overridable) hook, so a subclass's features size the memory.
        self.relation_dim = int(self.relation_features(tf.zeros([1, *feature_shape])).shape[-1])
        # TSC memory: each training sample's student relation features at its last visit, and a seen flag.
        self.tsc_memory = self.add_weight(shape=(max(self.num_train, 1), self.relation_dim), initializer="zeros",
                                          dtype=self.loss_config.tsc_memory_dtype, trainable=False,
                                          name="tsc_memory", aggregation="only_first_replica")
        self.tsc_seen = self.add_weight(shape=(max(self.num_train, 1),), initializer="zeros", dtype="float32",
                                        trainable=False, name="tsc_seen", aggregation="only_first_replica")
        self.trackers = {name: keras.metrics.Mean(name=name) for name in MONITORS}
        self.val_loss_tracker = keras.metrics.Mean(name="loss")
        self.val_auc = keras.metrics.AUC(multi_label=True, num_labels=self.num_classes, name="auc")
        self.built = True  # every variable exists now; no build() from data is needed

    # ------------------------------------------------------------------------------------------------ Keras API
    @property
    def metrics(self):
        return list(self.trackers.values()) + [self.val_loss_tracker, self.val_auc]

    @property
    def eval_network(self) -> keras.Model:
        return self.teacher if self.eval_with == "teacher" else self.student

    def compile(self, *args, **kwargs):
        """Keras compile, then builds the optimizer's slots so a checkpoint restores them before the first step."""
        super().compile(*args, **kwargs)
        self.optimizer.build(self.student.trainable_variables)

    def compile_from_config(self, config):
        """Re-compiles a loaded model (through the `compile` above, so the optimizer's slots match the checkpoint)."""
        self.compile(**keras.saving.deserialize_keras_object(config))

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Skipped: every variable exists from __init__ and there is no compiled loss or metric to build.

        (Keras 3.15's TF trainer would MEAN-reduce the first distributed batch here, which
        MultiWorkerMirroredStrategy cannot do for a dict of tensors.)
        """
        return

    def call(self, images, training=False):
        """Probabilities [B, K] of the `eval_with` network. Takes images, or a batch dict ('image' or the views)."""
        if isinstance(images, dict):
            images = images["image"] if "image" in images else images["student_view"]
        _, logits = self.eval_network(images, training=training)
        return losses.probabilities(logits, self.multi_label)

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes, image_size=self.image_size, num_train=self.num_train,
                      multi_label=self.multi_label, backbone=self.backbone_name, weights="none",
                      dropout=self.dropout, relation_layer=self.relation_layer, sync_bn=self.sync_bn,
                      relation_features=self.relation_mode, loss=dict(vars(self.loss_config)),
                      steps_per_epoch=self.steps_per_epoch, ema_alpha=self.ema_alpha,
                      weight_decay=self.weight_decay, eval_with=self.eval_with, class_weights=self.class_weights)
        return config

    # ------------------------------------------------------------------------------------------------ hooks
    def relation_features(self, feature_map: tf.Tensor) -> tf.Tensor:
        """[b, h, w, C] -> [b, D] in float32: 'flatten' (the paper's D^l) or 'avg' (SRC-MT's pooled features)."""
        feature_map = tf.cast(feature_map, tf.float32)
        if self.relation_mode == "avg":
            return tf.reduce_mean(feature_map, axis=[1, 2])
        return tf.reshape(feature_map, [tf.shape(feature_map)[0], -1])

    def relation_matrix(self, features: tf.Tensor) -> tf.Tensor:
        """[B, D] -> [B, B] (eq. 3)."""
        return losses.relation_matrix(features)

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
                                                         tau_mode=cfg.tsc_tau_mode, mode=cfg.tsc_substructure)
        tc = tf.where(tsc_on, losses.temporal_structure_loss(r_student, r_prev, mask), 0.0)
        return sc, tc, monitors

    def update_teacher(self, decay: tf.Tensor) -> None:
        """theta' <- decay theta' + (1 - decay) theta, over the trainable weights (BN statistics stay the teacher's)."""
        for t, s in self.ema_pairs():
            t.assign(decay * t + (1.0 - decay) * tf.cast(s, t.dtype))

    def ema_pairs(self) -> list:
        """(teacher weight, student weight) for each trainable student weight (same builder: same order)."""
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

    def epoch(self) -> tf.Tensor:
        """The fractional epoch of the step being taken (iterations / steps_per_epoch)."""
        return schedules.fractional_epoch(self.optimizer.iterations, self.steps_per_epoch)

    # ------------------------------------------------------------------------------------------------ the step
    def compute_step(self, data: dict) -> tuple[tf.Tensor, dict, dict]:
        """Forward passes and losses of one step on this replica's slice (no update).

        Returns:
          (this replica's share of the loss: the replicas' shares sum to L; the global value of every term and
          monitor; the values the updates need: gathered features and indices).
        """
        cfg = self.loss_config
        n_rep = tf.distribute.get_strategy().num_replicas_in_sync
        local_b = tf.shape(data["student_view"])[0]
        global_b = local_b * n_rep
        labeled = tf.cast(data["labeled"], tf.bool)
        num_labeled = self._sum_over_replicas(tf.reduce_sum(tf.cast(labeled, tf.float32)))
        epoch = self.epoch()
        lam = schedules.consistency_weight(epoch, maximum=cfg.consistency, rampup=cfg.consistency_rampup,
                                           start_epoch=cfg.consistency_start_epoch)
        tsc_on = tf.logical_and(epoch >= cfg.tsc_start_epoch, cfg.gamma > 0)

        f_t, z_t = self.teacher(data["teacher_view"], training=True)
        d_t = tf.stop_gradient(self._gather(self.relation_features(f_t)))  # [B, D]
        index = self._gather(tf.cast(data["index"], tf.int64))  # [B]
        d_prev = tf.cast(tf.gather(self.tsc_memory, index), tf.float32)  # [B, D]
        seen = tf.gather(self.tsc_seen, index) > 0.5  # [B]
        r_prev = tf.stop_gradient(self.relation_matrix(d_prev))
        r_t = self.relation_matrix(d_t)

        f_s, z_s = self.student(data["student_view"], training=True)
        d_s = self._gather(self.relation_features(f_s))  # [B, D]
        sup = losses.supervised_loss(z_s, data["label"], labeled, multi_label=self.multi_label,
                                     num_labeled=tf.maximum(num_labeled, 1.0),
                                     class_weights=self._class_weights() if cfg.class_weighted_supervised else None)
        cons = self.consistency_loss(z_s, z_t, global_b)
        r_s = self.relation_matrix(d_s)
        sc, tc, monitors = self.structure_losses(r_s, r_t, r_prev, seen, tsc_on)
        l2 = 0.5 * self.weight_decay * tf.add_n([tf.reduce_sum(tf.square(tf.cast(w, tf.float32)))
                                                 for w in self.student.trainable_weights])
        n = tf.cast(n_rep, tf.float32)
        # Per-sample terms (sup, cons) are already this replica's share; global terms are divided by n, once.
        share = sup + lam * (cfg.consistency_weight_c * cons + (cfg.beta * sc + cfg.gamma * tc) / n) + l2 / n
        sup_g, cons_g = tf.unstack(self._sum_over_replicas(tf.stack([sup, cons])))
        total = sup_g + lam * (cfg.consistency_weight_c * cons_g + cfg.beta * sc + cfg.gamma * tc) + l2
        logs = {"loss": total, "sup": sup_g, "cons": cons_g, "sc": sc, "tc": tc, "l2": l2, "lambda": lam,
                "tsc_edge_density": monitors["edge_density"], "tsc_stable_pairs": monitors["stable_pairs"],
                "tsc_components": monitors["components"]}
        return share, logs, {"d_s": tf.stop_gradient(d_s), "index": index}

    def train_step(self, data):
        data = data[0] if isinstance(data, tuple) else data
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
            self.trackers[name].update_state(value)
        return _for_keras({name: self.trackers[name].result() for name in MONITORS})

    def test_step(self, data):
        data = data[0] if isinstance(data, tuple) else data
        _, logits = self.eval_network(data["image"], training=False)
        labels = tf.cast(data["label"], tf.float32)
        everyone = tf.ones([tf.shape(labels)[0]], tf.bool)
        loss = losses.supervised_loss(logits, labels, everyone, multi_label=self.multi_label,
                                      num_labeled=tf.cast(tf.shape(labels)[0], tf.float32))
        self.val_loss_tracker.update_state(loss, sample_weight=tf.cast(tf.shape(labels)[0], tf.float32))
        self.val_auc.update_state(labels, losses.probabilities(logits, self.multi_label))
        return _for_keras({"loss": self.val_loss_tracker.result(), "auc": self.val_auc.result()})

    def predict_step(self, data):
        images = data["image"] if isinstance(data, dict) else data
        return self(images, training=False)
