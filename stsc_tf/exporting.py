"""SavedModel export in TF Serving's layout `<export_dir>/<name>/<version>/` (the library behind stsc_tf.export).

Signatures (Keras 3 ExportArchive; TensorFlow alone loads and runs them: no stsc_tf, no custom Python ops):
  serving_default(image_bytes: string [N])         encoded JPEG/PNG, each decoded and preprocessed by
                                                   `augment.preprocess_bytes`, the function evaluation uses
  predict_pixels(pixels: float32 [N, H, W, 3])     0..255 pixels, `augment.eval_preprocess`
  outputs: probabilities [N, K] float32, class_index [N] int64, class_name [N] string, and for multi-label runs
           positive_paper [N, K] bool (p >= the paper's threshold, 0.18).
  With a calibration.json in the run folder (evaluate --fit_thresholds) also: calibrated_probabilities [N, K],
  and for multi-label runs positive [N, K] bool (calibrated p >= the validated per-class thresholds).
Refused with InvalidArgumentError inside the signature: bytes that are not a JPEG or PNG, an image whose header
declares more than `max_pixels` pixels (read before decoding, so a small file cannot allocate gigabytes), and pixels
that are NaN or infinite. With tensorflow-serving-api installed, `assets.extra/tf_serving_warmup_requests` holds a
warm-up request so the first real one is fast.

The export is built in a hidden folder beside the version folder and renamed when complete, so TF Serving (which
loads the highest numeric version folder) never sees a partial model; a killed export leaves only the hidden folder,
which the next export removes.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil

import keras
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from stsc_tf import losses
from stsc_tf.config import MAX_IMAGE_PIXELS
from stsc_tf.data import augment
from stsc_tf.errors import ConfigError
from stsc_tf.files import atomic_write_text, try_lock
from stsc_tf.run_folder import CALIBRATION, load_run, read_calibration

log = logging.getLogger("stsc_tf.export")
PYTHON_OPS = {"PyFunc", "PyFuncStateless", "EagerPyFunc"}
INCOMPLETE_MARK = ".stsc_export_incomplete"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _outputs_fn(network: keras.Model, *, class_names: list[str], multi_label: bool, threshold: float,
                fitted: dict | None):
    names = tf.constant(class_names)

    def outputs(images):
        n = tf.shape(images)[0]
        # An empty request is an empty answer (a convolution over zero images fails on some kernels): one blank
        # image stands in and is dropped again.
        images = tf.cond(n > 0, lambda: images, lambda: tf.zeros(tf.concat([[1], tf.shape(images)[1:]], 0)))
        _, logits = network(images, training=False)
        logits = tf.cast(logits, tf.float32)[:n]
        probs = losses.probabilities(logits, multi_label)  # [N, K]
        index = tf.argmax(probs, axis=1)  # [N]
        out = {"probabilities": probs, "class_index": index, "class_name": tf.gather(names, index)}
        if multi_label:
            out["positive_paper"] = probs >= threshold
        if fitted is not None:
            cal = fitted["calibration"]
            if cal["method"] == "temperature":
                scaled = logits / cal["temperature"]
                out["calibrated_probabilities"] = losses.probabilities(scaled, multi_label)
            else:  # per-class Platt: sigmoid(a_k z_k + b_k)
                out["calibrated_probabilities"] = tf.sigmoid(logits * tf.constant(cal["platt_a"], tf.float32)
                                                             + tf.constant(cal["platt_b"], tf.float32))
            if multi_label:
                out["positive"] = out["calibrated_probabilities"] >= tf.constant(fitted["thresholds"], tf.float32)
        return out

    return outputs


def export_network(network: keras.Model, *, class_names: list[str], image_size: int, multi_label: bool, path: str,
                   threshold: float = 0.18, fitted: dict | None = None, max_pixels: int = MAX_IMAGE_PIXELS) -> str:
    """Writes `network` (image -> (relation features, logits)) as a SavedModel with both signatures at `path`."""
    parent, version = os.path.split(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with open(os.path.join(parent, ".export.lock"), "a+") as lock:  # one export into a model folder at a time
        if not try_lock(lock, fcntl.LOCK_EX):
            raise ConfigError(f"another export into {parent} is running; wait for it to finish")
        if os.path.exists(path):
            raise ConfigError(f"export folder {path} already exists; choose another --version (TF Serving loads the "
                              "highest version number)")
        _remove_incomplete(parent)
        return _export(network, class_names, image_size, multi_label, path, threshold, fitted, max_pixels)


def _export(network, class_names, image_size, multi_label, path, threshold, fitted, max_pixels) -> str:
    parent, version = os.path.split(os.path.abspath(path))
    tmp = os.path.join(parent, f".{version}.incomplete-{os.getpid()}")
    outputs = _outputs_fn(network, class_names=class_names, multi_label=multi_label, threshold=threshold,
                          fitted=fitted)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def serve_bytes(image_bytes):
        images = tf.map_fn(lambda b: augment.preprocess_bytes(b, image_size, max_pixels), image_bytes,
                           fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32))
        return outputs(images)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32, name="pixels")])
    def serve_pixels(pixels):
        shape = tf.shape(pixels, out_type=tf.int64)
        checks = [tf.debugging.assert_all_finite(pixels, "pixels contain NaN or Inf"),
                  tf.debugging.assert_greater_equal(pixels, -0.5, message="pixels must lie in 0..255"),
                  tf.debugging.assert_less_equal(pixels, 255.5, message="pixels must lie in 0..255"),
                  tf.debugging.assert_less_equal(shape[1] * shape[2], tf.constant(max_pixels, tf.int64),
                                                 message=f"image has more pixels than the limit of {max_pixels}")]
        with tf.control_dependencies(checks):
            pixels = tf.identity(pixels)
        return outputs(augment.eval_preprocess(pixels, image_size))

    archive = keras.export.ExportArchive()
    archive.track(network)
    archive.add_endpoint("serving_default", serve_bytes)
    archive.add_endpoint("predict_pixels", serve_pixels)
    try:
        os.makedirs(tmp)  # marked first: a kill at any later point leaves a folder the next export recognises
        atomic_write_text(os.path.join(tmp, INCOMPLETE_MARK), "an unfinished export of stsc_tf; safe to delete\n")
        archive.write_out(tmp, verbose=False)
        _write_warmup(tmp, image_size)
        ops = python_ops(tmp)
        if ops:
            raise RuntimeError(f"the export contains Python-only ops {sorted(ops)}")
        os.remove(os.path.join(tmp, INCOMPLETE_MARK))
        os.rename(tmp, path)  # fails if `path` appeared meanwhile: never merged into another export
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _remove_incomplete(parent: str) -> None:
    """Removes the hidden folders killed exports of this package left (recognised by their marker file; called under
    the export lock, so no export is writing one)."""
    for entry in os.listdir(parent):
        folder = os.path.join(parent, entry)
        if entry.startswith(".") and ".incomplete-" in entry and os.path.isfile(os.path.join(folder, INCOMPLETE_MARK)):
            shutil.rmtree(folder, ignore_errors=True)
            log.info("removed %s, left by an export that did not finish", folder)


def python_ops(path: str) -> set[str]:
    """The Python-only op types in a SavedModel's graph and function library (empty = a C++ server can run it)."""
    sm = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        sm.ParseFromString(f.read())
    found = set()
    for meta in sm.meta_graphs:
        found |= {n.op for n in meta.graph_def.node}
        for fn in meta.graph_def.library.function:
            found |= {n.op for n in fn.node_def}
    return found & PYTHON_OPS


def _write_warmup(path: str, image_size: int) -> bool:
    """A one-image warm-up request for TF Serving (needs tensorflow-serving-api; skipped, and said, without it)."""
    try:
        from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2
    except ImportError:
        log.info("tensorflow-serving-api is not installed: no warm-up requests written")
        return False
    image = np.full([image_size, image_size, 3], 128, np.uint8)
    encoded = tf.io.encode_png(image).numpy()
    request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(signature_name="serving_default"))
    request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto([encoded], dtype=tf.string))
    record = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
    extra = os.path.join(path, "assets.extra")
    os.makedirs(extra, exist_ok=True)
    with tf.io.TFRecordWriter(os.path.join(extra, "tf_serving_warmup_requests")) as writer:
        writer.write(record.SerializeToString())
    return True


def export_run(model_dir: str, export_dir: str, name: str, version: int, which: str = "", checkpoint: str = "best",
               max_pixels: int = MAX_IMAGE_PIXELS) -> str:
    """Exports a run's student or teacher (default: the run's eval_with) to `<export_dir>/<name>/<version>/`."""
    if not NAME.fullmatch(name or ""):
        raise ConfigError(f"--name={name!r} must be one folder name (letters, digits, '.', '_', '-'; no '/' or "
                          "'..'): the model goes to <export_dir>/<name>/<version>/")
    if version < 1:
        raise ConfigError(f"--version must be a positive integer, got {version}")
    if max_pixels < 1:
        raise ConfigError(f"--max_image_pixels must be >= 1, got {max_pixels}")
    cfg, run, model = load_run(model_dir, checkpoint)
    which = which or cfg.train.eval_with
    network = model.student if which == "student" else model.teacher
    fitted = read_calibration(model_dir, checkpoint)
    entry = fitted["networks"].get(which) if fitted else None
    if fitted and entry is None:
        log.info("%s has no calibration for the %s: exporting without calibrated outputs", CALIBRATION, which)
    path = os.path.join(export_dir, name, str(version))
    export_network(network, class_names=run["class_names"], image_size=cfg.data.image_size,
                   multi_label=run["task"] == "multi_label", path=path, threshold=cfg.train.threshold,
                   fitted=entry, max_pixels=max_pixels)
    log.info("exported the %s of %s to %s%s", which, model_dir, path,
             " (with calibrated outputs)" if entry else "")
    return path
