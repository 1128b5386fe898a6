"""Export (TF Serving layout, TensorFlow-only loading, saved_model_cli), Grad-CAM and relation heatmaps."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from stsc_tf.config import Config, ConvertConfig, DataConfig, LossConfig, ModelConfig, TrainConfig
from stsc_tf.data import augment, synthetic
from stsc_tf.data.convert import convert
from stsc_tf.data.pipeline import RecordSet, eval_dataset
from stsc_tf.errors import ConfigError
from stsc_tf import explaining, exporting
from stsc_tf.run_folder import load_run
from stsc_tf.training import run_training

from conftest import ROOT, shared

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
SAVED_MODEL_CLI = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny STSC model trained on 240 synthetic 32-px ISIC-layout images (about 10 s), with relation records."""
    root = tmp_path_factory.mktemp("trained")
    raw = synthetic.write_isic(str(root / "raw"), num_images=240, image_size=32, seed=0)
    records = str(root / "rec")
    convert(ConvertConfig(dataset="isic2018", source_dir=raw, output_dir=records, image_size=0, num_shards=2,
                          workers=1))
    cfg = Config(data=DataConfig(data_dir=records, image_size=32, batch_size=16, labeled_per_batch=8,
                                 labeled_ratio=1.0, cache=True),
                 model=ModelConfig(backbone="tiny", dropout=0.0),
                 loss=LossConfig(consistency_start_epoch=-1, consistency_rampup=1, tsc_start_epoch=2),
                 train=TrainConfig(model_dir=str(root / "run"), epochs=8, steps_per_epoch=20, learning_rate=3e-3,
                                   strategy="none", weight_decay=0.0, relation_every_epochs=4))
    run_training(cfg, bootstrap=0)
    return {"raw": raw, "records": records, "run": str(root / "run"), "root": root}


def _real_images():
    """A real ISIC JPEG and a real ChestX-ray14 PNG from ../shared/data."""
    jpg = shared("isic2018") / "ISIC2018_Task3_Training_Input" / "ISIC_0024306.jpg"
    return [str(jpg), str(sorted((shared("chestxray14") / "images").glob("*.png"))[0])]


# ------------------------------------------------------------------------------------------------ export
@pytest.fixture(scope="module")
def exported(trained):
    return exporting.export_run(trained["run"], str(trained["root"] / "export"), "stsc", 1)


LOADER = r"""
import json, sys
import tensorflow as tf
m = tf.saved_model.load(sys.argv[1])
blobs = [open(p, "rb").read() for p in sys.argv[2:]]
out = m.signatures["serving_default"](image_bytes=tf.constant(blobs))
try:
    m.signatures["serving_default"](image_bytes=tf.constant([b"not an image"]))
    bad = "no error"
except tf.errors.InvalidArgumentError:
    bad = "InvalidArgumentError"
empty = m.signatures["serving_default"](image_bytes=tf.constant([], tf.string))
empty_pixels = m.signatures["predict_pixels"](pixels=tf.zeros([0, 40, 40, 3]))
print(json.dumps({"empty": [list(empty["probabilities"].shape), list(empty_pixels["probabilities"].shape)],
                  "probabilities": out["probabilities"].numpy().tolist(),
                  "class_name": [c.decode() for c in out["class_name"].numpy()],
                  "class_index": out["class_index"].numpy().tolist(), "bad": bad,
                  "custom_code": sorted(k for k in sys.modules if k.startswith(("stsc_tf", "keras")))}))
"""


def test_export_runs_with_tensorflow_alone_and_matches_keras(trained, exported):
    assert exported.endswith(os.path.join("export", "stsc", "1"))
    images = _real_images()
    done = subprocess.run([sys.executable, "-c", LOADER, exported, *images], capture_output=True, text=True,
                          env=ENV, timeout=300, cwd="/")
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["custom_code"] == [] or all(not k.startswith("stsc_tf") for k in out["custom_code"])
    cfg, run, model = load_run(trained["run"])
    keras_probs = []
    for path in images:
        x = augment.preprocess_bytes(tf.constant(open(path, "rb").read()), 32)[None]  # the eval preprocessing
        keras_probs.append(model.call(x).numpy()[0])
    np.testing.assert_allclose(out["probabilities"], keras_probs, atol=1e-5)
    assert out["class_name"] == [run["class_names"][i] for i in np.argmax(keras_probs, 1)]
    assert out["bad"] == "InvalidArgumentError"
    assert out["empty"] == [[0, len(run["class_names"])]] * 2  # an empty request is an empty answer


def test_export_has_both_signatures_warmup_and_no_python_ops(exported):
    shown = subprocess.run([SAVED_MODEL_CLI, "show", "--dir", exported, "--all"], capture_output=True, text=True,
                           env=ENV, timeout=300)
    assert shown.returncode == 0, shown.stderr[-2000:]
    for text in ("signature_def['serving_default']", "signature_def['predict_pixels']", "inputs['image_bytes']",
                 "inputs['pixels']", "outputs['probabilities']", "outputs['class_index']", "outputs['class_name']"):
        assert text in shown.stdout, text
    assert exporting.python_ops(exported) == set()
    assert os.path.isfile(os.path.join(exported, "assets.extra", "tf_serving_warmup_requests"))


def test_saved_model_cli_run_returns_the_same_numbers(trained, exported, tmp_path):
    pixels = np.random.default_rng(0).uniform(0, 255, (3, 40, 36, 3)).astype("float32")
    np.save(tmp_path / "pixels.npy", pixels)
    done = subprocess.run([SAVED_MODEL_CLI, "run", "--dir", exported, "--tag_set", "serve", "--signature_def",
                           "predict_pixels", "--inputs", f"pixels={tmp_path / 'pixels.npy'}", "--outdir",
                           str(tmp_path / "out")], capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    served = np.load(tmp_path / "out" / "probabilities.npy")
    _, _, model = load_run(trained["run"])
    expected = model.call(augment.eval_preprocess(pixels, 32)).numpy()
    np.testing.assert_allclose(served, expected, atol=1e-5)


def test_existing_version_is_not_overwritten(trained, exported):
    with pytest.raises(ConfigError, match="already exists"):
        exporting.export_run(trained["run"], str(trained["root"] / "export"), "stsc", 1)


# ------------------------------------------------------------------------------------------------ Grad-CAM
def test_normalize_map_is_bounded_and_never_nan():
    cams = np.stack([np.zeros((4, 4)), np.arange(16.0).reshape(4, 4), np.full((4, 4), np.nan)])
    out = explaining.normalize_map(cams)
    assert np.all(np.isfinite(out)) and out.min() >= 0 and out.max() <= 1
    assert np.all(out[0] == 0) and out[1].max() == 1.0 and np.all(out[2] == 0)


@pytest.mark.parametrize("plus_plus", [False, True])
def test_gradcam_peak_lies_inside_the_structure(trained, plus_plus):
    _, _, model = load_run(trained["run"])
    boxes = pd.read_csv(os.path.join(trained["raw"], "synthetic_boxes.csv")).set_index("image")
    batch = next(iter(eval_dataset(RecordSet.open(trained["records"]), "test", 32, 64)))
    truth = batch["label"].numpy().argmax(1)
    cams = explaining.gradcam_maps(model.teacher, batch["image"].numpy(), list(truth), plus_plus=plus_plus)
    assert cams.shape == (len(truth), 32, 32) and np.all(np.isfinite(cams)) and cams.min() >= 0 and cams.max() <= 1
    hits = 0
    for image_id, cam in zip(batch["id"].numpy(), cams):
        y, x = np.unravel_index(cam.argmax(), cam.shape)
        box = boxes.loc[image_id.decode()]
        hits += int(box.x0 <= x < box.x1 and box.y0 <= y < box.y1)
    assert hits / len(cams) >= 0.6, f"peak inside the structure for {hits}/{len(cams)} images"


def test_gradcam_cli_writes_overlays_and_grid(trained, tmp_path):
    images = sorted(os.path.join(trained["raw"], "ISIC2018_Task3_Training_Input", f) for f in
                    os.listdir(os.path.join(trained["raw"], "ISIC2018_Task3_Training_Input")))[:3]
    done = subprocess.run([sys.executable, "-m", "stsc_tf.explain", "gradcam", f"--model_dir={trained['run']}",
                           f"--images={','.join(images)}", f"--out={tmp_path / 'cams'}", "--model=student"],
                          capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    written = sorted(os.listdir(tmp_path / "cams"))
    assert len(written) == 4 and "grid.png" in written
    bad = subprocess.run([sys.executable, "-m", "stsc_tf.explain", "gradcam", f"--model_dir={trained['run']}",
                          "--layer=nope"], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert bad.returncode == 2 and "--layer='nope'" in bad.stderr


# ------------------------------------------------------------------------------------------------ relations
def test_relation_heatmaps_recorded_during_training_and_redrawn(trained, tmp_path):
    folder = os.path.join(trained["run"], "relations")
    assert {"epoch_001.png", "epoch_004.png", "epoch_008.png", "distance.csv", "distance.png"} <= set(
        os.listdir(folder))
    distances = pd.read_csv(os.path.join(folder, "distance.csv"))
    assert list(distances["epoch"]) == [1, 4, 8] and (distances["distance"] >= 0).all()
    m = np.load(os.path.join(folder, "epoch_008.npz"))
    n = min(32, RecordSet.open(trained["records"]).count("val"))  # the fixed batch: the first val images
    assert m["student"].shape == m["teacher"].shape == (n, n)
    np.testing.assert_allclose(np.linalg.norm(m["student"] - m["teacher"]), distances["distance"].iloc[-1],
                               rtol=1e-5)
    written = explaining.relations_run(trained["run"], out=str(tmp_path / "rel"))
    assert [os.path.basename(p) for p in written] == ["relations_epoch_001.png", "relations_epoch_008.png",
                                                      "relation_distance.png"]
    events = [f for r, _, fs in os.walk(os.path.join(trained["run"], "tensorboard", "relations")) for f in fs]
    assert events
