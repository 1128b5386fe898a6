"""Several machines (two worker processes on localhost), mixed precision, XLA."""

import json
import os
import socket
import subprocess
import sys

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from stsc_tf import flags as flags_lib
from stsc_tf.config import Config, DataConfig, LossConfig, ModelConfig, TrainConfig
from stsc_tf.data.pipeline import train_dataset
from stsc_tf.run_folder import build_model, load_run, make_optimizer
from stsc_tf.training import validate

from conftest import ROOT

ARGS = ["--backbone=tiny", "--image_size=16", "--batch_size=8", "--labeled_per_batch=2", "--steps_per_epoch=2",
        "--labeled_ratio=0.3", "--relation_every_epochs=0", "--dropout=0", "--sync_bn", "--consistency_start_epoch=-1",
        "--consistency_rampup=0", "--tsc_start_epoch=0", "--tsc_tau_mode=quantile", "--tsc_tau=0.6", "--seed=2"]


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch_workers(extra, n=2):
    """Starts n `python -m stsc_tf.train --strategy=multi_worker` processes with TF_CONFIG on free local ports."""
    cluster = {"worker": [f"localhost:{_free_port()}" for _ in range(n)]}
    procs = []
    for i in range(n):
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
               "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})}
        procs.append(subprocess.Popen([sys.executable, "-m", "stsc_tf.train", "--strategy=multi_worker", *ARGS,
                                       *extra], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    return outs


def single_process_reference(data_dir, epochs):
    """One process, one device, fed the same global batches (composed for 2 replicas, as the workers' are)."""
    flags_lib.define_train_flags()
    flags_lib.FLAGS([sys.argv[0], *ARGS, f"--data_dir={data_dir}", "--model_dir=unused", f"--epochs={epochs}",
                     "--strategy=none"])
    cfg = flags_lib.train_config()
    flags_lib.FLAGS.unparse_flags()
    keras.utils.set_random_seed(cfg.train.seed)
    records = validate(cfg)
    data = train_dataset(records, cfg.data, num_replicas=2, steps_per_epoch=2, epochs=epochs)
    model = build_model(cfg, num_classes=records.num_classes, multi_label=False, num_train=data.num_train,
                        steps_per_epoch=2, class_weights=None)
    model.compile(optimizer=make_optimizer(cfg, 2))
    model.fit(data.dataset, epochs=epochs, steps_per_epoch=2, verbose=0)
    return model


def test_two_workers_equal_each_other_and_a_single_process(synth_isic_records, tmp_path):
    run = tmp_path / "run"
    outs = launch_workers([f"--data_dir={synth_isic_records}", f"--model_dir={run}", "--epochs=1"])
    assert "replica(s)" in outs[0] and "2 replica(s)" in outs[0]
    # the chief writes the run folder; the other worker writes only under worker_1/
    for name in ("metrics.json", "best.weights.h5", "last.weights.h5", "backup", "log.csv"):
        assert (run / name).exists(), name
    assert (run / "worker_1").is_dir() and not (run / "worker_0").exists()
    _, _, chief = load_run(str(run), "last")
    _, _, other = load_run(str(run / "worker_1"), "last")
    for a, b in zip(chief.get_weights(), other.get_weights()):
        np.testing.assert_array_equal(a, b)
    reference = single_process_reference(synth_isic_records, epochs=1)
    for part in ("student", "teacher"):
        for a, b in zip(getattr(chief, part).get_weights(), getattr(reference, part).get_weights()):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4, err_msg=part)
    np.testing.assert_allclose(chief.tsc_memory.numpy().astype("float32"),
                               reference.tsc_memory.numpy().astype("float32"), atol=1e-3, rtol=2 ** -10)

    # The backup with the chief writing: the same command with more epochs (allowed) continues after epoch 1
    outs = launch_workers([f"--data_dir={synth_isic_records}", f"--model_dir={run}", "--epochs=2",
                           "--allow_changes=epochs"])
    assert "resuming after epoch 1" in outs[0]
    assert len(pd.read_csv(run / "log.csv")) == 2
    _, _, chief = load_run(str(run), "last")
    assert int(chief.optimizer.iterations) == 4


# ------------------------------------------------------------------------------------------------ precision, XLA
def _batch():
    rng = np.random.default_rng(0)
    labeled = np.tile([1.0, 0.0, 0.0, 0.0], 2).astype("float32")
    return {"student_view": rng.normal(size=(8, 16, 16, 3)).astype("float32"),
            "teacher_view": rng.normal(size=(8, 16, 16, 3)).astype("float32"),
            "label": np.eye(3, dtype="float32")[rng.integers(0, 3, 8)] * labeled[:, None], "labeled": labeled,
            "index": np.arange(8, dtype="int64")}


LOSS = dict(consistency_start_epoch=-1, consistency_rampup=0, tsc_start_epoch=0, tsc_tau=0.6, tsc_tau_mode="quantile")


def _model():
    return build_model(Config(data=DataConfig(image_size=16), model=ModelConfig(backbone="tiny", dropout=0.0),
                              loss=LossConfig(**LOSS), train=TrainConfig()),
                       num_classes=3, multi_label=False, num_train=16, steps_per_epoch=1, class_weights=None)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_terms_finite_and_close_to_float32(policy):
    keras.utils.set_random_seed(0)
    reference = _model()
    reference.compile(optimizer=keras.optimizers.SGD(0.01))
    weights = reference.get_weights()
    _, logs32, _ = reference.compute_step(_batch())
    keras.mixed_precision.set_global_policy(policy)
    try:
        mixed = _model()
        mixed.set_weights(weights)
        mixed.compile(optimizer=keras.optimizers.SGD(0.01))
        assert mixed.student.get_layer("conv0").compute_dtype == policy.split("_")[1]
        _, logs, _ = mixed.compute_step(_batch())
        for name in ("sup", "cons", "sc", "tc", "loss"):
            value = float(logs[name])
            assert np.isfinite(value), name
            np.testing.assert_allclose(value, float(logs32[name]), rtol=0.05, atol=2e-3, err_msg=name)
        if policy == "mixed_float16":  # loss scaling: Keras wraps the optimizer, train_step scales and unscales
            assert isinstance(mixed.optimizer, keras.optimizers.LossScaleOptimizer)
        history = mixed.fit(tf.data.Dataset.from_tensors(_batch()).repeat(), steps_per_epoch=2, epochs=1, verbose=0)
        assert np.isfinite(history.history["loss"][-1])
        assert all(np.all(np.isfinite(w)) for w in mixed.student.get_weights())
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_jit_compile_trains_without_a_strategy():
    keras.utils.set_random_seed(0)
    model = _model()
    model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=True)
    history = model.fit(tf.data.Dataset.from_tensors(_batch()).repeat(), steps_per_epoch=2, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][-1]) and history.history["tc"][-1] >= 0
