"""Every figure the package draws (matplotlib, Agg): ROC curves, reliability diagrams, Grad-CAM overlays, relation
heatmaps, the relation distance curve, stable sub-structures, and label suggestions.

Plotting only: the maths lives in metrics / calibration / losses / explaining. Each PNG is written atomically.
matplotlib is imported inside the functions: it is a heavy import that training without figures never needs.
"""

from __future__ import annotations

import io
import math

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from stsc_tf.files import atomic_write_bytes


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str, dpi: int = 100) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    _pyplot().close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def _pixels(image: np.ndarray) -> np.ndarray:
    return np.clip(image, 0, 255).astype(np.uint8)


def roc_figure(y: np.ndarray, probs: np.ndarray, class_names: list[str], title: str, path: str) -> None:
    """One-vs-rest ROC curve per class (classes absent from the split are skipped)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for c, name in enumerate(class_names):
        t = y[:, c] > 0.5
        if 0 < t.sum() < len(t):
            fpr, tpr, _ = roc_curve(t, probs[:, c])
            ax.plot(fpr, tpr, label=f"{name} ({roc_auc_score(t, probs[:, c]):.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    _save(fig, path)


def reliability_figure(curves: dict[str, dict], eces: dict[str, float], title: str, path: str) -> None:
    """Reliability diagram: observed frequency vs confidence per bin, one line per curve (e.g. before / after).

    Args:
      curves: name -> `calibration.reliability_curve(...)` (mean confidence, observed frequency, count per bin).
      eces: name -> expected calibration error, shown in the legend.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k:", lw=0.8, label="perfect calibration")
    for name, curve in curves.items():
        ax.plot(curve["confidence"], curve["observed"], "o-", ms=4, label=f"{name} (ECE {eces[name]:.3f})")
    ax.set(xlabel="predicted probability (bin mean)", ylabel="observed frequency", xlim=(0, 1), ylim=(0, 1),
           title=title)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    _save(fig, path)


def overlay_figure(pixels: np.ndarray, cam: np.ndarray, title: str, path: str) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(6, 3.2))
    axes[0].imshow(_pixels(pixels))
    axes[1].imshow(_pixels(pixels))
    axes[1].imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def grid_figure(pixels: np.ndarray, cams: np.ndarray | None, titles: list[str], path: str, cols: int = 4) -> None:
    """Images (with Grad-CAM maps on top when `cams` is given) in a grid, one title each."""
    plt = _pyplot()
    n = len(pixels)
    cols = min(n, cols)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (ax, px, title) in enumerate(zip(axes.flat, pixels, titles)):
        ax.imshow(_pixels(px))
        if cams is not None:
            ax.imshow(cams[i], cmap="jet", alpha=0.45, vmin=0, vmax=1)
        ax.set_title(title, fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def heatmap_figure(r_s: np.ndarray, r_t: np.ndarray, title: str, path: str | None = None) -> np.ndarray:
    """Student, teacher and |difference| heatmaps side by side; returns the RGB image (and saves it to `path`)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.3))
    vmax = max(float(r_s.max()), float(r_t.max()), 1e-8)
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
        _save(fig, path)
    else:
        plt.close(fig)
    return rgb


def distance_figure(epochs: list[int], distances: list[float], path: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(epochs, distances, "o-")
    ax.set(xlabel="epoch", ylabel="||R_s - R_t||_F", title="relation distance, student vs teacher")
    fig.tight_layout()
    _save(fig, path)


def substructures_figure(pixels: np.ndarray, labels: list[str], components: list[list[int]], edges: np.ndarray,
                         title: str, path: str, max_per_row: int = 10) -> None:
    """The stable sub-structures of a batch: one row of thumbnails per component (with true labels), and the graph.

    Args:
      pixels: [B, S, S, 3] 0..255 thumbnails. labels: B label strings.
      components: lists of member indices (>= 2 members each), largest first.
      edges: [B, B] bool stable edges.
    """
    plt = _pyplot()
    rows = max(1, len(components))
    fig = plt.figure(figsize=(1.3 * max_per_row + 5.5, max(4.5, 1.45 * rows)))
    grid = fig.add_gridspec(rows, max_per_row + 4)
    for r, members in enumerate(components):
        for c, i in enumerate(members[:max_per_row]):
            ax = fig.add_subplot(grid[r, c])
            ax.imshow(_pixels(pixels[i]))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(labels[i], fontsize=6)
            if c == 0:
                ax.set_ylabel(f"#{r + 1} ({len(members)})", fontsize=7)
    if not components:
        ax = fig.add_subplot(grid[0, :max_per_row])
        ax.text(0.5, 0.5, "no stable sub-structure (>= 2 members) at this threshold", ha="center", va="center")
        ax.axis("off")
    ax = fig.add_subplot(grid[:, max_per_row:])
    b = len(pixels)
    angle = np.linspace(0, 2 * math.pi, b, endpoint=False)
    # Members of a component sit next to each other on the circle, so its edges form a visible chord bundle.
    order = [i for members in components for i in members] + [i for i in range(b) if
                                                               not any(i in m for m in components)]
    pos = {i: (math.cos(angle[k]), math.sin(angle[k])) for k, i in enumerate(order)}
    colour = {i: plt.cm.tab10(r % 10) for r, members in enumerate(components) for i in members}
    for i, j in zip(*np.nonzero(np.triu(edges, 1))):
        ax.plot([pos[i][0], pos[j][0]], [pos[i][1], pos[j][1]], color=colour.get(i, "0.7"), lw=0.7, alpha=0.7)
    for i, (x, y) in pos.items():
        ax.scatter([x], [y], s=30, color=colour.get(i, "0.6"), zorder=3)
        ax.text(1.13 * x, 1.13 * y, labels[i], fontsize=5, ha="center", va="center")
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title("stable relation graph", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)
