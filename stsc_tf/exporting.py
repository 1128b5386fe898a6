"""SavedModel export in TF Serving's layout `<export_dir>/<name>/<version>/` (the library behind stsc_tf.export).

Signatures (Keras 3 ExportArchive; TensorFlow alone loads and runs them: no stsc_tf, no custom Python ops):
  serving_default(image_bytes: string [N])         encoded JPEG/PNG, each decoded and preprocessed by
                                                   `augment.preprocess_bytes`, the function evaluation uses
  predict_pixels(pixels: float32 [N, H, W, 3])     0..255 pixels, `augment.eval_preprocess`
  outputs: probabilities [N, K] float32, class_index [N] int64, class_name [N] string
Bytes that are not an image fail inside the signature with InvalidArgumentError. With tensorflow-serving-api
installed, `assets.extra/tf_serving_warmup_requests` holds a warm-up request so the first real one is fast.
"""

from __future__ import annotations

import logging
import os

import keras
import numpy as np
import tensorflow as tf

from stsc_tf import losses
from stsc_tf.data import augment
from stsc_tf.errors import ConfigError

log = logging.getLogger("stsc_tf.export")
PYTHON_OPS = {"PyFunc", "PyFuncStateless", "EagerPyFunc"}


def export_network(network: keras.Model, *, class_names: list[str], image_size: int, multi_label: bool,
                   path: str) -> str:
    """Writes `network` (image -> (relation map, logits)) as a SavedModel with both signatures at `path`."""
    if os.path.exists(path):
        raise ConfigError(f"export folder {path} already exists; choose another --version (TF Serving loads the "
                          "highest version number)")
    names = tf.constant(class_names)

    def outputs(images):
        _, logits = network(images, training=False)
        probs = losses.probabilities(logits, multi_label)  # [N, K]
        index = tf.argmax(probs, axis=1)  # [N]
        return {"probabilities": probs, "class_index": index, "class_name": tf.gather(names, index)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def serve_bytes(image_bytes):
        images = tf.map_fn(lambda b: augment.preprocess_bytes(b, image_size), image_bytes,
                           fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32))
        return outputs(images)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32, name="pixels")])
    def serve_pixels(pixels):
        return outputs(augment.eval_preprocess(pixels, image_size))

    archive = keras.export.ExportArchive()
    archive.track(network)
    archive.add_endpoint("serving_default", serve_bytes)
    archive.add_endpoint("predict_pixels", serve_pixels)
    archive.write_out(path, verbose=False)
    _write_warmup(path, image_size)
    ops = python_ops(path)
    if ops:
        raise RuntimeError(f"the export at {path} contains Python-only ops {sorted(ops)}")
    return path


def python_ops(path: str) -> set[str]:
    """The Python-only op types in a SavedModel's graph and function library (empty = a C++ server can run it)."""
    from tensorflow.core.protobuf import saved_model_pb2

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


def export_run(model_dir: str, export_dir: str, name: str, version: int, which: str = "", checkpoint: str = "best"
               ) -> str:
    """Exports a run's student or teacher (default: the run's eval_with) to `<export_dir>/<name>/<version>/`."""
    from stsc_tf.training import load_run

    if version < 1:
        raise ConfigError(f"--version must be a positive integer, got {version}")
    cfg, run, model = load_run(model_dir, checkpoint)
    which = which or cfg.train.eval_with
    network = model.student if which == "student" else model.teacher
    path = os.path.join(export_dir, name, str(version))
    export_network(network, class_names=run["class_names"], image_size=cfg.data.image_size,
                   multi_label=run["task"] == "multi_label", path=path)
    log.info("exported the %s of %s to %s", which, model_dir, path)
    return path
