"""After training: predict new images, thresholds and calibration fitted on validation, the calibrated export, and
the images to label next (fed back into training)."""

import csv
import glob
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from PIL import Image

from stsc_tf import calibration, evaluation, explaining, exporting, run_folder, suggesting
from stsc_tf.config import Config, ConvertConfig, DataConfig, LossConfig, ModelConfig, TrainConfig
from stsc_tf.data import augment, synthetic
from stsc_tf.data.convert import convert
from stsc_tf.errors import ConfigError, DataError
from stsc_tf.files import split_plus
from stsc_tf.data.pipeline import RecordSet
from stsc_tf.training import labeled_selection, run_training

from conftest import ROOT, shared

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}


def _train(root, layout, **loss):
    raw = (synthetic.write_isic if layout == "isic" else synthetic.write_chestxray14)(
        str(root / f"raw_{layout}"), num_images=160, image_size=32, seed=0)
    records = str(root / f"rec_{layout}")
    convert(ConvertConfig(dataset="isic2018" if layout == "isic" else "chestxray14", source_dir=raw,
                          output_dir=records, image_size=0, num_shards=2, workers=1))
    cfg = Config(data=DataConfig(data_dir=records, image_size=32, batch_size=16, labeled_per_batch=4,
                                 labeled_ratio=0.5, cache=True),
                 model=ModelConfig(backbone="tiny", dropout=0.1),
                 loss=LossConfig(consistency_start_epoch=-1, consistency_rampup=1, tsc_start_epoch=2, **loss),
                 train=TrainConfig(model_dir=str(root / f"run_{layout}"), epochs=4, steps_per_epoch=8,
                                   learning_rate=3e-3, strategy="none", relation_every_epochs=0))
    run_training(cfg, bootstrap=0)
    return {"raw": raw, "records": records, "run": str(root / f"run_{layout}")}


@pytest.fixture(scope="module")
def isic(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("after"), "isic")


@pytest.fixture(scope="module")
def chest(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("after"), "chest")


# ------------------------------------------------------------------------------------------------ thresholds
def test_thresholds_and_calibration_are_fitted_on_the_validation_split_only(isic, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(isic["run"], run)
    records = tmp_path / "records"
    shutil.copytree(isic["records"], records)
    test_shard = next(records.glob("test-*.tfrecord"))  # damaged: reading it would fail, naming it
    data = bytearray(test_shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    test_shard.write_bytes(bytes(data))
    evaluation.evaluate_run(str(run), split="val", data_dir=str(records), fit=True, bootstrap=0)
    fitted = json.loads((run / "calibration.json").read_text())
    assert fitted["split"] == "val" and set(fitted["networks"]) == {"student", "teacher"}
    for name, entry in fitted["networks"].items():
        assert len(entry["thresholds"]) == 7 and entry["calibration"]["method"] == "temperature"
        assert (run / f"reliability_val_{name}.png").is_file()
    with pytest.raises(DataError, match=test_shard.name):  # the test split was never read above
        evaluation.evaluate_run(str(run), split="test", data_dir=str(records), bootstrap=0)
    table = (run / "eval_val.md").read_text()
    assert "p >= 0.18 (paper)" in table and "validated youden thresholds, temperature-calibrated" in table
    results = json.loads((run / "eval_val.json").read_text())
    assert results["teacher"]["validated"]["paper"]["threshold"] == fitted["networks"]["teacher"]["thresholds"]
    assert results["teacher"]["ece"] >= 0 and results["teacher"]["validated"]["ece"] >= 0


def test_a_calibration_fitted_on_other_weights_is_refused_or_ignored(isic, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(isic["run"], run)
    evaluation.evaluate_run(str(run), split="val", fit=True, bootstrap=0)
    _, _, model = run_folder.load_run(str(run))  # training went on: "best" holds other weights now
    bias = model.teacher.get_layer("logits").bias
    bias.assign(bias.numpy() + 0.5)
    model.save_weights(str(run / "best.weights.h5"))
    with pytest.raises(ConfigError, match="fitted on other weights"):
        evaluation.predict_run(str(run), data_dir=isic["records"], out=str(tmp_path / "p.csv"),
                               thresholds="validated")
    with pytest.raises(ConfigError, match="fitted on other weights"):
        evaluation.evaluate_run(str(run), split="val", thresholds="validated", bootstrap=0)
    path = exporting.export_run(str(run), str(tmp_path / "export"), "stsc", 1)  # exported without them
    assert "calibrated_probabilities" not in tf.saved_model.load(path).signatures["predict_pixels"].structured_outputs


def test_the_export_carries_the_temperature_calibration_of_a_single_label_run(isic, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(isic["run"], run)
    evaluation.evaluate_run(str(run), split="val", fit=True, bootstrap=0)
    entry = json.loads((run / "calibration.json").read_text())["networks"]["teacher"]
    served = tf.saved_model.load(exporting.export_run(str(run), str(tmp_path / "e"), "stsc", 1))
    pixels = np.random.default_rng(1).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    out = served.signatures["predict_pixels"](pixels=tf.constant(pixels))
    _, _, model = run_folder.load_run(str(run))
    _, logits = model.teacher(augment.eval_preprocess(pixels, 32), training=False)
    z = np.asarray(logits, np.float64) / entry["calibration"]["temperature"]
    expected = np.exp(z - z.max(1, keepdims=True))
    np.testing.assert_allclose(out["calibrated_probabilities"], expected / expected.sum(1, keepdims=True), atol=1e-5)
    np.testing.assert_array_equal(out["class_index"], np.argmax(expected, 1))  # the temperature keeps the argmax


def test_validated_thresholds_are_required_by_name_and_platt_is_for_multi_label(isic, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(isic["run"], run)
    (run / "calibration.json").unlink(missing_ok=True)
    with pytest.raises(ConfigError, match="no calibration.json.*--fit_thresholds"):
        evaluation.evaluate_run(str(run), thresholds="validated", bootstrap=0)
    with pytest.raises(ConfigError, match="platt"):
        evaluation.evaluate_run(str(run), fit=True, method="platt", bootstrap=0)


def test_the_export_gains_calibrated_outputs_and_multi_label_decisions(chest, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(chest["run"], run)
    evaluation.evaluate_run(str(run), split="val", fit=True, method="platt", criterion="f1", bootstrap=0)
    entry = json.loads((run / "calibration.json").read_text())["networks"]["teacher"]
    path = exporting.export_run(str(run), str(tmp_path / "export"), "chest", 1)
    served = tf.saved_model.load(path).signatures["predict_pixels"]
    pixels = np.random.default_rng(0).uniform(0, 255, (5, 32, 32, 3)).astype("float32")
    out = served(pixels=tf.constant(pixels))
    assert {"probabilities", "calibrated_probabilities", "positive", "positive_paper"} <= set(out)
    _, _, model = run_folder.load_run(str(run))
    _, logits = model.teacher(augment.eval_preprocess(pixels, 32), training=False)
    expected = calibration.Calibration.from_dict(entry["calibration"]).apply(np.asarray(logits))
    np.testing.assert_allclose(out["calibrated_probabilities"], expected, atol=1e-5)
    np.testing.assert_array_equal(out["positive"], expected >= np.array(entry["thresholds"]))
    np.testing.assert_array_equal(out["positive_paper"], out["probabilities"].numpy() >= 0.18)
    with pytest.raises(tf.errors.InvalidArgumentError, match="NaN or Inf"):  # 8. non-finite pixels refused
        served(pixels=tf.constant(np.full((1, 32, 32, 3), np.nan, "float32")))


# ------------------------------------------------------------------------------------------------ predict
def _odd_images(folder):
    rng = np.random.default_rng(1)
    folder.mkdir()
    rgb = rng.integers(0, 255, (40, 48, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(folder / "photo.jpg")
    Image.fromarray(rgb[..., 0]).save(folder / "gray.png")
    Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(folder / "rgba.png")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(folder / "deep16.png")
    (folder / "sub").mkdir()
    Image.fromarray(rgb).save(folder / "sub" / "nested.jpg")
    (folder / "notes.png").write_text("not an image")
    (folder / "cut.jpg").write_bytes((folder / "photo.jpg").read_bytes()[:300])
    Image.new("L", (16000, 16000)).save(folder / "huge.png")


def test_predict_a_folder_of_odd_images_to_a_csv_with_every_file_accounted_for(isic, tmp_path):
    images = tmp_path / "new"
    _odd_images(images)
    out = tmp_path / "preds.csv"
    done = subprocess.run([sys.executable, "-m", "stsc_tf.predict", f"--model_dir={isic['run']}",
                           f"--images={images}/**/*.*", f"--out={out}", "--batch_size=3"], capture_output=True,
                          text=True, env=ENV, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    preds = pd.read_csv(out)
    skipped = pd.read_csv(tmp_path / "preds.skipped.csv")
    good = {"photo.jpg", "gray.png", "rgba.png", "deep16.png", "nested.jpg"}
    assert {os.path.basename(p) for p in preds["path"]} == good
    assert {os.path.basename(p): w for p, w in zip(skipped["path"], skipped["why"])} == {
        "notes.png": "not a JPEG or PNG image",
        "cut.jpg": "corrupt or truncated image data (the decoder failed)",
        "huge.png": "image has more pixels than the limit of 40000000"}
    assert "predicted 5 image(s), skipped 3" in done.stdout
    probs = preds[[c for c in preds.columns if c.startswith("p_")]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-4)
    assert set(preds["prediction"]) <= {c[2:] for c in preds.columns if c.startswith("p_")}
    assert ((preds["uncertainty"] - (preds["entropy"] + preds["disagreement"]) / 2).abs() < 1e-5).all()
    # the same preprocessing as serving: the exported model gives the same numbers for the same file
    path = exporting.export_run(isic["run"], str(tmp_path / "export"), "stsc", 1)
    served = tf.saved_model.load(path).signatures["serving_default"]
    blob = (images / "photo.jpg").read_bytes()
    row = preds[preds["path"].str.endswith("photo.jpg")]
    np.testing.assert_allclose(served(image_bytes=tf.constant([blob]))["probabilities"].numpy()[0],
                               row[[c for c in preds.columns if c.startswith("p_")]].to_numpy()[0], atol=1e-5)


def test_predict_streams_in_constant_memory_and_writes_its_csv_only_when_complete(isic, tmp_path):
    image = os.path.join(isic["raw"], "ISIC2018_Task3_Training_Input", "ISIC_0000000.jpg")

    def run(n):
        listing = tmp_path / f"list{n}.txt"
        with open(listing, "w") as f:
            for i in range(n):  # every other entry is a missing file: skips are streamed too
                f.write(f"{tmp_path}/missing_{i}.jpg\n" if i % 2 else f"{image}\n")
        out = tmp_path / f"preds{n}.csv"
        code = ("import resource, runpy, sys; sys.argv = ['predict'] + sys.argv[1:];\n"
                "try:\n    runpy.run_module('stsc_tf.predict', run_name='__main__')\n"
                "except SystemExit:\n    pass\n"
                "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
        proc = subprocess.Popen([sys.executable, "-c", code, f"--model_dir={isic['run']}",
                                 f"--image_list={listing}", f"--out={out}", "--batch_size=256"], env=ENV, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first_sight = None
        while proc.poll() is None and first_sight is None:
            if out.exists():  # never a half CSV: the file appears complete (as it ends), or not at all
                first_sight = out.read_bytes()
            time.sleep(0.05)
        stdout, stderr = proc.communicate()
        assert proc.returncode == 0, stderr[-3000:]
        assert first_sight is None or first_sight == out.read_bytes()
        peak_kb = int(stdout.strip().splitlines()[-1].split()[1])
        rows = sum(1 for _ in open(out)) - 1
        skipped = sum(1 for _ in open(tmp_path / f"preds{n}.skipped.csv")) - 1
        assert rows + skipped == n and skipped == n // 2
        return peak_kb

    small, large = run(1_000), run(10_000)
    assert large - small < 80_000, f"peak RSS grew by {(large - small) / 1024:.0f} MB for 10x the images"


def test_predict_a_multi_label_split_with_validated_thresholds(chest, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(chest["run"], run)
    evaluation.evaluate_run(str(run), split="val", fit=True, bootstrap=0)
    out = tmp_path / "chest.csv"
    summary = evaluation.predict_run(str(run), data_dir=chest["records"], split="test", out=str(out),
                                     thresholds="validated")
    preds = pd.read_csv(out, keep_default_na=False)
    assert summary["predicted"] == len(preds) > 0 and summary["skipped"] == 0
    entry = json.loads((run / "calibration.json").read_text())["networks"]["teacher"]
    probs = preds[[f"p_{c}" for c in json.loads((run / "run.json").read_text())["class_names"]]].to_numpy()
    names = [c[2:] for c in preds.columns if c.startswith("p_")]
    expected = ["|".join(n for n, p, t in zip(names, row, entry["thresholds"]) if p >= t - 1e-6) for row in probs]
    assert list(preds["positive"]) == expected


# ------------------------------------------------------------------------------------------------ suggest
def test_suggest_ranks_unlabeled_images_and_its_list_feeds_back_into_training(isic, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(isic["run"], run)
    out = tmp_path / "to_label.csv"
    done = subprocess.run([sys.executable, "-m", "stsc_tf.suggest", f"--model_dir={run}", "--budget=12",
                           f"--out={out}"], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    table = pd.read_csv(out, keep_default_na=False, dtype={"id": str})
    labeled = set(run_folder.read_csv(str(run / "labeled_ids.csv"), dtype={"id": str})["id"])
    assert len(table) == 12 and list(table["rank"]) == list(range(1, 13)) and not set(table["id"]) & labeled
    for column in ("score", "uncertainty", "entropy", "disagreement", "max_similarity", "teacher_prediction",
                   "labels"):
        assert column in table.columns
    assert (tmp_path / "to_label.png").is_file() and "--labeled_ids=" in done.stdout
    # the expert labels two of them (one differently from the records), the rest keep the records' labels
    table.loc[0, "labels"], table.loc[1, "labels"] = "MEL", "NV"
    table.to_csv(out, index=False)
    cfg = run_folder.read_config(str(run))
    new = tmp_path / "round1"
    cfg = Config.from_dict({**cfg.to_dict(),
                            "data": {**cfg.data.__dict__, "labeled_ids": f"{run / 'labeled_ids.csv'}+{out}"},
                            "train": {**cfg.train.__dict__, "model_dir": str(new), "init_from": str(run),
                                      "epochs": 1}})
    selection, label_table = labeled_selection(RecordSet.open(isic["records"]), cfg)
    train = RecordSet.open(isic["records"]).table("train").set_index("id")
    names = json.loads((run / "run.json").read_text())["class_names"]
    for image_id, given in zip(table["id"][:2], ("MEL", "NV")):  # the expert's labels, not the records'
        assert names[int(np.argmax(label_table[int(train.loc[image_id, "index"])]))] == given
    caplog.set_level("INFO", logger="stsc_tf")
    run_training(cfg, bootstrap=0)
    assert f"started from {run}" in caplog.text  # --init_from: the previous round's networks
    info = json.loads((new / "run.json").read_text())
    assert info["labeled"] == len(labeled) + 12 == len(selection)
    enlarged = set(run_folder.read_csv(str(new / "labeled_ids.csv"), dtype={"id": str})["id"])
    assert enlarged == labeled | set(table["id"])


def test_suggest_refuses_a_run_whose_training_split_is_all_labeled(isic, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(isic["run"], run)
    train = pd.read_csv(os.path.join(isic["records"], "train.csv"), dtype={"id": str}, keep_default_na=False)
    train[["id", "index"]].to_csv(run / "labeled_ids.csv", index=False)
    with pytest.raises(ConfigError, match="every training image .* is labeled already"):
        suggesting.suggest_run(str(run), budget=5)


def test_outputs_never_replace_what_a_user_wrote_and_literal_names_are_found(isic, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(isic["run"], run)
    listing = tmp_path / "to_label.csv"
    suggesting.suggest_run(str(run), budget=3, out=str(listing))
    suggesting.suggest_run(str(run), budget=3, out=str(listing))  # its own untouched list may be replaced
    table = pd.read_csv(listing, keep_default_na=False, dtype=str)
    table.loc[0, "labels"] = "MEL"  # the expert has started labeling
    table.to_csv(listing, index=False)
    before = listing.read_bytes()
    with pytest.raises(ConfigError, match="holds labels an expert gave"):
        suggesting.suggest_run(str(run), budget=3, out=str(listing))
    notes = tmp_path / "notes.csv"
    notes.write_text("patient,comment\n1,keep\n")
    with pytest.raises(ConfigError, match="not a suggestion list"):
        suggesting.suggest_run(str(run), budget=3, out=str(notes))
    with pytest.raises(ConfigError, match="not a list predict wrote"):
        evaluation.predict_run(str(run), data_dir=isic["records"], out=str(notes))
    stats = tmp_path / "stats.csv"  # a user's table that merely starts like predictions
    stats.write_text("path,p_value,n\nstudy1,0.03,10\n")
    with pytest.raises(ConfigError, match="not a list predict wrote"):
        evaluation.predict_run(str(run), data_dir=isic["records"], out=str(stats))
    (tmp_path / "preds.skipped.csv").write_text("mine\n")  # a user's file where the skipped list would go
    with pytest.raises(ConfigError, match="skipped list.*not a list predict wrote"):
        evaluation.predict_run(str(run), data_dir=isic["records"], out=str(tmp_path / "preds.csv"))
    sheet = tmp_path / "mine.png"  # suggest's thumbnail sheet would replace a user's picture
    sheet.write_bytes(b"picture")
    with pytest.raises(ConfigError, match="mine.png.*without the suggestion list"):
        suggesting.suggest_run(str(run), budget=3, out=str(tmp_path / "mine.csv"))
    assert stats.read_text().startswith("path,p_value") and sheet.read_bytes() == b"picture"
    assert (tmp_path / "preds.skipped.csv").read_text() == "mine\n" and not (tmp_path / "mine.csv").exists()
    with pytest.raises(ConfigError, match="give a .csv path"):
        evaluation.predict_run(str(run), data_dir=isic["records"], out=str(tmp_path / "photo.jpg"))
    assert listing.read_bytes() == before and notes.read_text() == "patient,comment\n1,keep\n"
    # a file whose name holds glob characters is itself, not a pattern
    odd = tmp_path / "scan[1].jpg"
    shutil.copy(sorted(glob.glob(os.path.join(isic["raw"], "**", "*.jpg"), recursive=True))[0], odd)
    result = evaluation.predict_run(str(run), images=str(odd), out=str(tmp_path / "odd.csv"))
    assert list(pd.read_csv(tmp_path / "odd.csv")["path"]) == [str(odd)], result
    comma = tmp_path / "a,b.jpg"  # a comma in the name: the whole value names the file
    shutil.copy(odd, comma)
    evaluation.predict_run(str(run), images=str(comma), out=str(tmp_path / "comma.csv"))
    assert list(pd.read_csv(tmp_path / "comma.csv")["path"]) == [str(comma)]
    # an --image_list saved with a byte-order mark and CRLF; one that is not text is refused before any work
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"\xef\xbb\xbf" + f"{odd}\r\n{comma}\r\n".encode())
    evaluation.predict_run(str(run), image_list=str(listing), out=str(tmp_path / "listed.csv"))
    assert list(pd.read_csv(tmp_path / "listed.csv")["path"]) == [str(odd), str(comma)]
    listing.write_bytes(f"{odd}\n".encode() + b"caf\xe9.jpg\n")
    with pytest.raises(ConfigError, match="not a UTF-8 text file"):
        evaluation.predict_run(str(run), image_list=str(listing), out=str(tmp_path / "latin.csv"))
    with pytest.raises(ConfigError, match="is a folder"):
        evaluation.predict_run(str(run), image_list=str(tmp_path), out=str(tmp_path / "latin.csv"))
    assert not (tmp_path / "latin.csv").exists()


def test_suggest_and_explain_find_records_that_moved(isic, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(isic["run"], run)
    moved = tmp_path / "records_now_here"
    shutil.copytree(isic["records"], moved)
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "data_dir": str(tmp_path / "gone")}))
    with pytest.raises(ConfigError, match="no longer in .*gone.*--data_dir"):
        suggesting.suggest_run(str(run), budget=3, out=str(tmp_path / "s.csv"))
    suggesting.suggest_run(str(run), budget=3, out=str(tmp_path / "s.csv"), data_dir=str(moved))
    assert len(pd.read_csv(tmp_path / "s.csv")) == 3
    with pytest.raises(ConfigError, match="other records than the run"):  # other content under --data_dir
        suggesting.suggest_run(str(run), budget=3, out=str(tmp_path / "t.csv"), data_dir=isic_other(tmp_path))
    for bad, message in ((float("nan"), "--diversity"), (-1.0, "--diversity")):
        with pytest.raises(ConfigError, match=message):
            suggesting.suggest_run(str(run), budget=3, out=str(tmp_path / "t.csv"), diversity=bad)
    with pytest.raises(ConfigError, match="--batch_size"):
        suggesting.suggest_run(str(run), budget=3, out=str(tmp_path / "t.csv"), batch_size=0)


def isic_other(tmp_path) -> str:
    """A conversion of other synthetic images with the same classes."""
    raw = synthetic.write_isic(str(tmp_path / "other_raw"), num_images=60, image_size=32, seed=5)
    out = str(tmp_path / "other_rec")
    convert(ConvertConfig(dataset="isic2018", source_dir=raw, output_dir=out, image_size=0, num_shards=1, workers=1))
    return out


def test_no_output_of_another_run_or_changed_since_is_replaced_and_reconverted_records_are_refused(isic, tmp_path):
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    for run in (run_a, run_b):
        shutil.copytree(isic["run"], run, ignore=shutil.ignore_patterns(run_folder.OUTPUTS))
    out = tmp_path / "preds.csv"
    evaluation.predict_run(str(run_a), data_dir=isic["records"], out=str(out))
    evaluation.predict_run(str(run_a), data_dir=isic["records"], out=str(out))  # its own, unchanged: replaced
    before = out.read_bytes()
    with pytest.raises(ConfigError, match="preds.csv.*not an unchanged output of this run"):
        evaluation.predict_run(str(run_b), data_dir=isic["records"], out=str(out))
    listing = tmp_path / "next.csv"
    suggesting.suggest_run(str(run_a), budget=3, out=str(listing))
    with pytest.raises(ConfigError, match="next.csv.*not an unchanged output of this run"):
        suggesting.suggest_run(str(run_b), budget=3, out=str(listing))
    pictures = tmp_path / "pictures"  # a user's own pictures in explain's --out
    pictures.mkdir()
    (pictures / "grid.png").write_bytes(b"mine")
    with pytest.raises(ConfigError, match="grid.png.*not an unchanged output"):
        explaining.gradcam_run(str(run_a), images="", out=str(pictures), num_images=2)
    cams = tmp_path / "cams"
    explaining.gradcam_run(str(run_a), images="", out=str(cams), num_images=2)
    explaining.gradcam_run(str(run_a), images="", out=str(cams), num_images=2)  # its own: replaced
    assert out.read_bytes() == before and (pictures / "grid.png").read_bytes() == b"mine"
    # a '+' inside a name: the printed command works as printed
    plus = tmp_path / "dir+plus"
    plus.mkdir()
    suggesting.suggest_run(str(run_a), budget=3, out=str(plus / "my list.csv"))
    parts = split_plus(f"{run_a}/labeled_ids.csv+{plus}/my list.csv")
    assert parts == [f"{run_a}/labeled_ids.csv", f"{plus}/my list.csv"]
    # the records converted again in place (another split): every command refuses them, by name
    records = tmp_path / "records"
    shutil.copytree(isic["records"], records)
    info = json.loads((run_a / "run.json").read_text())
    (run_a / "run.json").write_text(json.dumps({**info, "data_dir": str(records)}))
    convert(ConvertConfig(dataset="isic2018", source_dir=isic["raw"], output_dir=str(records), image_size=0,
                          num_shards=2, workers=1, seed=7, overwrite=True))
    for call in (lambda: evaluation.evaluate_run(str(run_a), bootstrap=0),
                 lambda: evaluation.evaluate_run(str(run_a), bootstrap=0, fit=True),
                 lambda: suggesting.suggest_run(str(run_a), budget=3, out=str(tmp_path / "z.csv")),
                 lambda: explaining.gradcam_run(str(run_a), images="", out=str(tmp_path / "z"), num_images=2)):
        with pytest.raises(ConfigError, match="other records than the run"):
            call()


def test_a_calibration_is_bound_to_the_weights_it_was_fitted_on(isic, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(isic["run"], run, ignore=shutil.ignore_patterns(run_folder.CALIBRATION))
    cfg, _, model = run_folder.load_run(str(run), "best")
    with pytest.raises(ConfigError, match="changed while it was being evaluated"):  # replaced after loading
        evaluation.fit_thresholds(model, RecordSet.open(isic["records"]), cfg, str(run), ("teacher",),
                                  loaded_sha256="0" * 64)
    assert not (run / run_folder.CALIBRATION).exists()
