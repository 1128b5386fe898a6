"""Grad-CAM maps and relation-matrix heatmaps (the library behind stsc_tf.explain).

Grad-CAM / Grad-CAM++ come from tf-keras-vis, on the student or the teacher, for the predicted or a given class, at
the relation layer (default) or another named layer. The raw map is normalised here by its maximum with a floor
(`normalize_map`): values in [0, 1], never NaN, an all-zero map stays zero. Plotting is kept apart from the maths.

Relation heatmaps: `RelationMonitor` (a training callback) writes, every N epochs, the student and teacher relation
matrices of a fixed validation batch and |R_s - R_t| as PNG and TensorBoard images, and the distance
||R_s - R_t||_F per epoch (the paper's Fig. 3) to `relations/distance.csv` and a curve.
"""

from __future__ import annotations

import csv
import glob
import logging
import os

import keras
import numpy as np
import tensorflow as tf

from stsc_tf.data import augment
from stsc_tf.errors import ConfigError

log = logging.getLogger("stsc_tf.explain")
EPS = 1e-8


# ----------------------------------------------------------------------------------------------------------------
# Grad-CAM.
# ----------------------------------------------------------------------------------------------------------------
def relation_layer_name(network: keras.Model) -> str:
    """The name of the layer that produces the network's relation feature map (its first output)."""
    return network.outputs[0]._keras_history.operation.name


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

    layer = layer or relation_layer_name(network)
    try:
        network.get_layer(layer)
    except ValueError:
        raise ConfigError(f"--layer={layer!r} is not a layer of the network") from None
    logits_model = keras.Model(network.inputs, network.outputs[1])
    method = (GradcamPlusPlus if plus_plus else Gradcam)(logits_model, clone=False)
    cam = method(CategoricalScore(list(classes)), images, penultimate_layer=layer, normalize_cam=False,
                 expand_cam=True)
    return normalize_map(np.asarray(cam))


def load_images(spec: str, image_size: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Files from a comma list or glob -> (paths, display pixels [N, S, S, 3] 0..255, model inputs [N, S, S, 3])."""
    paths = []
    for part in filter(None, spec.split(",")):
        found = sorted(glob.glob(part))
        if not found:
            raise ConfigError(f"--images: no file matches {part!r}")
        paths += found
    pixels, inputs = [], []
    for p in paths:
        with open(p, "rb") as f:
            data = f.read()
        try:
            image = augment.decode(tf.constant(data))
        except tf.errors.InvalidArgumentError:
            raise ConfigError(f"--images: {p} is not a JPEG or PNG image") from None
        pixels.append(augment.resize(image, image_size).numpy())
        inputs.append(augment.eval_preprocess(image, image_size).numpy())
    return paths, np.stack(pixels), np.stack(inputs)


def overlay_figure(pixels: np.ndarray, cam: np.ndarray, title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(6, 3.2))
    axes[0].imshow(np.clip(pixels, 0, 255).astype(np.uint8))
    axes[1].imshow(np.clip(pixels, 0, 255).astype(np.uint8))
    axes[1].imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def grid_figure(pixels: np.ndarray, cams: np.ndarray, titles: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(pixels)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, px, cam, title in zip(axes.flat, pixels, cams, titles):
        ax.imshow(np.clip(px, 0, 255).astype(np.uint8))
        ax.imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1)
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def gradcam_run(model_dir: str, images: str, out: str, which: str = "", class_name: str = "", layer: str = "",
                plus_plus: bool = False, checkpoint: str = "best", num_images: int = 8) -> list[str]:
    """Grad-CAM overlays (one PNG per image, plus grid.png) for a run's student or teacher."""
    from stsc_tf.training import load_run

    cfg, run, model = load_run(model_dir, checkpoint)
    network = model.student if (which or cfg.train.eval_with) == "student" else model.teacher
    names = run["class_names"]
    if images:
        paths, pixels, inputs = load_images(images, cfg.data.image_size)
    else:  # the first test images of the run's records
        from stsc_tf.data.pipeline import RecordSet, eval_dataset

        batch = next(iter(eval_dataset(RecordSet.open(run["data_dir"]), "test", cfg.data.image_size, num_images)))
        inputs = batch["image"].numpy()
        pixels = augment.denormalize(inputs).numpy()
        paths = [i.decode() for i in batch["id"].numpy()]
    _, logits = network(inputs, training=False)
    if class_name:
        if class_name not in names:
            raise ConfigError(f"--class_name={class_name!r} is not one of {names}")
        classes = [names.index(class_name)] * len(inputs)
    else:
        classes = [int(c) for c in np.argmax(logits.numpy(), axis=1)]
    cams = gradcam_maps(network, inputs, classes, layer=layer, plus_plus=plus_plus)
    os.makedirs(out, exist_ok=True)
    written, titles = [], []
    for path, px, cam, c in zip(paths, pixels, cams, classes):
        stem = os.path.splitext(os.path.basename(path))[0]
        title = f"{stem}: {names[c]}"
        target = os.path.join(out, f"{stem}_gradcam.png")
        overlay_figure(px, cam, title, target)
        written.append(target)
        titles.append(title)
    grid_figure(pixels, cams, titles, os.path.join(out, "grid.png"))
    written.append(os.path.join(out, "grid.png"))
    log.info("wrote %d Grad-CAM overlays and grid.png to %s", len(paths), out)
    return written


# ----------------------------------------------------------------------------------------------------------------
# Relation heatmaps.
# ----------------------------------------------------------------------------------------------------------------
def relation_matrices(model, images) -> tuple[np.ndarray, np.ndarray]:
    """Student and teacher relation matrices [B, B] of a batch (inference mode), via the model's own hooks."""
    f_s, _ = model.student(images, training=False)
    f_t, _ = model.teacher(images, training=False)
    r_s = model.relation_matrix(model.relation_features(f_s)).numpy()
    r_t = model.relation_matrix(model.relation_features(f_t)).numpy()
    return r_s, r_t


def heatmap_figure(r_s: np.ndarray, r_t: np.ndarray, title: str, path: str | None = None) -> np.ndarray:
    """Student, teacher and |difference| heatmaps side by side; returns the RGB image (and saves it to `path`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(10, 3.3))
    vmax = max(float(r_s.max()), float(r_t.max()), EPS)
    for ax, m, name in zip(axes, (r_s, r_t, np.abs(r_s - r_t)), ("student R_s", "teacher R_t", "|R_s - R_t|")):
        im = ax.imshow(m, cmap="viridis", vmin=0, vmax=vmax if name != "|R_s - R_t|" else None)
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    if path:
        fig.savefig(path, dpi=100)
    plt.close(fig)
    return rgb


def distance_figure(epochs: list[int], distances: list[float], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(epochs, distances, "o-")
    ax.set(xlabel="epoch", ylabel="||R_s - R_t||_F", title="relation distance, student vs teacher")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _read_distances(folder: str) -> tuple[list[int], list[float]]:
    path = os.path.join(folder, "distance.csv")
    if not os.path.isfile(path):
        return [], []
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return [int(r["epoch"]) for r in rows], [float(r["distance"]) for r in rows]


def record_relations(model, images, epoch: int, folder: str, writer=None) -> float:
    """Saves R_s, R_t (npz), their heatmap PNG (and a TensorBoard image), appends the distance; returns it."""
    os.makedirs(folder, exist_ok=True)
    r_s, r_t = relation_matrices(model, images)
    distance = float(np.linalg.norm(r_s - r_t))
    np.savez(os.path.join(folder, f"epoch_{epoch:03d}.npz"), student=r_s, teacher=r_t)
    rgb = heatmap_figure(r_s, r_t, f"epoch {epoch}: ||R_s - R_t|| = {distance:.4f}",
                         os.path.join(folder, f"epoch_{epoch:03d}.png"))
    epochs, distances = _read_distances(folder)
    keep = [(e, d) for e, d in zip(epochs, distances) if e != epoch] + [(epoch, distance)]
    keep.sort()
    with open(os.path.join(folder, "distance.csv"), "w") as f:
        f.write("epoch,distance\n" + "".join(f"{e},{d}\n" for e, d in keep))
    distance_figure([e for e, _ in keep], [d for _, d in keep], os.path.join(folder, "distance.png"))
    if writer is not None:
        with writer.as_default():
            tf.summary.image("relations/student_teacher_difference", rgb[None], step=epoch)
            tf.summary.scalar("relations/distance", distance, step=epoch)
        writer.flush()
    return distance


class RelationMonitor(keras.callbacks.Callback):
    """Every `every` epochs (and after the first), records the relations of a fixed batch (see module doc)."""

    def __init__(self, images: np.ndarray, folder: str, log_dir: str | None = None, every: int = 5):
        super().__init__()
        self.images = images
        self.folder = folder
        self.every = max(1, int(every))
        self.writer = tf.summary.create_file_writer(log_dir) if log_dir else None

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0 or (epoch + 1) % self.every == 0:
            d = record_relations(self.model, self.images, epoch + 1, self.folder, self.writer)
            if logs is not None:
                logs["relation_distance"] = d


def relations_run(model_dir: str, out: str = "", checkpoint: str = "best") -> list[str]:
    """Draws a run's relation heatmaps (first and last recorded epochs) and the distance curve into `out`."""
    folder = os.path.join(model_dir, "relations")
    out = out or folder
    os.makedirs(out, exist_ok=True)
    saved = sorted(glob.glob(os.path.join(folder, "epoch_*.npz")))
    if not saved:  # a run without the callback: compute them now from the checkpoint, on the val batch
        from stsc_tf.data.pipeline import RecordSet, eval_dataset
        from stsc_tf.training import load_run

        cfg, run, model = load_run(model_dir, checkpoint)
        records = RecordSet.open(run["data_dir"])
        split = "val" if records.count("val") else "test"
        batch = next(iter(eval_dataset(records, split, cfg.data.image_size, 32)))
        record_relations(model, batch["image"], 0, folder)
        saved = sorted(glob.glob(os.path.join(folder, "epoch_*.npz")))
    written = []
    for path in dict.fromkeys([saved[0], saved[-1]]):
        m = np.load(path)
        epoch = int(os.path.basename(path)[6:9])
        target = os.path.join(out, f"relations_epoch_{epoch:03d}.png")
        heatmap_figure(m["student"], m["teacher"], f"epoch {epoch}: ||R_s - R_t|| = "
                       f"{np.linalg.norm(m['student'] - m['teacher']):.4f}", target)
        written.append(target)
    epochs, distances = _read_distances(folder)
    distance_figure(epochs, distances, os.path.join(out, "relation_distance.png"))
    written.append(os.path.join(out, "relation_distance.png"))
    log.info("wrote %s", ", ".join(written))
    return written
