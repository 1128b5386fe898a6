"""Nothing lost: run folders, conversions, backups and exports under reruns, kills (real signals on real
processes) and bad input; non-finite training; odd ids; oversized images; paths outside the source; clear errors."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from PIL import Image

from stsc_tf import callbacks as callbacks_lib
from stsc_tf import evaluation, exporting, explaining, run_folder
from stsc_tf.config import Config, ConvertConfig, DataConfig, LossConfig, ModelConfig, TrainConfig
from stsc_tf.data.convert import convert, verify_dataset
from stsc_tf.data.pipeline import RecordSet
from stsc_tf.errors import ConfigError, DataError
from stsc_tf.training import TrainingError, run_training

from conftest import ROOT

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}
TINY = ["--backbone=tiny", "--image_size=16", "--batch_size=8", "--labeled_per_batch=2", "--steps_per_epoch=3",
        "--labeled_ratio=0.3", "--strategy=none", "--consistency_start_epoch=-1", "--tsc_start_epoch=1",
        "--consistency_rampup=1", "--relation_every_epochs=0", "--learning_rate=1e-3", "--seed=1"]


def config(data_dir, model_dir, epochs=2, **changes) -> Config:
    """The TINY flags as a Config (default dropout 0.2: resume must be exact with dropout on)."""
    cfg = Config(data=DataConfig(data_dir=str(data_dir), image_size=16, batch_size=8, labeled_per_batch=2,
                                 labeled_ratio=0.3, seed=1),
                 model=ModelConfig(backbone="tiny"),
                 loss=LossConfig(consistency_start_epoch=-1, consistency_rampup=1, tsc_start_epoch=1),
                 train=TrainConfig(model_dir=str(model_dir), epochs=epochs, steps_per_epoch=3, learning_rate=1e-3,
                                   strategy="none", relation_every_epochs=0, seed=1))
    d = cfg.to_dict()
    for key, value in changes.items():
        section, name = key.split("__")
        d[section][name] = value
    return Config.from_dict(d)


def cli(module, *args, timeout=300, **kw):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=ENV, cwd=ROOT,
                          timeout=timeout, **kw)


def state(model_dir, checkpoint="last"):
    _, _, model = run_folder.load_run(str(model_dir), checkpoint)
    return (model.student.get_weights() + model.teacher.get_weights()
            + [model.tsc_memory.numpy().astype("float32"), model.tsc_seen.numpy(),
               np.array(int(model.optimizer.iterations))])


def assert_same_state(a, b):
    assert int(a[-1]) == int(b[-1])
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5)


def files_of(folder, names):
    return {n: (folder / n).read_bytes() for n in names}


# ------------------------------------------------------------------------------------------------ 1. one run per folder
def kill_at_mark(script: str, args: list, mark, why: str = "") -> None:
    """Runs `script` in a real subprocess and SIGKILLs it as soon as it writes `mark` (the point under test)."""
    victim = subprocess.Popen([sys.executable, "-c", script, *args], env={**ENV, "STSC_TEST_MARK": str(mark)},
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(1200):
            if mark.exists() or victim.poll() is not None:
                break
            time.sleep(0.1)
        assert mark.exists(), victim.stdout.read()[-3000:] if victim.poll() is not None else why
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait()


def test_rerun_with_other_settings_is_refused_before_any_file_changes(synth_isic_records, tmp_path):
    run = tmp_path / "run"
    run_training(config(synth_isic_records, run, epochs=1, data__labeled_ratio=0.01), bootstrap=0)
    info = json.loads((run / "run.json").read_text())
    # 10. the achieved labeled share (at least one sample per class), not the requested 1 %
    assert info["labeled"] >= 7 and f"| {100 * info['labeled_share']:.1f} |" in (run / "metrics.md").read_text()
    kept = ["config.json", "run.json", "labeled_ids.csv", "metrics.md", "best.weights.h5", "log.csv"]
    before = files_of(run, kept)
    other_records = tmp_path / "other"
    shutil.copytree(synth_isic_records, other_records)
    manifest = json.loads((other_records / "manifest.json").read_text())
    manifest["class_names"][0] = "OTHER"  # same count of classes, another name: other records by content
    (other_records / "manifest.json").write_text(json.dumps(manifest))
    for changes, flag in [({"data__image_size": 24}, "--image_size (stored 16, now 24)"),
                          ({"model__relation_features": "avg"}, "--relation_features"),
                          ({"data__seed": 2, "train__seed": 2}, "--seed"),
                          ({"data__labeled_ratio": 0.5}, "--labeled_ratio"),
                          ({"model__dropout": 0.5}, "--dropout"),
                          ({"train__learning_rate": 1.0}, "--learning_rate"),
                          ({"data__data_dir": str(other_records)}, "--data_dir")]:
        cfg = config(synth_isic_records, run, epochs=1, **{"data__labeled_ratio": 0.01, **changes})
        with pytest.raises(ConfigError, match=flag.replace("(", r"\(").replace(")", r"\)")):
            run_training(cfg, bootstrap=0)
        assert files_of(run, kept) == before, changes
    more = config(synth_isic_records, run, epochs=2, data__labeled_ratio=0.01)
    with pytest.raises(ConfigError, match="--allow_changes=epochs"):
        run_training(more, bootstrap=0)
    with pytest.raises(ConfigError, match="--dropout"):  # a run-defining setting cannot be allowed
        run_training(config(synth_isic_records, run, epochs=1, data__labeled_ratio=0.01, model__dropout=0.5),
                     allow_changes=("dropout",), bootstrap=0)
    run_training(more, allow_changes=("epochs",), bootstrap=0)
    assert json.loads((run / "config.json").read_text())["train"]["epochs"] == 2
    assert len(pd.read_csv(run / "log.csv")) == 2
    # the same records moved to another folder are the same data: the run continues
    moved = tmp_path / "moved"
    shutil.copytree(synth_isic_records, moved)
    run_training(config(moved, run, epochs=2, data__labeled_ratio=0.01), bootstrap=0)
    assert json.loads((run / "run.json").read_text())["data_dir"] == str(moved)  # evaluate/suggest/explain find them
    # a damaged list of labeled images is named; a missing one is written again from the ratio and the seed
    kept = (run / "labeled_ids.csv").read_bytes()
    for damage in (b"garbage\xff\n", b"foo,bar\n1,2\n", b""):
        (run / "labeled_ids.csv").write_bytes(damage)
        with pytest.raises(ConfigError, match="labeled_ids.csv is damaged"):
            run_training(config(moved, run, epochs=2, data__labeled_ratio=0.01), bootstrap=0)
    (run / "labeled_ids.csv").unlink()
    run_training(config(moved, run, epochs=3, data__labeled_ratio=0.01), allow_changes=("epochs", ""), bootstrap=0)
    assert (run / "labeled_ids.csv").read_bytes() == kept
    with pytest.raises(ConfigError, match="--tsc_tau must be a finite number"):
        run_training(config(moved, tmp_path / "nan", loss__tsc_tau=float("nan")), bootstrap=0)
    with pytest.raises(ConfigError, match="quantile in \\[0, 1\\]"):
        run_training(config(moved, tmp_path / "q", loss__tsc_tau=2.0, loss__tsc_tau_mode="quantile"), bootstrap=0)


def test_a_second_process_is_refused_and_a_killed_one_leaves_no_stale_lock(synth_isic_records, tmp_path):
    run = tmp_path / "run"
    args = [f"--data_dir={synth_isic_records}", f"--model_dir={run}", *TINY]
    first = subprocess.Popen([sys.executable, "-m", "stsc_tf.train", *args, "--epochs=200"], env=ENV, cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(600):  # the first process holds the lock once it has written the run files
            if (run / "config.json").exists():
                break
            time.sleep(0.1)
        second = cli("stsc_tf.train", *args, "--epochs=200")
        assert second.returncode == 2 and "is in use by pid" in second.stderr, second.stderr[-2000:]
        assert str(first.pid) in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    lock = run_folder.RunLock(str(run)).acquire()  # the kernel released the killed process's lock
    lock.release()


# ------------------------------------------------------------------------------------------------ 3, 4. backups
KILL_DURING_BACKUP = r"""
import os, runpy, sys, time
import keras
original = keras.Model.save_weights
def save_weights(self, path, *args, **kwargs):
    original(self, path, *args, **kwargs)
    if os.sep + "backup" + os.sep in path and ".epoch-0002" in os.path.basename(path):
        with open(path, "r+b") as f:  # the backup of epoch 2 is half written when the kill comes
            f.truncate(os.path.getsize(path) // 2)
        open(os.environ["STSC_TEST_MARK"], "w").close()
        time.sleep(120)
keras.Model.save_weights = save_weights
sys.argv = ["train"] + sys.argv[1:]
runpy.run_module("stsc_tf.train", run_name="__main__")
"""


def test_kill_during_a_backup_resumes_from_the_previous_one_and_equals_an_uninterrupted_run(synth_isic_records,
                                                                                            tmp_path):
    straight = tmp_path / "straight"
    run_training(config(synth_isic_records, straight, epochs=3), bootstrap=0)
    run = tmp_path / "run"
    args = [f"--data_dir={synth_isic_records}", f"--model_dir={run}", *TINY, "--epochs=3"]
    mark = tmp_path / "mark"
    kill_at_mark(KILL_DURING_BACKUP, args, mark, "no backup of epoch 2")
    backups = json.loads((run / "backup" / "state.json").read_text())["backups"]
    assert [b["epoch"] for b in backups] == [1]  # the half-written epoch 2 was never declared
    again = cli("stsc_tf.train", *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming after epoch 1" in again.stdout and "removed" in again.stdout  # the partial file is cleaned
    assert not [f for f in os.listdir(run / "backup") if ".tmp" in f]
    assert_same_state(state(straight), state(run))  # default dropout 0.2: the masks' random state was restored
    assert len(pd.read_csv(run / "log.csv")) == 3


def test_truncated_or_corrupt_backup_is_reported_and_the_previous_good_one_used(synth_isic_records, tmp_path,
                                                                                caplog):
    run = tmp_path / "run"
    run_training(config(synth_isic_records, run, epochs=2), bootstrap=0)
    latest = run / "backup" / "epoch-0002.weights.h5"
    latest.write_bytes(b"")  # what a kill during a non-atomic save used to leave
    caplog.set_level("INFO", logger="stsc_tf")
    run_training(config(synth_isic_records, run, epochs=3), allow_changes=("epochs",), bootstrap=0)
    assert "epoch-0002.weights.h5" in caplog.text and "trying the previous one" in caplog.text
    assert "resuming after epoch 1" in caplog.text
    assert int(state(run)[-1]) == 9 and len(pd.read_csv(run / "log.csv")) == 3
    # no state.json and only damaged files: start afresh, saying so
    (run / "backup" / "state.json").write_text("{ not json")
    for f in (run / "backup").glob("epoch-*.weights.h5"):
        f.write_bytes(b"\x89HDF garbage")
    caplog.clear()
    assert run_folder.restore_backup(run_folder.load_run(str(run), "last")[2], str(run / "backup")) == 0
    assert "state.json is damaged" in caplog.text and "no usable backup" in caplog.text


# ------------------------------------------------------------------------------------------------ 5. exports
KILL_DURING_EXPORT = r"""
import os, runpy, sys, time
from stsc_tf import exporting
original = exporting._write_warmup
def write_warmup(path, *args):  # the SavedModel is written, the version folder not yet in place
    original(path, *args)
    open(os.environ["STSC_TEST_MARK"], "w").close()
    time.sleep(120)
exporting._write_warmup = write_warmup
sys.argv = ["export"] + sys.argv[1:]
runpy.run_module("stsc_tf.export", run_name="__main__")
"""


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    from stsc_tf.data import synthetic

    raw = synthetic.write_isic(str(root / "raw"), num_images=120, image_size=32, seed=0)
    records = root / "records"
    convert(ConvertConfig(dataset="isic2018", source_dir=raw, output_dir=str(records), image_size=0, num_shards=4,
                          workers=1))
    run_training(config(records, root / "run", epochs=1), bootstrap=0)
    return {"root": root, "raw": raw, "records": records, "run": root / "run"}


def test_killed_export_leaves_no_version_folder_and_the_next_export_cleans_up(small_run, tmp_path):
    export_dir = tmp_path / "export"
    mark = tmp_path / "mark"
    kill_at_mark(KILL_DURING_EXPORT, [f"--model_dir={small_run['run']}", f"--export_dir={export_dir}",
                                      "--name=stsc", "--version=1"], mark)
    entries = os.listdir(export_dir / "stsc")
    assert "1" not in entries and any(e.startswith(".1.incomplete-") for e in entries)  # TF Serving sees nothing
    path = exporting.export_run(str(small_run["run"]), str(export_dir), "stsc", 1)
    assert sorted(os.listdir(export_dir / "stsc")) == [".export.lock", "1"]  # the killed one's folder is gone
    assert os.path.isfile(os.path.join(path, "saved_model.pb"))
    for name in ("../../x", "/abs", "a/b", "..", ""):
        with pytest.raises(ConfigError, match="--name"):
            exporting.export_run(str(small_run["run"]), str(export_dir), name, 2)
    assert not (tmp_path / "x").exists() and sorted(os.listdir(export_dir)) == ["stsc"]


# ------------------------------------------------------------------------------------------------ 6. non-finite
class Poison(keras.callbacks.Callback):
    """Makes one network's logits bias NaN at (epoch, batch): a divergence that shows from that point on (a NaN
    early in the network may be swallowed by ReLU; a NaN logit never is)."""

    def __init__(self, epoch, batch, network="student"):
        super().__init__()
        self.at, self.network, self.epoch = (epoch, batch), network, 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            weight = getattr(self.model, self.network).get_layer("logits").bias
            weight.assign(np.full(weight.shape, np.nan, weight.dtype))


@pytest.mark.parametrize("poison, message", [
    (Poison(1, 0, "student"), r"non-finite .*loss.* at step 5"),  # the next step's terms: named, with the step
    (Poison(1, 2, "teacher"), r"non-finite validation predictions after epoch 2"),  # train terms finite, val NaN
])
def test_a_non_finite_epoch_is_never_best_nor_backed_up(synth_isic_records, tmp_path, poison, message):
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match=message):
        run_training(config(synth_isic_records, run, epochs=3), extra_callbacks=[poison], bootstrap=0)
    assert json.loads((run / "best.json").read_text())["epoch"] == 1
    assert [b["epoch"] for b in json.loads((run / "backup" / "state.json").read_text())["backups"]] == [1]
    assert all(np.isfinite(w).all() for w in state(run, "last")[:-1])
    assert all(np.isfinite(w).all() for w in state(run, "best")[:-1])
    run_training(config(synth_isic_records, run, epochs=3), bootstrap=0)  # the rerun resumes from epoch 1, finite
    assert len(pd.read_csv(run / "log.csv")) == 3


def test_evaluation_refuses_non_finite_predictions_by_name(small_run):
    cfg, _, model = run_folder.load_run(str(small_run["run"]))
    weight = model.teacher.get_layer("logits").bias
    weight.assign(np.full(weight.shape, np.nan, weight.dtype))
    records = RecordSet.open(str(small_run["records"]))
    with pytest.raises(DataError, match=r"teacher's predictions on the test split are not finite .*first: ISIC_"):
        evaluation.evaluate_networks(model, records, "test", cfg, which=("teacher",), bootstrap=0)


def test_diverging_learning_rate_stops_naming_the_term_and_saves_nothing_from_it(synth_isic_records, tmp_path):
    run = tmp_path / "run"
    done = cli("stsc_tf.train", f"--data_dir={synth_isic_records}", f"--model_dir={run}", *TINY, "--epochs=3",
               "--learning_rate=1e12")
    assert done.returncode == 2 and "error: non-finite" in done.stderr, done.stderr[-2000:]
    assert not (run / "best.weights.h5").exists() and not (run / "backup" / "state.json").exists()
    assert "Your input ran out of data" not in done.stderr + done.stdout


# ------------------------------------------------------------------------------------------------ 7. CSV quoting
ODD_IDS = ["a,b", 'say "hi"', "with space", "naïve-ü", "x;y", "plain"]


def test_ids_and_groups_with_commas_quotes_spaces_and_non_ascii_survive(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(36):
        image_id = f"{ODD_IDS[i % len(ODD_IDS)]} {i}"
        colour = (200, 40, 40) if i % 2 else (40, 40, 200)
        Image.fromarray(np.clip(np.array(colour) + rng.normal(0, 20, (24, 24, 3)), 0, 255).astype(np.uint8)).save(
            src / f"{image_id}.png")
        rows.append((f"{image_id}.png", "red" if i % 2 else "blue", f"patient, \"{i // 2}\""))
    with open(src / "labels.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("file", "finding", "patient")] + rows)
    out = tmp_path / "records"
    convert(ConvertConfig(dataset="csv_folder", source_dir=str(src), output_dir=str(out), image_size=0, workers=1,
                          image_column="file", label_column="finding", group_column="patient", num_shards=2))
    verify_dataset(str(out))
    records = RecordSet.open(str(out))
    tables = pd.concat([records.table(s) for s in ("train", "val", "test")])
    assert sorted(tables["id"]) == sorted(r[0] for r in rows)
    truth = {r[0]: r[1] for r in rows}
    assert all(truth[i] == lab for i, lab in zip(tables["id"], tables["labels"]))  # no column shifted
    assert set(tables["group"]) <= {r[2] for r in rows}
    run = tmp_path / "run"
    cfg = config(out, run, epochs=1, data__labeled_ratio=0.5, data__batch_size=4, data__labeled_per_batch=2)
    run_training(cfg, bootstrap=0)
    labeled = run_folder.read_csv(str(run / "labeled_ids.csv"), dtype={"id": str})
    assert set(labeled["id"]) <= set(truth) and len(labeled) == json.loads((run / "run.json").read_text())["labeled"]


# ------------------------------------------------------------------------------------------------ 9. other records
def test_evaluate_refuses_records_with_other_classes_by_name(small_run, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(small_run["records"], other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["class_names"] = ["A", "B", "C", "D", "E", "F", "G"]  # same count, other names
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=r"classes \['A', 'B'.*trained on single_label classes \['MEL'"):
        evaluation.evaluate_run(str(small_run["run"]), data_dir=str(other), bootstrap=0)


# ------------------------------------------------------------------------------------------------ 11, 12. limits, paths
def _huge_png(path):
    Image.new("L", (16000, 16000)).save(path)  # about 250 KB on disk, 256 megapixels decoded


def test_oversized_and_outside_images_are_refused_by_the_converter(tmp_path):
    src = tmp_path / "src"
    (src / "img").mkdir(parents=True)
    outside = tmp_path / "outside.png"
    Image.new("RGB", (20, 20), (9, 9, 9)).save(outside)
    for i in range(12):
        Image.new("RGB", (20, 20), (10 * i, 0, 0)).save(src / "img" / f"ok{i}.png")
    _huge_png(src / "img" / "huge.png")
    os.symlink(outside, src / "img" / "link.png")
    rows = [(f"ok{i}.png", "a" if i % 2 else "b") for i in range(12)]

    def attempt(extra_rows, **kw):
        with open(src / "labels.csv", "w", newline="") as f:
            csv.writer(f).writerows([("file", "label")] + rows + extra_rows)
        return convert(ConvertConfig(dataset="csv_folder", source_dir=str(src), image_dir=str(src / "img"),
                                     output_dir=str(tmp_path / f"out{len(os.listdir(tmp_path))}"), image_size=0,
                                     workers=1, image_column="file", label_column="label", num_shards=1, **kw))

    with pytest.raises(DataError, match=r"huge.png.*256000000 pixels, above the limit of 40000000"):
        attempt([("huge.png", "a")])
    manifest = attempt([("huge.png", "a")], on_error="skip")
    assert manifest["skipped"] == 1
    for row, name in [(("../../outside.png", "a"), "outside.png"), ((str(outside), "a"), "outside.png"),
                      (("link.png", "a"), "link.png")]:
        with pytest.raises(DataError, match=rf"row 14 .*{name}.*outside .*--allow_external_paths"):
            attempt([row])
    assert attempt([("link.png", "a")], allow_external_paths=True)["splits"]["train"]["count"] > 0
    from PIL import Image as PILImage

    assert PILImage.MAX_IMAGE_PIXELS == ConvertConfig().max_image_pixels  # PIL's guard: configured, not disabled


def test_explain_and_gradcam_refuse_oversized_images_and_keep_same_named_files_apart(small_run, tmp_path):
    _huge_png(tmp_path / "huge.png")
    with pytest.raises(ConfigError, match=r"huge.png: image has more pixels than the limit"):
        explaining.gradcam_run(str(small_run["run"]), str(tmp_path / "huge.png"), str(tmp_path / "cams"))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    picture = os.path.join(small_run["raw"], "ISIC2018_Task3_Training_Input", "ISIC_0000000.jpg")
    shutil.copy(picture, tmp_path / "a" / "same.jpg")
    shutil.copy(picture, tmp_path / "b" / "same.jpg")
    written = explaining.gradcam_run(str(small_run["run"]), f"{tmp_path}/*/same.jpg", str(tmp_path / "cams"))
    assert sorted(os.path.basename(p) for p in written) == ["a_same_gradcam.png", "b_same_gradcam.png", "grid.png"]
    with pytest.raises(ConfigError, match="is a folder"):
        explaining.gradcam_run(str(small_run["run"]), str(tmp_path / "a"), str(tmp_path / "cams"))


# ------------------------------------------------------------------------------------------------ 13, 14. clear errors
def test_clear_one_line_errors_instead_of_tracebacks(small_run, tmp_path):
    # a shard whose bytes changed (same size): named, with the command that checks it
    damaged = tmp_path / "damaged"
    shutil.copytree(small_run["records"], damaged)
    shard = sorted(damaged.glob("train-*.tfrecord"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    done = cli("stsc_tf.train", f"--data_dir={damaged}", f"--model_dir={tmp_path / 'r1'}", *TINY, "--epochs=1")
    assert done.returncode == 2 and shard.name in done.stderr and "convert --verify" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    # an unknown key in config.json
    broken = tmp_path / "broken"
    shutil.copytree(small_run["run"], broken, ignore=shutil.ignore_patterns(".lock"))
    cfg = json.loads((broken / "config.json").read_text())
    cfg["train"]["nonsense"] = 1
    (broken / "config.json").write_text(json.dumps(cfg))
    done = cli("stsc_tf.evaluate", f"--model_dir={broken}", "--bootstrap=0")
    assert done.returncode == 2 and "train.nonsense" in done.stderr and "Traceback" not in done.stderr
    # --num_images=0
    done = cli("stsc_tf.explain", "gradcam", f"--model_dir={small_run['run']}", "--num_images=0")
    assert done.returncode == 2 and "--num_images must be >= 1" in done.stderr
    # convert --verify of an existing conversion, without --source_dir
    done = cli("stsc_tf.convert", "--verify", f"--output_dir={small_run['records']}")
    assert done.returncode == 0 and "verified" in done.stdout, done.stderr[-2000:]
    done = cli("stsc_tf.convert", "--verify", f"--output_dir={damaged}")
    assert done.returncode == 2 and shard.name in done.stderr


def test_a_csv_row_with_more_fields_than_the_header_is_refused_naming_it(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (8, 8)).save(src / "a.png")
    (src / "labels.csv").write_text("file,label\na.png,x\nb.png,y,extra,fields\n")
    with pytest.raises(DataError, match=r"labels.csv row 3: 4 fields, the header has 2"):
        convert(ConvertConfig(dataset="csv_folder", source_dir=str(src), output_dir=str(tmp_path / "o"),
                              image_column="file", label_column="label", workers=1))


def test_a_read_only_model_dir_is_named(synth_isic_records, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    # root ignores permission bits: there the folder is made immutable (ext4's chattr +i binds root too)
    lock, unlock = ((["chattr", "+i", str(run)], ["chattr", "-i", str(run)]) if os.geteuid() == 0 else
                    (["chmod", "555", str(run)], ["chmod", "755", str(run)]))
    subprocess.run(lock, check=True)
    try:
        with pytest.raises(ConfigError, match=r"--model_dir='.*run' cannot be written"):
            run_training(config(synth_isic_records, run, epochs=1), bootstrap=0)
    finally:
        subprocess.run(unlock, check=True)
    assert os.listdir(run) == []


# ------------------------------------------------------------------------------------------------ 2. conversions
KILL_DURING_CONVERSION = r"""
import os, runpy, sys, time
from stsc_tf.data import convert
original = convert.verify_dataset
def verify(path, *args, **kwargs):  # the new conversion is written, not yet in place
    open(os.environ["STSC_TEST_MARK"], "w").close()
    time.sleep(120)
convert.verify_dataset = verify
sys.argv = ["convert"] + sys.argv[1:]
runpy.run_module("stsc_tf.convert", run_name="__main__")
"""


def test_overwrite_keeps_the_old_conversion_until_the_new_one_is_complete(synth_isic_raw, tmp_path):
    out = tmp_path / "out"
    convert(ConvertConfig(dataset="isic2018", source_dir=synth_isic_raw, output_dir=str(out), image_size=0,
                          workers=1, num_shards=2))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad_source = tmp_path / "bad"
    shutil.copytree(synth_isic_raw, bad_source)
    victim = next((bad_source / "ISIC2018_Task3_Training_Input").glob("*.jpg"))
    victim.write_bytes(victim.read_bytes()[:200])  # one truncated image in the new source
    with pytest.raises(DataError, match=victim.stem):
        convert(ConvertConfig(dataset="isic2018", source_dir=str(bad_source), output_dir=str(out), image_size=0,
                              workers=1, overwrite=True))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched
    # a real kill while the new conversion is complete but not yet in place
    mark = tmp_path / "mark"
    args = ["--dataset=isic2018", f"--source_dir={synth_isic_raw}", f"--output_dir={out}", "--image_size=0",
            "--workers=1", "--num_shards=3", "--overwrite"]
    kill_at_mark(KILL_DURING_CONVERSION, args, mark)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert any(p.name.startswith(".out.converting-") for p in tmp_path.iterdir())
    # a kill between the two renames of the swap: the old one moved aside, the new one not in place
    aside = tmp_path / ".out.replaced-999999"
    out.rename(aside)
    (aside / ".stsc_convert_replaced").write_text("{}")
    manifest = convert(ConvertConfig(dataset="isic2018", source_dir=synth_isic_raw, output_dir=str(out),
                                     image_size=0, workers=1, num_shards=3, overwrite=True))
    assert len(manifest["splits"]["train"]["shards"]) == 3 and verify_dataset(str(out))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == [".out.lock"]


def test_overwrite_refuses_to_delete_files_a_user_put_beside_a_conversion(synth_isic_raw, tmp_path):
    out = tmp_path / "out"
    convert(ConvertConfig(dataset="isic2018", source_dir=synth_isic_raw, output_dir=str(out), image_size=0,
                          workers=1, num_shards=1))
    (out / "my_notes.txt").write_text("keep me")
    with pytest.raises(DataError, match=r"my_notes.txt.*move them out"):
        convert(ConvertConfig(dataset="isic2018", source_dir=synth_isic_raw, output_dir=str(out), image_size=0,
                              workers=1, overwrite=True))
    assert (out / "my_notes.txt").read_text() == "keep me"


# ------------------------------------------------------------------------------------------------ 11. serving limit
def test_the_exported_model_refuses_oversized_images_from_their_header(small_run, tmp_path):
    path = exporting.export_run(str(small_run["run"]), str(tmp_path / "export"), "stsc", 1, max_pixels=50 * 50)
    served = tf.saved_model.load(path).signatures["serving_default"]
    small, large = tmp_path / "small.png", tmp_path / "large.png"
    Image.new("RGB", (40, 40), (90, 20, 20)).save(small)
    Image.new("RGB", (60, 60), (90, 20, 20)).save(large)
    assert served(image_bytes=tf.constant([small.read_bytes()]))["probabilities"].shape == (1, 7)
    with pytest.raises(tf.errors.InvalidArgumentError, match="more pixels than the limit of 2500"):
        served(image_bytes=tf.constant([large.read_bytes()]))
    default = tf.saved_model.load(exporting.export_run(str(small_run["run"]), str(tmp_path / "export"), "stsc", 2))
    _huge_png(tmp_path / "huge.png")  # 250 KB declaring 16000 x 16000: refused before any pixel is decoded
    with pytest.raises(tf.errors.InvalidArgumentError, match="more pixels than the limit of 40000000"):
        default.signatures["serving_default"](image_bytes=tf.constant([(tmp_path / "huge.png").read_bytes()]))


# ------------------------------------------------------------------------------------------------ third pass
@pytest.mark.parametrize("change, flag", [
    ({"train__steps_per_epoch": -1}, "--steps_per_epoch"), ({"data__shuffle_buffer": 0}, "--shuffle_buffer"),
    ({"train__weight_decay": -1.0}, "--weight_decay"), ({"train__threshold": 2.0}, "--threshold"),
    ({"loss__consistency": float("inf")}, "--consistency"), ({"train__learning_rate": float("nan")}, "--learning_rate"),
    ({"data__rotation_deg": float("nan")}, "--rotation_deg"), ({"model__backbone": "os:getcwd"}, "--backbone"),
])
def test_flags_no_run_can_use_are_refused_by_name_before_any_file_is_written(small_run, tmp_path, change, flag):
    folder = tmp_path / "new"
    with pytest.raises(ConfigError, match=flag):
        run_training(config(small_run["records"], folder, epochs=1, **change), bootstrap=0)
    assert not folder.exists() or not any(p.name.endswith((".json", ".csv")) for p in folder.iterdir())


def test_a_flag_that_fails_to_build_the_model_leaves_no_run_and_jit_compile_trains(small_run, tmp_path):
    folder = tmp_path / "new"
    empty = tmp_path / "empty"
    empty.mkdir()
    for change, message in (({"model__relation_layer": "nope"}, "nope"),
                            ({"train__init_from": str(empty)}, "--init_from=.*not a run folder")):
        with pytest.raises(ConfigError, match=message):
            run_training(config(small_run["records"], folder, epochs=1, **change), bootstrap=0)
        assert not (folder / "config.json").exists() and not (folder / "run.json").exists()
        assert not (folder / "labeled_ids.csv").exists()
    # the corrected command is a new run (nothing of the failed one is in its way); compiled with XLA
    run_training(config(small_run["records"], folder, epochs=1, train__jit_compile=True), bootstrap=0)
    assert (folder / "config.json").exists() and (folder / "best.weights.h5").exists()


def test_a_full_disk_while_saving_weights_names_the_file_and_keeps_the_previous_one(small_run, tmp_path,
                                                                                  monkeypatch):
    _, _, model = run_folder.load_run(str(small_run["run"]), "best")
    target = tmp_path / "last.weights.h5"
    run_folder.atomic_save_weights(model, str(target))
    before = target.read_bytes()

    def full(path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("Can't close file (file write failed: errno = 28, error message = 'No space left')")

    monkeypatch.setattr(model, "save_weights", full)
    with pytest.raises(OSError, match="No space left on device") as caught:
        run_folder.atomic_save_weights(model, str(target))
    assert caught.value.filename == str(target) and target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.weights.h5"]


def test_a_conversion_never_replaces_records_a_process_is_reading(small_run, tmp_path):
    records = tmp_path / "records"
    shutil.copytree(small_run["records"], records)
    again = ConvertConfig(dataset="isic2018", source_dir=small_run["raw"], output_dir=str(records), image_size=0,
                          num_shards=2, workers=1, seed=3, overwrite=True)
    before = files_of(records, ["manifest.json", "train.csv"])
    with RecordSet.open(str(records)).reading():  # a training, evaluation or prediction reads them
        with pytest.raises(DataError, match="another process uses .*records"):
            convert(again)
    assert files_of(records, ["manifest.json", "train.csv"]) == before
    convert(again)  # nobody reads them now
    assert files_of(records, ["manifest.json", "train.csv"]) != before
