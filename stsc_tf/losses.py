"""STSC's loss terms as pure tensor functions (the paper's equations; shapes in the docstrings).

Normalisers are explicit arguments so the same code is exact on one device and on N replicas: a per-sample term
computed on a replica's slice is divided by the GLOBAL count (`global_batch`, `num_labeled`), and the replicas'
gradients are summed by the optimizer; a term over the all-gathered global batch (L_sc, L_tc) is computed
identically on every replica, and the caller divides it by the replica count, exactly once.
"""

from __future__ import annotations

import tensorflow as tf

from stsc_tf.config import TAU_MODES, TSC_EDGES

EPS = 1e-12


def relation_matrix(features: tf.Tensor) -> tf.Tensor:
    """Case-wise Gram matrix with L2-normalised rows (eq. 3).

    Args:
      features: [B, D] relation features (D^l: the feature map reshaped, or pooled).

    Returns:
      R: [B, B], R_i = M_i / ||M_i||_2 with M = d d^T. An all-zero row of M stays zero (no NaN).
    """
    features = tf.cast(features, tf.float32)
    gram = tf.matmul(features, features, transpose_b=True)  # [B, B]
    norm = tf.norm(gram, axis=1, keepdims=True)  # [B, 1]
    return gram / tf.maximum(norm, EPS)


def spatial_structure_loss(r_student: tf.Tensor, r_teacher: tf.Tensor) -> tf.Tensor:
    """L_sc = 1/B sum_ij (R_s - R_t)_ij^2 (eq. 4; SRC-MT's relation_mse_loss summed and divided by B).

    Args:
      r_student, r_teacher: [B, B] relation matrices of the same (global) batch.
    """
    b = tf.cast(tf.shape(r_student)[0], tf.float32)
    return tf.reduce_sum(tf.square(r_student - tf.stop_gradient(r_teacher))) / b


def tsc_threshold(r: tf.Tensor, tau: float, mode: str) -> tf.Tensor:
    """The edge threshold of eq. 5 for a [B, B] relation matrix: a scalar, or [B, 1] (one per row).

    'zscore' (default): per row i, mean_i + tau * std_i of the row's off-diagonal entries. An edge is a relation
      that stands out from that sample's relations to the rest of the batch, whatever their common level; on
      post-ReLU features every entry sits near the same value and only this rule still separates them (BUILD.md,
      "Temporal sub-structures on real features").
    'relative': tau / sqrt(B) (a row of B comparable non-negative entries, L2-normalised, has entries near
      1/sqrt(B)). 'absolute': tau as given (eq. 5 read literally). 'quantile': the tau-quantile of the off-diagonal
      entries (a fixed edge density).
    """
    b = tf.shape(r)[0]
    if mode == "absolute":
        return tf.constant(tau, tf.float32)
    if mode == "relative":
        return tau / tf.sqrt(tf.cast(b, tf.float32))
    off = ~tf.eye(b, dtype=tf.bool)
    if mode == "zscore":
        n = tf.maximum(tf.cast(b - 1, tf.float32), 1.0)
        offdiag = tf.where(off, r, 0.0)
        mean = tf.reduce_sum(offdiag, axis=1, keepdims=True) / n  # [B, 1]
        var = tf.reduce_sum(tf.where(off, tf.square(r - mean), 0.0), axis=1, keepdims=True) / n  # [B, 1]
        # A row whose relations are all alike (e.g. an all-zero feature vector) stands out nowhere: no edge.
        return tf.where(var > 0.0, mean + tau * tf.sqrt(var), float("inf"))
    if mode == "quantile":
        values = tf.sort(tf.boolean_mask(r, off))
        n = tf.shape(values)[0]
        k = tf.clip_by_value(tf.cast(tf.round(tau * tf.cast(n - 1, tf.float32)), tf.int32), 0, tf.maximum(n - 1, 0))
        return values[k]
    raise ValueError(f"tsc_tau_mode must be one of {TAU_MODES}, got {mode!r}")


def connected_components(adjacency: tf.Tensor) -> tf.Tensor:
    """Reachability by repeated boolean squaring (in-graph transitive closure).

    Args:
      adjacency: [B, B] bool, symmetric.

    Returns:
      [B, B] bool: C_ij = i and j are in the same connected component (C_ii = True).
    """
    b = tf.shape(adjacency)[0]
    reach = tf.cast(tf.logical_or(adjacency, tf.eye(b, dtype=tf.bool)), tf.float32)

    def body(prev, _):
        nxt = tf.cast(tf.matmul(prev, prev) > 0, tf.float32)
        return nxt, tf.reduce_any(tf.not_equal(nxt, prev))

    # log2(B) squarings always suffice; the loop stops as soon as nothing changes.
    reach, _ = tf.while_loop(lambda r, changed: changed, body, (reach, tf.constant(True)),
                             maximum_iterations=tf.cast(tf.math.ceil(tf.math.log(tf.cast(b, tf.float32) + 1.0)
                                                                     / tf.math.log(2.0)), tf.int32) + 1)
    return reach > 0


def stable_substructure_mask(r_now: tf.Tensor, r_prev: tf.Tensor, *, seen: tf.Tensor, tau: float,
                             tau_mode: str = "zscore", mode: str = "component",
                             edges: str = "mutual") -> tuple[tf.Tensor, dict]:
    """The pairs whose relation L_tc keeps stable (section 2.3, eq. 5).

    A_now = R_now >= t(R_now) and A_prev = R_prev >= t(R_prev), each graph by its own threshold (`tsc_threshold`:
    a row's threshold for 'zscore'). R is not symmetric (its rows are normalised), so a pair is connected when
    the relation passes in both directions (edges='mutual', the default: a sample whose relations to everything
    are weak cannot attach itself to a sub-structure through its own row alone) or in either (edges='either').
    Stable edges S = connected in A_now AND in A_prev AND both samples seen before, no self loops.
    mode='component': P_ij = 1 where i and j lie in one connected component of S with >= 2 members (the
    diagonal of those members included: it belongs to the sub-gram matrix of eq. 6).
    mode='edge': P = S (the ablation).

    Args:
      r_now, r_prev: [B, B] relation matrices at this visit and at the previous visit of the same samples.
      seen: [B] bool, the sample's memory row holds a previous visit.

    Returns:
      P [B, B] float32, and monitors {edge_density, stable_pairs, components, largest_component} (float32
      scalars; largest_component is the member count of the largest sub-structure, 0 when there is none).
    """
    b = tf.shape(r_now)[0]
    off_diag = ~tf.eye(b, dtype=tf.bool)
    a_now = (r_now >= tsc_threshold(r_now, tau, tau_mode)) & off_diag
    a_prev = (r_prev >= tsc_threshold(r_prev, tau, tau_mode)) & off_diag
    if edges == "mutual":
        a_now, a_prev = a_now & tf.transpose(a_now), a_prev & tf.transpose(a_prev)
    elif edges == "either":
        a_now, a_prev = a_now | tf.transpose(a_now), a_prev | tf.transpose(a_prev)
    else:
        raise ValueError(f"tsc_edges must be one of {TSC_EDGES}, got {edges!r}")
    stable = a_now & a_prev & seen[:, None] & seen[None, :]  # [B, B] symmetric
    comp = connected_components(stable)
    size = tf.reduce_sum(tf.cast(comp, tf.float32), axis=1)  # [B] size of each sample's component
    in_sub = size >= 2.0
    if mode == "component":
        mask = comp & in_sub[:, None] & in_sub[None, :]
    elif mode == "edge":
        mask = stable
    else:
        raise ValueError(f"tsc_substructure must be 'component' or 'edge', got {mode!r}")
    n_pairs = tf.cast(b * (b - 1), tf.float32)
    monitors = {
        "edge_density": tf.reduce_sum(tf.cast(a_now, tf.float32)) / tf.maximum(n_pairs, 1.0),
        "stable_pairs": tf.reduce_sum(tf.cast(stable, tf.float32)) / 2.0,
        "components": tf.reduce_sum(tf.where(in_sub, 1.0 / tf.maximum(size, 1.0), 0.0)),
        "largest_component": tf.reduce_max(tf.where(in_sub, size, 0.0)),
    }
    return tf.cast(mask, tf.float32), monitors


def temporal_structure_loss(r_now: tf.Tensor, r_prev: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """L_tc = 1/B sum_ij P_ij (R_t - R_{t-1})_ij^2 (eq. 6), R_{t-1} a constant.

    Args:
      r_now: [B, B] student relation matrix now. r_prev: [B, B] from the memory. mask: [B, B] P.
    """
    b = tf.cast(tf.shape(r_now)[0], tf.float32)
    return tf.reduce_sum(mask * tf.square(r_now - tf.stop_gradient(r_prev))) / b


def probabilities(logits: tf.Tensor, multi_label: bool) -> tf.Tensor:
    """Softmax for single-label tasks, sigmoid for multi-label ones; float32."""
    logits = tf.cast(logits, tf.float32)
    return tf.sigmoid(logits) if multi_label else tf.nn.softmax(logits, axis=-1)


def consistency_loss(student_logits: tf.Tensor, teacher_logits: tf.Tensor, *, multi_label: bool,
                     global_batch, class_weights: tf.Tensor | None = None) -> tf.Tensor:
    """L_c = 1/B sum_i sum_k w_k (p(z_s)_ik - p(z_t)_ik)^2 (eq. 2; SRC-MT divides by B only, not by K).

    Args:
      student_logits, teacher_logits: [b, K] (this replica's slice). global_batch: B, the global batch size.
      class_weights: optional [K] (SRC-MT's option: 10000 / class count).
    """
    diff = tf.square(probabilities(student_logits, multi_label)
                     - tf.stop_gradient(probabilities(teacher_logits, multi_label)))  # [b, K]
    if class_weights is not None:
        diff = diff * tf.cast(class_weights, tf.float32)[None, :]
    return tf.reduce_sum(diff) / tf.cast(global_batch, tf.float32)


def supervised_weights(labels: tf.Tensor, labeled: tf.Tensor, *, multi_label: bool,
                       class_weights: tf.Tensor | None = None) -> tf.Tensor:
    """The weight w_i of each sample in L_s: 0 for unlabeled rows; single-label with class weights, w_{y_i}.

    Summed over the GLOBAL batch, these are L_s's normaliser (`supervised_loss`).

    Args:
      labels: [b, K] one-hot / multi-hot. labeled: [b] bool. class_weights: optional [K].

    Returns:
      [b] float32.
    """
    labels = tf.cast(labels, tf.float32)
    weight = tf.ones([tf.shape(labels)[0]])  # [b]
    if class_weights is not None and not multi_label:
        weight = tf.reduce_sum(labels * tf.cast(class_weights, tf.float32)[None, :], axis=1)
    return tf.where(labeled, weight, 0.0)


def supervised_loss(logits: tf.Tensor, labels: tf.Tensor, labeled: tf.Tensor, *, multi_label: bool,
                    normalizer, class_weights: tf.Tensor | None = None) -> tf.Tensor:
    """L_s on the labeled samples, from logits (no double softmax): sum_i w_i l_i / normalizer.

    `normalizer` is the sum of `supervised_weights` over the GLOBAL batch, so the replicas' shares add up to L_s.
    - Single-label: l_i = cross-entropy; with class weights, w_i = w_{y_i}, so L_s is PyTorch's
      `CrossEntropyLoss(weight=w, reduction='mean')`: sum_i w_{y_i} l_i / sum_i w_{y_i} (not / the sample count).
    - Multi-label: l_i = binary cross-entropy averaged over the classes (PyTorch's BCEWithLogitsLoss, SRC-MT's
      ChestX-ray14 loss) and w_i = 1, so L_s is the mean over labeled samples. With class weights, l_i is the
      weighted mean sum_k w_k bce_ik / sum_k w_k, i.e. PyTorch's `BCEWithLogitsLoss(weight=w / mean(w))`: the same
      weighted-mean normalisation as the CE's, so the loss keeps the scale of the unweighted one whatever the
      weights' magnitude (SRC-MT's 10000 / count would otherwise multiply it by ~100).

    Args:
      logits: [b, K]. labels: [b, K] one-hot / multi-hot. labeled: [b] bool.
      normalizer: scalar, the global sum of the sample weights (> 0).
      class_weights: optional [K].
    """
    logits = tf.cast(logits, tf.float32)
    labels = tf.cast(labels, tf.float32)
    if multi_label:
        per_class = tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits)  # [b, K]
        if class_weights is not None:
            w = tf.cast(class_weights, tf.float32)[None, :]  # [1, K]
            per_sample = tf.reduce_sum(per_class * w, axis=1) / tf.reduce_sum(w)
        else:
            per_sample = tf.reduce_mean(per_class, axis=1)
    else:
        per_sample = -tf.reduce_sum(labels * tf.nn.log_softmax(logits, axis=-1), axis=1)  # [b]
    weight = supervised_weights(labels, labeled, multi_label=multi_label, class_weights=class_weights)  # [b]
    return tf.reduce_sum(weight * per_sample) / tf.cast(normalizer, tf.float32)
