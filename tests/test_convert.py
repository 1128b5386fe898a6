"""The converter: round trips, the real samples, atomicity, verification and every bad input of the data issue."""

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from PIL import Image

from stsc_tf.config import ConvertConfig
from stsc_tf.data import augment, features
from stsc_tf.data.convert import convert, load_manifest, verify_dataset
from stsc_tf.data.sources import chestxray14, isic2018
from stsc_tf.errors import DataError

from conftest import ROOT


def read_all(out_dir):
    """Every record of every split: id -> (split, index, label, decoded image)."""
    manifest = load_manifest(out_dir)
    k = len(manifest["class_names"])
    recs = {}
    for split, info in manifest["splits"].items():
        files = [os.path.join(out_dir, s["file"]) for s in info["shards"]]
        for r in tf.data.TFRecordDataset(files).map(lambda s: features.parse_example(s, k)):
            recs[r["id"].numpy().decode()] = (split, int(r["index"]), r["label"].numpy(), r["group"].numpy().decode(),
                                              augment.decode(r["encoded"]).numpy(), r["encoded"].numpy())
    return manifest, recs


def run_convert(tmp_path, source_dir, dataset="isic2018", name="out", **kw):
    kw.setdefault("workers", 1)
    kw.setdefault("image_size", 0)
    cfg = ConvertConfig(dataset=dataset, source_dir=str(source_dir), output_dir=str(tmp_path / name), **kw)
    return convert(cfg), str(tmp_path / name)


# ------------------------------------------------------------------------------------------------ round trip
def test_round_trip_over_shards(synth_isic_raw, synth_isic_records):
    manifest, recs = read_all(synth_isic_records)
    assert len(manifest["splits"]["train"]["shards"]) >= 3
    gt = pd.read_csv(os.path.join(synth_isic_raw, isic2018.TRAIN_CSV))
    assert set(recs) == set(gt["image"])
    for _, row in gt.iterrows():
        split, index, label, _, image, encoded = recs[row["image"]]
        np.testing.assert_array_equal(label, row[isic2018.CLASS_NAMES].to_numpy(np.float32))
        # image_size=0 keeps the original bytes (decoders differ by IDCT rounding, so compare bytes).
        path = os.path.join(synth_isic_raw, isic2018.TRAIN_DIR, row["image"] + ".jpg")
        assert encoded == open(path, "rb").read()
        assert np.abs(image.astype(int) - np.asarray(Image.open(path)).astype(int)).mean() < 1.5
    for split, info in manifest["splits"].items():
        indices = sorted(v[1] for v in recs.values() if v[0] == split)
        assert indices == list(range(info["count"]))  # dense 0..N-1 per split
        table = pd.read_csv(os.path.join(synth_isic_records, f"{split}.csv"), dtype={"id": str})
        assert {i: recs[i][1] for i in table["id"]} == dict(zip(table["id"], table["index"]))


def test_parallel_workers_write_the_same_records(synth_isic_raw, synth_isic_records, tmp_path):
    _, two = run_convert(tmp_path, synth_isic_raw, workers=2, num_shards=4)
    _, a = read_all(synth_isic_records)
    _, b = read_all(two)
    assert {k: v[:2] for k, v in a.items()} == {k: v[:2] for k, v in b.items()}


# ------------------------------------------------------------------------------------------------ real samples
def test_real_isic_sample(isic_dir, tmp_path):
    manifest, out = run_convert(tmp_path, isic_dir, image_size=64, num_shards=3, workers=2, verify=True)
    gt = pd.read_csv(isic_dir / isic2018.TRAIN_CSV)
    totals = {c: sum(s["class_counts"][c] for s in manifest["splits"].values()) for c in isic2018.CLASS_NAMES}
    assert totals == {c: int(gt[c].sum()) for c in isic2018.CLASS_NAMES}
    assert totals["NV"] == 116 and totals["VASC"] == 9
    meta = pd.read_csv(isic_dir / isic2018.METADATA_CSV)
    _, recs = read_all(out)
    lesion_split = {}
    for _, row in meta.iterrows():
        lesion_split.setdefault(row["lesion_id"], set()).add(recs[row["image_id"]][0])
    assert all(len(s) == 1 for s in lesion_split.values())  # no lesion straddles splits
    assert any(len(meta[meta.lesion_id == lesion]) > 1 for lesion in lesion_split)  # and the sample has such lesions
    counts = {s: v["count"] for s, v in manifest["splits"].items()}
    assert abs(counts["train"] / 245 - 0.7) < 0.05 and abs(counts["test"] / 245 - 0.2) < 0.05
    image = next(iter(recs.values()))[4]
    assert min(image.shape[:2]) == 64  # shorter side stored at --image_size


def test_real_chestxray14_sample(chest_dir, tmp_path):
    manifest, out = run_convert(tmp_path, chest_dir, dataset="chestxray14", image_size=48, num_shards=3, workers=2)
    assert manifest["task"] == "multi_label" and manifest["class_names"] == chestxray14.FINDINGS
    entries = pd.read_csv(chest_dir / chestxray14.ENTRY_CSV, usecols=[0, 1, 3])
    _, recs = read_all(out)
    assert len(recs) == 94
    patient_split = {}
    for _, row in entries.iterrows():
        split, _, label, group, image, _ = recs[row["Image Index"]]
        names = [] if row["Finding Labels"] == "No Finding" else row["Finding Labels"].split("|")
        np.testing.assert_array_equal(label, [float(f in names) for f in chestxray14.FINDINGS])
        patient_split.setdefault(row["Patient ID"], set()).add(split)
        assert image.shape[2] == 3 and np.array_equal(image[..., 0], image[..., 2])  # grayscale -> 3 channels
    assert all(len(s) == 1 for s in patient_split.values())
    for split in manifest["splits"].values():  # every finding present in every split when the data allow it
        assert all(n > 0 for n in split["class_counts"].values())


def test_chestxray14_2017_variant_and_nested_image_folders(chest_dir, tmp_path):
    src = tmp_path / "chest2017"
    (src / "images_001" / "images").mkdir(parents=True)
    lines = (chest_dir / chestxray14.ENTRY_CSV).read_text().splitlines()
    (src / chestxray14.ENTRY_CSV).write_text("\n".join([lines[0] + ","] + [l + "," for l in lines[1:11]]) + "\n")
    for l in lines[1:11]:
        name = l.split(",")[0]
        shutil.copy(chest_dir / "images" / name, src / "images_001" / "images" / name)
    source = chestxray14.load(str(src))
    assert len(source.rows) == 10 and all(r.path for r in source.rows)


# ------------------------------------------------------------------------------------------------ verify, atomicity
def test_verify_detects_a_changed_shard(synth_isic_records, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(synth_isic_records, out)
    assert verify_dataset(str(out))["train"] > 0
    shard = sorted(out.glob("train-*.tfrecord"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="SHA-256"):
        verify_dataset(str(out))
    shard.unlink()
    with pytest.raises(DataError, match="missing"):
        load_manifest(str(out))


def test_finished_conversion_is_refused_without_overwrite_and_replaced_with_it(synth_isic_raw, tmp_path):
    manifest, out = run_convert(tmp_path, synth_isic_raw, num_shards=2)
    with pytest.raises(DataError, match="--overwrite"):
        run_convert(tmp_path, synth_isic_raw)
    manifest, _ = run_convert(tmp_path, synth_isic_raw, overwrite=True, num_shards=1)
    assert len(manifest["splits"]["train"]["shards"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == [".out.lock"]  # no leftovers


def test_output_folder_with_foreign_files_is_refused_and_kept(synth_isic_raw, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    # files named like the converter's own, but not written by it (no manifest, no work marker)
    (tmp_path / "out" / "train.csv").write_text("id\nmine\n")
    (tmp_path / "out" / "train-00000-of-00004.tfrecord").write_bytes(b"mine")
    for overwrite in (False, True):
        with pytest.raises(DataError, match="not empty.*never deletes"):
            run_convert(tmp_path, synth_isic_raw, overwrite=overwrite)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
    assert (tmp_path / "out" / "train.csv").read_text() == "id\nmine\n"
    assert (tmp_path / "out" / "train-00000-of-00004.tfrecord").read_bytes() == b"mine"
    (tmp_path / "out" / "notes.txt").unlink()
    (tmp_path / "out" / "manifest.json").write_text('{"files": ["train.csv"]}')  # another tool's manifest
    with pytest.raises(DataError, match="not empty.*never deletes"):
        run_convert(tmp_path, synth_isic_raw, overwrite=True)
    assert (tmp_path / "out" / "manifest.json").read_text() == '{"files": ["train.csv"]}'


def test_overwrite_never_deletes_a_user_file_that_a_hand_edited_manifest_lists(synth_isic_raw, tmp_path):
    manifest, out = run_convert(tmp_path, synth_isic_raw, num_shards=1)
    notes = tmp_path / "out" / "notes.txt"
    notes.write_text("mine")
    manifest["splits"]["train"]["shards"].append({"file": "notes.txt", "count": 0, "sha256": "", "bytes": 4})
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="did not write.*notes.txt"):
        run_convert(tmp_path, synth_isic_raw, overwrite=True, num_shards=1)
    assert notes.read_text() == "mine"


# ------------------------------------------------------------------------------------------------ bad inputs
@pytest.fixture
def isic_copy(synth_isic_raw, tmp_path):
    """A writable copy of the synthetic ISIC layout."""
    dst = tmp_path / "src"
    shutil.copytree(synth_isic_raw, dst)
    return dst


def _gt(src):
    return src / isic2018.TRAIN_CSV


def test_missing_image_fails_or_is_skipped(isic_copy, tmp_path):
    (isic_copy / isic2018.TRAIN_DIR / "ISIC_0000005.jpg").unlink()
    with pytest.raises(DataError, match=r"\(ISIC_0000005\) \(looked for \S*Training_Input/ISIC_0000005.jpg\): missing"):
        run_convert(tmp_path, isic_copy)
    manifest, out = run_convert(tmp_path, isic_copy, name="skip", on_error="skip")
    assert manifest["skipped"] == 1 and sum(s["count"] for s in manifest["splits"].values()) == 119
    assert "ISIC_0000005" in (tmp_path / "skip" / "skipped.csv").read_text()


def test_truncated_jpeg_and_corrupt_png(isic_copy, tmp_path):
    jpg = isic_copy / isic2018.TRAIN_DIR / "ISIC_0000007.jpg"
    jpg.write_bytes(jpg.read_bytes()[: len(jpg.read_bytes()) // 2])
    with pytest.raises(DataError, match="ISIC_0000007.*corrupt or truncated"):
        run_convert(tmp_path, isic_copy)
    png = isic_copy / "corrupt.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    shutil.copy(png, isic_copy / isic2018.TRAIN_DIR / "ISIC_0000008.jpg")  # a corrupt PNG under a .jpg name
    manifest, _ = run_convert(tmp_path, isic_copy, name="skip", on_error="skip")
    assert manifest["skipped"] == 2


@pytest.mark.parametrize("edit, message", [
    (lambda h: h.replace(",VASC", ""), r"missing \['VASC'\]"),
    (lambda h: h.replace("BKL", "BKL_renamed"), r"missing \['BKL'\], unexpected \['BKL_renamed'\]"),
])
def test_csv_with_missing_or_renamed_class_column(isic_copy, tmp_path, edit, message):
    lines = _gt(isic_copy).read_text().splitlines()
    if "VASC" in message:
        lines = [edit(lines[0])] + [",".join(l.split(",")[:-1]) for l in lines[1:]]
    else:
        lines[0] = edit(lines[0])
    _gt(isic_copy).write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message):
        run_convert(tmp_path, isic_copy)


@pytest.mark.parametrize("values, count", [("0.0,0.0,0.0,0.0,0.0,0.0,0.0", 0), ("1.0,1.0,0.0,0.0,0.0,0.0,0.0", 2)])
def test_single_label_row_with_zero_or_two_positives(isic_copy, tmp_path, values, count):
    lines = _gt(isic_copy).read_text().splitlines()
    lines[3] = lines[3].split(",")[0] + "," + values
    _gt(isic_copy).write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=f"row 4 .*has {count} positive classes"):
        run_convert(tmp_path, isic_copy)
    manifest, _ = run_convert(tmp_path, isic_copy, name="skip", on_error="skip")
    assert manifest["skipped"] == 1


def test_duplicate_ids(isic_copy, tmp_path):
    lines = _gt(isic_copy).read_text().splitlines()
    _gt(isic_copy).write_text("\n".join(lines + [lines[2]]) + "\n")
    with pytest.raises(DataError, match="duplicate image id 'ISIC_0000001'"):
        run_convert(tmp_path, isic_copy, on_error="skip")


def test_unknown_finding_name(chest_dir, tmp_path):
    src = tmp_path / "chest"
    shutil.copytree(chest_dir, src)
    lines = (src / chestxray14.ENTRY_CSV).read_text().splitlines()
    lines[5] = (lines[5].replace("|", "|Pneumonitis|", 1) if "|" in lines[5]
                else lines[5].replace(",", ",Pneumonitis|", 1))
    (src / chestxray14.ENTRY_CSV).write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="row 6 .*unknown finding 'Pneumonitis'"):
        chestxray14.load(str(src))
    assert len(chestxray14.load(str(src), on_error="skip").skipped) == 1


def test_empty_source_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is empty"):
        run_convert(tmp_path, tmp_path / "empty")


def _write_split_files(folder, parts):
    folder.mkdir(exist_ok=True)
    for name, ids in parts.items():
        (folder / name).write_text("image,MEL,NV,BCC,AKIEC,BKL,DF,VASC,extra\n"
                                   + "".join(f"{i},0,1,0,0,0,0,0,x\n" for i in ids))


def test_split_dir_import_and_overlapping_files(synth_isic_raw, tmp_path):
    ids = [f"ISIC_{i:07d}" for i in range(120)]
    good = {"training.csv": ids[:84], "validation.csv": ids[84:96], "testing.csv": ids[96:]}
    _write_split_files(tmp_path / "splits", good)
    manifest, _ = run_convert(tmp_path, synth_isic_raw, split_dir=str(tmp_path / "splits"))
    assert {s: v["count"] for s, v in manifest["splits"].items()} == {"train": 84, "val": 12, "test": 24}
    _write_split_files(tmp_path / "overlap", {**good, "testing.csv": ids[95:]})
    with pytest.raises(DataError, match=r"testing.csv row 2: 'ISIC_0000095' already listed at .*validation.csv"):
        run_convert(tmp_path, synth_isic_raw, name="o", split_dir=str(tmp_path / "overlap"))
    _write_split_files(tmp_path / "short", {**good, "testing.csv": ids[97:]})
    with pytest.raises(DataError, match="incomplete.*ISIC_0000096"):
        run_convert(tmp_path, synth_isic_raw, name="s", split_dir=str(tmp_path / "short"))
    _write_split_files(tmp_path / "alien", {**good, "testing.csv": ids[96:] + ["ISIC_9999999"]})
    with pytest.raises(DataError, match="'ISIC_9999999' is not in the source"):
        run_convert(tmp_path, synth_isic_raw, name="a", split_dir=str(tmp_path / "alien"))


def test_official_split_lists(tmp_path, isic_dir):
    from stsc_tf.data import synthetic

    raw = synthetic.write_chestxray14(str(tmp_path / "raw"), num_images=60, image_size=32, seed=1)
    manifest, out = run_convert(tmp_path, raw, dataset="chestxray14", split="official")
    test_ids = set((tmp_path / "raw" / "test_list.txt").read_text().split())
    _, recs = read_all(out)
    assert {i for i, v in recs.items() if v[0] == "test"} == test_ids
    lists = tmp_path / "raw" / "test_list.txt"
    lists.write_text(lists.read_text() + (tmp_path / "raw" / "train_val_list.txt").read_text().split()[0] + "\n")
    with pytest.raises(DataError, match="in both split lists"):
        run_convert(tmp_path, raw, dataset="chestxray14", split="official", name="bad")
    with pytest.raises(DataError, match="no official split files"):
        run_convert(tmp_path, isic_dir, split="official", name="isic")


# ------------------------------------------------------------------------------------------------ image kinds
def test_csv_folder_with_gray_rgba_and_16bit_png(tmp_path):
    src = tmp_path / "own"
    src.mkdir()
    rng = np.random.default_rng(0)
    kinds = {
        "gray": Image.fromarray(rng.integers(0, 255, (20, 24), dtype=np.uint8), mode="L"),
        "rgba": Image.fromarray(rng.integers(0, 255, (20, 24, 4), dtype=np.uint8), mode="RGBA"),
        "deep": Image.fromarray(rng.integers(0, 65535, (20, 24), dtype=np.uint16)),
        "rgb": Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8), mode="RGB"),
    }
    rows = []
    for i in range(24):
        name = list(kinds)[i % 4]
        kinds[name].save(src / f"{name}{i}.png")
        rows.append((f"{name}{i}.png", ["a", "b", "a|b"][i % 3], f"p{i // 2}"))
    with open(src / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("file", "findings", "patient")] + rows)
    for size in (0, 16):
        manifest, out = run_convert(tmp_path, src, dataset="csv_folder", name=f"o{size}", image_size=size,
                                    image_column="file", label_column="findings", group_column="patient",
                                    task="multi_label")
        assert manifest["class_names"] == ["a", "b"] and manifest["task"] == "multi_label"
        _, recs = read_all(out)
        deep = np.asarray(kinds["deep"], np.float64)
        for image_id, (_, _, label, group, image, _) in recs.items():
            assert image.shape[2] == 3 and image.dtype == np.uint8
            if size == 0 and image_id.startswith("deep"):  # 16-bit scaled to 8 bits, not clipped
                np.testing.assert_allclose(image[..., 0], deep / 257.0, atol=1.0)
            if size == 0 and image_id.startswith("rgba"):  # alpha dropped
                np.testing.assert_array_equal(image, np.asarray(kinds["rgba"])[..., :3])
        expected = {"a": [1, 0], "b": [0, 1], "a|b": [1, 1]}
        assert all(np.array_equal(recs[r[0]][2], expected[r[1]]) for r in rows)
    # rows without a group value: each its own group, counted in the manifest's notes (not one big group "")
    blank = [r if i % 2 else (r[0], r[1], "") for i, r in enumerate(rows)]
    with open(src / "blank.csv", "w", newline="") as f:
        csv.writer(f).writerows([("file", "findings", "patient")] + blank)
    manifest, out = run_convert(tmp_path, src, dataset="csv_folder", name="blank", csv_path=str(src / "blank.csv"),
                                image_column="file", label_column="findings", group_column="patient",
                                task="multi_label")
    _, recs = read_all(out)
    ungrouped = [recs[r[0]][3] for r in blank if not r[2]]
    assert len(set(ungrouped)) == len(ungrouped) == 12, ungrouped
    assert any("12 row(s) with an empty 'patient' cell" in n for n in manifest["source"]["notes"])
    with pytest.raises(DataError, match=r"name \['a'\] more than once"):
        run_convert(tmp_path, src, dataset="csv_folder", name="twice", image_column="file", label_column="findings",
                    task="multi_label", class_names=("a", "b", "a"))
    images = tmp_path / "elsewhere"  # --image_dir: a missing file is reported where it was looked for
    shutil.copytree(src, images)
    (images / "gray0.png").unlink()
    with pytest.raises(DataError, match=r"gray0.png.*looked for \S*elsewhere/gray0.png"):
        run_convert(tmp_path, src, dataset="csv_folder", name="moved", image_column="file", label_column="findings",
                    task="multi_label", image_dir=str(images))


def test_convert_cli_reports_errors_and_summary(synth_isic_raw, tmp_path):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    cmd = [sys.executable, "-m", "stsc_tf.convert", "--dataset=isic2018", f"--source_dir={synth_isic_raw}",
           f"--output_dir={tmp_path / 'cli'}", "--workers=1", "--image_size=0", "--num_shards=3", "--verify"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "written 120 records, skipped 0" in done.stdout and "verified" in done.stdout
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert again.returncode == 2 and "error:" in again.stderr and "--overwrite" in again.stderr
    assert json.loads((tmp_path / "cli" / "manifest.json").read_text())["splits"]["train"]["count"] > 0


@pytest.mark.parametrize("module", ["stsc_tf.synthetic", "stsc_tf.data.synthetic"])  # the earlier spelling stays
def test_synthetic_cli_writes_a_layout_under_both_spellings(module, tmp_path):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-m", module, "--layout=isic2018", f"--out={tmp_path / 'raw'}",
                           "--num_images=12", "--image_size=16"], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "wrote a synthetic isic2018 layout with 12 images" in done.stdout
    assert len(list((tmp_path / "raw" / isic2018.TRAIN_DIR).glob("*.jpg"))) == 12
