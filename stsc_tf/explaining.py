"""Grad-CAM maps, relation matrices and stable sub-structures of a run (the library behind stsc_tf.explain).

Grad-CAM / Grad-CAM++ come from tf-keras-vis, on the student or the teacher, for the predicted or a given class, at
the relation feature map (default) or another named layer. The raw map is normalised here by its maximum with a
floor (`normalize_map`): values in [0, 1], never NaN, an all-zero map stays zero.

Relations: `record_relations` (called every N epochs during training by `callbacks.RelationMonitor`) saves the
student and teacher relation matrices of a fixed validation batch (`relations/epoch_NNN.npz`), their heatmaps and
the distance ||R_s - R_t||_F per epoch (the paper's Fig. 3). `relations_run` redraws them; `substructures_run` draws
the stable sub-structures between the last two recorded epochs — the paper's qualitative view of section 2.3, and
the way to check --tsc_tau.
"""

from __future__ import annotations

import glob
import logging
import os

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from stsc_tf import figures, losses
from stsc_tf.config import MAX_IMAGE_PIXELS, check_tsc_tau
from stsc_tf.data import augment
from stsc_tf.data.image_files import expand_images, read_images, unique_stems
from stsc_tf.data.pipeline import RecordSet, eval_dataset
from stsc_tf.errors import ConfigError
from stsc_tf.files import atomic_path, atomic_write_csv, read_csv
from stsc_tf.models.backbones import feature_map_layer
from stsc_tf.run_folder import (RELATIONS, check_replaceable_output, check_writable, load_run, record_outputs,
                                run_records)

log = logging.getLogger("stsc_tf.explain")
EPS = 1e-8
BATCH_FILE = "batch.npz"  # the fixed batch's ids, labels and thumbnails


# ----------------------------------------------------------------------------------------------------------------
# Grad-CAM.
# ----------------------------------------------------------------------------------------------------------------
def normalize_map(cam: np.ndarray) -> np.ndarray:
    """[N, H, W] -> each map divided by its maximum (floored at EPS), clipped to [0, 1]; zeros stay zeros."""
    cam = np.nan_to_num(np.maximum(np.asarray(cam, np.float64), 0.0))
    peak = cam.reshape(len(cam), -1).max(axis=1)
    return np.clip(cam / np.maximum(peak, EPS)[:, None, None], 0.0, 1.0).astype(np.float32)


def gradcam_maps(network: keras.Model, images: np.ndarray, classes: list[int], *, layer: str = "",
                 plus_plus: bool = False) -> np.ndarray:
    """Grad-CAM (or Grad-CAM++) maps [N, S, S] in [0, 1] for `classes[i]` of `images[i]` (model inputs)."""
    from tf_keras_vis.gradcam import Gradcam
    from tf_keras_vis.gradcam_plus_plus import GradcamPlusPlus
    from tf_keras_vis.utils.scores import CategoricalScore

    layer = layer or feature_map_layer(network)
    try:
        network.get_layer(layer)
    except ValueError:
        raise ConfigError(f"--layer={layer!r} is not a layer of the network") from None
    logits_model = keras.Model(network.input, network.outputs[1])
    method = (GradcamPlusPlus if plus_plus else Gradcam)(logits_model, clone=False)
    cam = method(CategoricalScore(list(classes)), images, penultimate_layer=layer, normalize_cam=False,
                 expand_cam=True)
    return normalize_map(np.asarray(cam))


def _network(model, cfg, which: str) -> keras.Model:
    return model.student if (which or cfg.train.eval_with) == "student" else model.teacher


def gradcam_run(model_dir: str, images: str, out: str, which: str = "", class_name: str = "", layer: str = "",
                plus_plus: bool = False, checkpoint: str = "best", num_images: int = 8,
                max_pixels: int = MAX_IMAGE_PIXELS, data_dir: str = "") -> list[str]:
    """Grad-CAM overlays (one PNG per image, plus grid.png) for a run's student or teacher."""
    if num_images < 1:
        raise ConfigError(f"--num_images must be >= 1, got {num_images}")
    check_writable(out, "--out")
    cfg, run, model = load_run(model_dir, checkpoint)
    network = _network(model, cfg, which)
    names = run["class_names"]
    if class_name and class_name not in names:
        raise ConfigError(f"--class_name={class_name!r} is not one of {names}")
    if images:
        paths = expand_images(images)
        pixels, inputs = read_images(paths, cfg.data.image_size, max_pixels)
        stems = unique_stems(paths)
    else:  # the first test images of the run's records
        records = run_records(model_dir, run, data_dir)
        with records.reading():
            batch = next(iter(eval_dataset(records, "test", cfg.data.image_size, num_images)))
        inputs = batch["image"].numpy()
        pixels = augment.denormalize(inputs).numpy()
        stems = [i.decode() for i in batch["id"].numpy()]
    _, logits = network(inputs, training=False)
    if class_name:
        classes = [names.index(class_name)] * len(inputs)
    else:
        classes = [int(c) for c in np.argmax(logits.numpy(), axis=1)]
    cams = gradcam_maps(network, inputs, classes, layer=layer, plus_plus=plus_plus)
    targets = [os.path.join(out, f"{stem}_gradcam.png") for stem in stems] + [os.path.join(out, "grid.png")]
    for target in targets:
        check_replaceable_output(model_dir, target)
    os.makedirs(out, exist_ok=True)
    written, titles = [], []
    for stem, px, cam, c in zip(stems, pixels, cams, classes):
        title = f"{stem}: {names[c]}"
        target = os.path.join(out, f"{stem}_gradcam.png")
        figures.overlay_figure(px, cam, title, target)
        written.append(target)
        titles.append(title)
    figures.grid_figure(pixels, cams, titles, os.path.join(out, "grid.png"))
    written.append(os.path.join(out, "grid.png"))
    record_outputs(model_dir, written)
    log.info("wrote %d Grad-CAM overlays and grid.png to %s", len(stems), out)
    return written


# ----------------------------------------------------------------------------------------------------------------
# Relation matrices.
# ----------------------------------------------------------------------------------------------------------------
def relation_matrices(model, images) -> tuple[np.ndarray, np.ndarray]:
    """Student and teacher relation matrices [B, B] of a batch (inference mode), via the model's own hooks."""
    f_s, _ = model.student(images, training=False)
    f_t, _ = model.teacher(images, training=False)
    r_s = model.relation_matrix(model.relation_features(f_s)).numpy()
    r_t = model.relation_matrix(model.relation_features(f_t)).numpy()
    return r_s, r_t


def _read_distances(folder: str) -> tuple[list[int], list[float]]:
    path = os.path.join(folder, "distance.csv")
    if not os.path.isfile(path):
        return [], []
    rows = read_csv(path)
    return [int(e) for e in rows["epoch"]], [float(d) for d in rows["distance"]]


def save_batch(folder: str, images: np.ndarray, ids: list[str], labels: list[str]) -> None:
    """The fixed batch's ids, label names and 64 px thumbnails (for `substructures_run`)."""
    os.makedirs(folder, exist_ok=True)
    thumbs = augment.resize(augment.denormalize(tf.constant(images)), 64).numpy().astype(np.uint8)
    with atomic_path(os.path.join(folder, BATCH_FILE), suffix=".npz") as tmp:
        np.savez(tmp, ids=np.array(ids), labels=np.array(labels), thumbnails=thumbs)


def record_relations(model, images, epoch: int, folder: str, writer=None) -> float:
    """Saves R_s, R_t (npz), their heatmap PNG (and a TensorBoard image), appends the distance; returns it."""
    os.makedirs(folder, exist_ok=True)
    r_s, r_t = relation_matrices(model, images)
    distance = float(np.linalg.norm(r_s - r_t))
    with atomic_path(os.path.join(folder, f"epoch_{epoch:03d}.npz"), suffix=".npz") as tmp:
        np.savez(tmp, student=r_s, teacher=r_t)
    rgb = figures.heatmap_figure(r_s, r_t, f"epoch {epoch}: ||R_s - R_t|| = {distance:.4f}",
                                 os.path.join(folder, f"epoch_{epoch:03d}.png"))
    epochs, distances = _read_distances(folder)
    keep = sorted([(e, d) for e, d in zip(epochs, distances) if e != epoch] + [(epoch, distance)])
    atomic_write_csv(os.path.join(folder, "distance.csv"), pd.DataFrame(keep, columns=["epoch", "distance"]))
    figures.distance_figure([e for e, _ in keep], [d for _, d in keep], os.path.join(folder, "distance.png"))
    if writer is not None:
        with writer.as_default():
            tf.summary.image("relations/student_teacher_difference", rgb[None], step=epoch)
            tf.summary.scalar("relations/distance", distance, step=epoch)
        writer.flush()
    return distance


def _recorded(folder: str) -> list[str]:
    return sorted(glob.glob(os.path.join(folder, "epoch_*.npz")))


def _val_batch(model_dir: str, run: dict, cfg, data_dir: str, size: int = 32) -> tuple[RecordSet, dict]:
    records = run_records(model_dir, run, data_dir)
    split = "val" if records.count("val") else "test"
    with records.reading():
        return records, next(iter(eval_dataset(records, split, cfg.data.image_size, min(size, records.count(split)))))


def relations_run(model_dir: str, out: str = "", checkpoint: str = "best", data_dir: str = "") -> list[str]:
    """Draws a run's relation heatmaps (first and last recorded epochs) and the distance curve into `out`."""
    folder = os.path.join(model_dir, RELATIONS)
    out = out or folder
    os.makedirs(out, exist_ok=True)
    saved = _recorded(folder)
    if not saved:  # a run without the callback: compute them now from the checkpoint, on the val batch
        cfg, run, model = load_run(model_dir, checkpoint)
        _, batch = _val_batch(model_dir, run, cfg, data_dir)
        record_relations(model, batch["image"], 0, folder)
        saved = _recorded(folder)
    chosen = list(dict.fromkeys([saved[0], saved[-1]]))
    targets = [os.path.join(out, f"relations_epoch_{int(os.path.basename(p)[6:9]):03d}.png") for p in chosen]
    for target in targets + [os.path.join(out, "relation_distance.png")]:
        check_replaceable_output(model_dir, target)
    written = []
    for path, target in zip(chosen, targets):
        m = np.load(path)
        epoch = int(os.path.basename(path)[6:9])
        figures.heatmap_figure(m["student"], m["teacher"], f"epoch {epoch}: ||R_s - R_t|| = "
                               f"{np.linalg.norm(m['student'] - m['teacher']):.4f}", target)
        written.append(target)
    epochs, distances = _read_distances(folder)
    figures.distance_figure(epochs, distances, os.path.join(out, "relation_distance.png"))
    written.append(os.path.join(out, "relation_distance.png"))
    record_outputs(model_dir, written)
    log.info("wrote %s", ", ".join(written))
    return written


# ----------------------------------------------------------------------------------------------------------------
# Stable sub-structures.
# ----------------------------------------------------------------------------------------------------------------
def stable_components(r_now: np.ndarray, r_prev: np.ndarray, tau: float, tau_mode: str,
                      edges: str = "mutual") -> tuple[list, np.ndarray]:
    """(components with >= 2 members, largest first; stable edges [B, B] bool) between two relation matrices.

    The same rule as training's L_tc mask (`losses.stable_substructure_mask`), every sample counted as seen.
    """
    b = len(r_now)
    mask, _ = losses.stable_substructure_mask(tf.constant(r_now, tf.float32), tf.constant(r_prev, tf.float32),
                                              seen=tf.ones([b], tf.bool), tau=tau, tau_mode=tau_mode, mode="edge",
                                              edges=edges)
    edges = mask.numpy() > 0
    comp = losses.connected_components(tf.constant(edges)).numpy()
    components, done = [], set()
    for i in range(b):
        members = [int(j) for j in np.flatnonzero(comp[i])]
        if len(members) >= 2 and i not in done:
            components.append(members)
            done.update(members)
    return sorted(components, key=len, reverse=True), edges


def substructures_run(model_dir: str, out: str = "", checkpoint: str = "best", tau: float | None = None,
                      tau_mode: str = "", data_dir: str = "") -> str:
    """Draws the stable sub-structures of the run's fixed validation batch; returns the PNG's path.

    "Stable" compares the student relation matrices of the last two recorded epochs (relations/epoch_*.npz); with
    one recording, it is compared with the `checkpoint`'s matrix now; with none, both come from the best and the
    last checkpoints. The threshold is the run's (--tsc_tau, --tsc_tau_mode) unless given.
    """
    folder = os.path.join(model_dir, RELATIONS)
    cfg, run, model = load_run(model_dir, checkpoint)
    tau = cfg.loss.tsc_tau if tau is None else tau
    tau_mode = tau_mode or cfg.loss.tsc_tau_mode
    check_tsc_tau(tau, tau_mode)
    saved = _recorded(folder)
    batch_file = os.path.join(folder, BATCH_FILE)
    if os.path.isfile(batch_file) and saved:
        fixed = np.load(batch_file)
        labels, thumbs = [str(x) for x in fixed["labels"]], fixed["thumbnails"]
        r_prev = np.load(saved[-2] if len(saved) > 1 else saved[-1])["student"]
        if len(saved) > 1:
            r_now, epochs = np.load(saved[-1])["student"], f"epochs {saved[-2][-7:-4]} and {saved[-1][-7:-4]}"
        else:
            _, batch = _val_batch(model_dir, run, cfg, data_dir, len(labels))
            r_now = relation_matrices(model, batch["image"])[0]
            epochs = f"epoch {saved[-1][-7:-4]} and the {checkpoint} checkpoint"
    else:
        records, batch = _val_batch(model_dir, run, cfg, data_dir)
        labels = _label_names(batch["label"].numpy(), records.class_names)
        thumbs = augment.resize(augment.denormalize(batch["image"]), 64).numpy()
        _, _, last = load_run(model_dir, "last" if checkpoint == "best" else "best")
        if all(np.array_equal(a, b) for a, b in zip(model.student.get_weights(), last.student.get_weights())):
            raise ConfigError(f"{model_dir}: no relation recordings in {folder} and the best and last checkpoints "
                              "hold the same weights, so nothing shows how the structure changed; train with "
                              "--relation_every_epochs=N (N >= 1) to record it")
        r_now = relation_matrices(model, batch["image"])[0]
        r_prev = relation_matrices(last, batch["image"])[0]
        epochs = "the best and the last checkpoints"
    components, edges = stable_components(r_now, r_prev, tau, tau_mode, cfg.loss.tsc_edges)
    path = os.path.join(out or model_dir, "substructures.png")
    check_replaceable_output(model_dir, path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sizes = ", ".join(str(len(c)) for c in components) or "none"
    figures.substructures_figure(thumbs, labels, components, edges,
                                 f"stable sub-structures of {len(labels)} validation images ({epochs}; tau={tau:g}, "
                                 f"{tau_mode}): sizes {sizes}", path)
    record_outputs(model_dir, [path])
    log.info("%d stable sub-structure(s) (sizes %s) -> %s", len(components), sizes, path)
    return path


def _label_names(labels: np.ndarray, class_names: list[str]) -> list[str]:
    return ["|".join(class_names[k] for k in np.flatnonzero(row > 0.5)) or "none" for row in labels]


