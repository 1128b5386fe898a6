"""The train and evaluate CLIs end to end, every bad flag, and resume equality."""

import dataclasses
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pandas as pd
import pytest

from stsc_tf.config import Config, DataConfig, LossConfig, ModelConfig, TrainConfig
from stsc_tf.errors import ConfigError
from stsc_tf.run_folder import load_run
from stsc_tf.training import run_training, validate

from conftest import ROOT

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
TINY = ["--backbone=tiny", "--image_size=16", "--batch_size=8", "--labeled_per_batch=2", "--steps_per_epoch=3",
        "--epochs=2", "--labeled_ratio=0.3", "--strategy=none", "--consistency_start_epoch=-1",
        "--tsc_start_epoch=1", "--consistency_rampup=1"]


def run_cli(module, *args, timeout=600):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=ENV, cwd=ROOT,
                          timeout=timeout)


def test_train_cli_writes_the_whole_run_folder_and_evaluate_reads_it(synth_isic_records, tmp_path):
    run = tmp_path / "run"
    done = run_cli("stsc_tf.train", f"--data_dir={synth_isic_records}", f"--model_dir={run}", *TINY)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("config.json", "run.json", "labeled_ids.csv", "best.weights.h5", "last.weights.h5", "log.csv",
                 "metrics.json", "metrics.md", "backup", "tensorboard"):
        assert (run / name).exists(), name
    log = pd.read_csv(run / "log.csv")
    assert len(log) == 2
    for term in ("loss", "sup", "cons", "sc", "tc", "lambda", "ema_decay", "tsc_edge_density", "tsc_stable_pairs",
                 "tsc_components", "val_auc"):
        assert term in log.columns, term
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) == {"split", "student", "teacher"} and metrics["split"] == "test"
    assert 0.0 <= metrics["teacher"]["paper"]["auc"] <= 1.0
    share = json.loads((run / "run.json").read_text())["labeled_share"]  # as achieved, not the requested 0.3
    assert f"| STSC (teacher), p >= 0.18 (paper) | {100 * share:.1f} | {100 * (1 - share):.1f} |" in (
        run / "metrics.md").read_text()
    labeled = pd.read_csv(run / "labeled_ids.csv")
    assert len(labeled) == json.loads((run / "run.json").read_text())["labeled"]
    assert "test metrics" in done.stdout and "run folder" in done.stdout
    assert "Your input ran out of data" not in done.stdout + done.stderr  # Keras' warning, on every run before
    assert "structure of `inputs`" not in done.stderr and "shuffle=True" not in done.stderr
    events = [f for _, _, files in os.walk(run / "tensorboard") for f in files if "tfevents" in f]
    assert events

    ev = run_cli("stsc_tf.evaluate", f"--model_dir={run}", "--split=val", "--networks=student", "--bootstrap=20")
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert "STSC (student)" in ev.stdout and (run / "roc_val_student.png").exists()
    assert set(json.loads((run / "eval_val.json").read_text())) == {"split", "student"}


def base_config(data_dir, model_dir, **train):
    return Config(
        data=DataConfig(data_dir=data_dir, image_size=16, batch_size=8, labeled_per_batch=2, labeled_ratio=0.3,
                        cache=True, seed=1),
        model=ModelConfig(backbone="tiny"),  # the default dropout (0.2): resume must be exact with it
        loss=LossConfig(consistency_start_epoch=-1, consistency_rampup=1, tsc_start_epoch=1),
        train=TrainConfig(model_dir=model_dir, epochs=3, steps_per_epoch=3, learning_rate=1e-3, strategy="none",
                          seed=1, **train))


@pytest.mark.parametrize("change, flag", [
    (lambda c: dataclasses.replace(c, data=dataclasses.replace(c.data, labeled_ratio=0.0)), "--labeled_ratio"),
    (lambda c: dataclasses.replace(c, data=dataclasses.replace(c.data, labeled_ratio=1.2)), "--labeled_ratio"),
    (lambda c: dataclasses.replace(c, data=dataclasses.replace(c.data, labeled_per_batch=8)), "--labeled_per_batch"),
    (lambda c: dataclasses.replace(c, model=dataclasses.replace(c.model, backbone="vgg")), "--backbone"),
    (lambda c: dataclasses.replace(c, data=dataclasses.replace(c.data, data_dir="/nonexistent")), "--data_dir"),
    (lambda c: dataclasses.replace(c, loss=dataclasses.replace(c.loss, beta=-1.0)), "--beta"),
])
def test_bad_flags_fail_before_any_work_naming_the_flag(synth_isic_records, tmp_path, change, flag):
    with pytest.raises(ConfigError, match=flag):
        validate(change(base_config(synth_isic_records, str(tmp_path / "run"))))
    assert not (tmp_path / "run").exists()


def test_batch_not_divisible_by_replicas(synth_isic_records, tmp_path):
    cfg = base_config(synth_isic_records, str(tmp_path / "run"))
    with pytest.raises(ConfigError, match="--batch_size \\(8\\) is not divisible by the 3 replicas"):
        validate(cfg, num_replicas=3)


def test_cli_bad_flags_exit_with_a_clear_message(tmp_path):
    done = run_cli("stsc_tf.train", f"--data_dir={tmp_path}", f"--model_dir={tmp_path / 'r'}", *TINY)
    assert done.returncode == 2 and "error: --data_dir=" in done.stderr and "manifest.json" in done.stderr
    enum = run_cli("stsc_tf.train", "--relation_features=bogus", timeout=120)
    assert enum.returncode != 0 and "--relation_features" in enum.stderr


class Interrupt(keras.callbacks.Callback):
    """Kills the run in the middle of an epoch (as a Ctrl-C or a preemption would)."""

    def __init__(self, epoch, batch):
        super().__init__()
        self.at = (epoch, batch)
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            raise KeyboardInterrupt("simulated kill")


def _state(model_dir):
    _, _, model = load_run(model_dir, "last")
    return (model.student.get_weights() + model.teacher.get_weights()
            + [model.tsc_memory.numpy().astype("float32"), model.tsc_seen.numpy(),
               np.array(int(model.optimizer.iterations))])


def test_interrupted_then_resumed_run_equals_an_uninterrupted_one(synth_isic_records, tmp_path):
    straight = str(tmp_path / "straight")
    run_training(base_config(synth_isic_records, straight), bootstrap=0)
    resumed = str(tmp_path / "resumed")
    with pytest.raises(KeyboardInterrupt):
        run_training(base_config(synth_isic_records, resumed), extra_callbacks=[Interrupt(1, 1)], bootstrap=0)
    assert not os.path.exists(os.path.join(resumed, "metrics.json"))
    run_training(base_config(synth_isic_records, resumed), bootstrap=0)  # the same command again
    a, b = _state(straight), _state(resumed)
    assert int(a[-1]) == int(b[-1]) == 9
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5)
    assert len(pd.read_csv(os.path.join(resumed, "log.csv"))) == 3


def test_reproduce_table4_runs_eight_combinations(synth_isic_records, tmp_path):
    out = tmp_path / "t4"
    fast = [a for a in TINY if not a.startswith(("--epochs", "--steps_per_epoch"))]
    done = run_cli("stsc_tf.reproduce", "--table=4", f"--data_dir={synth_isic_records}", f"--model_dir={out}",
                   *fast, "--epochs=1", "--steps_per_epoch=2", "--batch_size=8", timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    table = (out / "table4.md").read_text()
    rows = [l for l in table.splitlines() if l.startswith("| ✓") or l.startswith("| ×")]
    assert len(rows) == 8 and "| ✓ | ✓ | ✓ |" in table and "93.73" in table  # the paper's full-STSC AUC beside
    assert len([d for d in out.iterdir() if d.is_dir()]) == 8
    cfg = json.loads((out / "c1_sc0_tc1" / "config.json").read_text())
    assert cfg["loss"]["beta"] == 0 and cfg["loss"]["gamma"] == 1 and cfg["loss"]["consistency_weight_c"] == 1


def test_non_finite_guard_names_the_term_and_stops():
    from stsc_tf.callbacks import NonFiniteGuard

    guard = NonFiniteGuard()
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd")
    guard.set_model(model)
    guard.on_train_batch_end(0, {"sup": 0.5, "tc": 0.1})
    assert guard.message is None and not model.stop_training
    guard.on_train_batch_end(1, {"sup": 0.5, "tc": float("nan"), "sc": float("inf")})
    assert model.stop_training and "non-finite tc, sc" in guard.message
