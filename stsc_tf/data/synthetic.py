"""A small, learnable dataset written in the raw ISIC 2018 or ChestX-ray14 layout (for the demo and tests).

    python -m stsc_tf.synthetic --layout=isic2018 --out=/tmp/synth_isic --num_images=400 --image_size=96   # the CLI
    (`python -m stsc_tf.data.synthetic ...`, the earlier spelling, runs the same CLI)

Each class is a LOCALIZED structure on a noisy background, so a small CNN can learn it and Grad-CAM can be
checked against it: `synthetic_boxes.csv` (image, class, x0, y0, x1, y1) gives each structure's box.
- isic2018: RGB JPEGs on skin-toned noise; class = shape + colour of one "lesion" at a random place; lesions
  (groups) have 1-3 images (the same lesion re-photographed: same class, new place and noise).
- chestxray14: grayscale PNGs; each present finding is a bright textured blob in its own region of a 4x4 grid
  (jittered); 0-3 findings per image ('No Finding' when none); patients have 1-3 follow-up images; the official
  `train_val_list.txt` / `test_list.txt` (patient-wise) are written too.
Deterministic by seed.
"""

from __future__ import annotations

import csv
import os

import numpy as np
from PIL import Image

from stsc_tf.data.sources import chestxray14, isic2018

ISIC_CLASS_P = np.array([0.14, 0.30, 0.12, 0.10, 0.14, 0.10, 0.10])  # imbalanced like HAM10000, but learnable
ISIC_COLOURS = [(40, 20, 20), (120, 70, 40), (200, 60, 160), (230, 230, 60), (60, 60, 200), (30, 160, 60),
                (220, 30, 30)]


def _shape_mask(kind: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A [size, size] bool mask of one of 7 shapes."""
    y, x = np.mgrid[0:size, 0:size] / (size - 1) * 2 - 1  # [-1, 1]
    r = np.hypot(x, y)
    return [
        r < 0.9,  # disc
        (np.abs(x) < 0.8) & (np.abs(y) < 0.8),  # square
        (y > -0.8) & (y < 0.8) & (np.abs(x) < (0.8 - y) / 2),  # triangle
        (r < 0.95) & (r > 0.55),  # ring
        (np.abs(x) < 0.25) | (np.abs(y) < 0.25),  # cross
        (np.abs(y) < 0.3) & (np.abs(x) < 0.95),  # bar
        (np.abs(x) + np.abs(y)) < 0.95,  # diamond
    ][kind]


def _write_boxes(path: str, boxes: list[tuple]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "class", "x0", "y0", "x1", "y1"])
        w.writerows(boxes)


def write_isic(out: str, num_images: int = 300, image_size: int = 96, seed: int = 0) -> str:
    """Writes the ISIC 2018 Task 3 layout under `out`; returns `out`."""
    rng = np.random.default_rng(seed)
    img_dir = os.path.join(out, isic2018.TRAIN_DIR)
    os.makedirs(img_dir, exist_ok=True)
    gt, meta, boxes = [], [], []
    i, lesion = 0, 0
    while i < num_images:
        cls = int(rng.choice(7, p=ISIC_CLASS_P))
        lesion_id = f"HAM_{lesion:07d}"
        lesion += 1
        for _ in range(min(int(rng.integers(1, 4)), num_images - i)):
            image_id = f"ISIC_{i:07d}"
            i += 1
            skin = np.array([205, 160, 135]) + rng.normal(0, 12, 3)
            img = np.clip(skin + rng.normal(0, 14, (image_size, image_size, 3)), 0, 255)
            size = int(image_size * rng.uniform(0.28, 0.4))
            x0, y0 = (int(v) for v in rng.integers(2, image_size - size - 2, 2))
            mask = _shape_mask(cls, size, rng)
            colour = np.array(ISIC_COLOURS[cls]) + rng.normal(0, 10, 3)
            patch = img[y0:y0 + size, x0:x0 + size]
            patch[mask] = np.clip(colour + rng.normal(0, 10, (mask.sum(), 3)), 0, 255)
            Image.fromarray(img.astype(np.uint8)).save(os.path.join(img_dir, image_id + ".jpg"), quality=92)
            label = np.eye(7)[cls]
            gt.append([image_id] + [f"{v:.1f}" for v in label])
            meta.append([lesion_id, image_id, isic2018.CLASS_NAMES[cls].lower(), "histo", "50.0", "female", "back"])
            boxes.append((image_id, isic2018.CLASS_NAMES[cls], x0, y0, x0 + size, y0 + size))
    with open(os.path.join(out, isic2018.TRAIN_CSV), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image"] + isic2018.CLASS_NAMES)
        w.writerows(gt)
    with open(os.path.join(out, isic2018.METADATA_CSV), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"])
        w.writerows(meta)
    _write_boxes(os.path.join(out, "synthetic_boxes.csv"), boxes)
    return out


def write_chestxray14(out: str, num_images: int = 300, image_size: int = 128, seed: int = 0) -> str:
    """Writes the ChestX-ray14 layout under `out` (2020 header; official lists by patient); returns `out`."""
    rng = np.random.default_rng(seed)
    img_dir = os.path.join(out, "images")
    os.makedirs(img_dir, exist_ok=True)
    cell = image_size // 4
    rows, boxes, patients = [], [], {}
    i, patient = 0, 0
    while i < num_images:
        patient += 1
        for follow_up in range(min(int(rng.integers(1, 4)), num_images - i)):
            image_id = f"{patient:08d}_{follow_up:03d}.png"
            i += 1
            img = np.clip(90 + 40 * np.sin(np.linspace(0, np.pi, image_size))[None, :]
                          + rng.normal(0, 12, (image_size, image_size)), 0, 255)
            n_find = int(rng.choice(4, p=[0.3, 0.4, 0.2, 0.1]))
            found = sorted(rng.choice(14, n_find, replace=False).tolist())
            for k in found:
                r, c = divmod(k, 4)
                size = int(cell * 0.7)
                y0 = r * cell + int(rng.integers(0, cell - size + 1))
                x0 = c * cell + int(rng.integers(0, cell - size + 1))
                yy, xx = np.mgrid[0:size, 0:size] / (size - 1) * 2 - 1
                blob = np.exp(-(xx ** 2 + yy ** 2) * 2.5) * (1 + 0.3 * np.sin((k + 2) * 3 * xx))
                img[y0:y0 + size, x0:x0 + size] += 120 * blob
                boxes.append((image_id, chestxray14.FINDINGS[k], x0, y0, x0 + size, y0 + size))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="L").save(os.path.join(img_dir, image_id))
            labels = "|".join(chestxray14.FINDINGS[k] for k in found) or chestxray14.NO_FINDING
            rows.append([image_id, labels, follow_up, patient, 50, "M", "PA", image_size, image_size, 0.143, 0.143])
            patients.setdefault(patient, []).append(image_id)
    with open(os.path.join(out, chestxray14.ENTRY_CSV), "w", newline="") as f:
        f.write("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
                "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n")
        csv.writer(f).writerows(rows)
    test_patients = set(rng.permutation(sorted(patients))[: max(1, len(patients) // 5)].tolist())
    for name, keep in (("train_val_list.txt", False), ("test_list.txt", True)):
        with open(os.path.join(out, name), "w") as f:
            for p, ids in patients.items():
                if (p in test_patients) == keep:
                    f.write("".join(x + "\n" for x in ids))
    _write_boxes(os.path.join(out, "synthetic_boxes.csv"), boxes)
    return out


LAYOUTS = {"isic2018": write_isic, "chestxray14": write_chestxray14}



if __name__ == "__main__":  # the earlier command, kept: `python -m stsc_tf.data.synthetic` runs the CLI module
    import runpy

    runpy.run_module("stsc_tf.synthetic", run_name="__main__", alter_sys=True)
