"""Folder and CSV sources through the download stage: manifest, rejected.csv, images.zip."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from stages import download, split
from stages.lib.images import read_image
from stages.lib.labels import encode_labels
from stages.lib.params import DataParams, SplitParams
from tests.datasets import gradient, write_image_zoo


def read_raw(raw):
    manifest = pd.read_csv(raw / "manifest.csv", dtype=str, keep_default_na=False)
    rejected = pd.read_csv(raw / "rejected.csv", dtype=str, keep_default_na=False)
    card = json.loads((raw / "dataset.json").read_text())
    return manifest, rejected, card


def noise_png(path, seed, size=(40, 36)):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
    Image.fromarray(img).save(path)


@pytest.fixture
def class_tree(tmp_path):
    """root/<class>/*: NORMAL has plain PNGs, PNEUMONIA holds the whole zoo (good and bad)."""
    root = tmp_path / "xray"
    for i in range(3):
        noise_png(root / "NORMAL" / f"IM-{i:04d}-0001.png", seed=100 + i)
    expected = write_image_zoo(root / "PNEUMONIA")
    return root, expected


def test_folder_source_reads_the_zoo_and_rejects_bad_files(class_tree, tmp_path):
    root, expected = class_tree
    line = download.run(DataParams(source="folder", path=str(root)), tmp_path / "raw")
    manifest, rejected, card = read_raw(tmp_path / "raw")
    bad = {f"PNEUMONIA/{n}": r for n, r in expected.items() if r}
    good = {f"PNEUMONIA/{n}" for n, r in expected.items() if not r}
    assert set(rejected["path"]) == set(bad) and set(rejected["label"]) == {"PNEUMONIA"}
    for path, reason in zip(rejected["path"], rejected["reason"], strict=True):
        assert bad[path] in reason, (path, reason)
    assert f"{len(bad)} rejected" in line and "WARNING: no patient ids" in line
    assert set(manifest["image"]) == {f"images.zip#{p}" for p in good} | {
        f"images.zip#NORMAL/IM-{i:04d}-0001.png" for i in range(3)
    }
    assert card["classes"] == ["NORMAL", "PNEUMONIA"] and card["task"] == "binary"
    assert card["channels"] == 3  # the RGBA/palette/CMYK files are colour
    assert card["class_counts"] == {"NORMAL": 3, "PNEUMONIA": len(good)}
    assert (manifest["source_split"] == "").all()
    assert manifest["patient_id"].is_unique  # one patient per image
    # every kept image reads back from data/raw alone (the source folder may go away)
    shutil.rmtree(root)
    raw_files = sorted(p.name for p in (tmp_path / "raw").iterdir())
    assert raw_files == [
        "dataset.json",
        "images.zip",
        "manifest.csv",
        "rejected.csv",
        "thumbnails.npy",
    ]
    m1 = read_image(tmp_path / "raw", "images.zip#PNEUMONIA/mono1.dcm")
    assert m1[0].mean() > m1[-1].mean()  # MONOCHROME1 inverted: low stored values white
    deep = read_image(tmp_path / "raw", "images.zip#PNEUMONIA/deep16.png")
    assert np.array_equal(deep, gradient(top=60000, dtype=np.uint16))
    assert np.load(tmp_path / "raw/thumbnails.npy").shape == (len(manifest), 16, 16)


def test_folder_download_is_byte_for_byte_repeatable(class_tree, tmp_path):
    root, _ = class_tree
    params = DataParams(source="folder", path=str(root))
    download.run(params, tmp_path / "a")
    (root / "NORMAL" / "IM-0000-0001.png").touch()  # a new mtime changes nothing
    download.run(params, tmp_path / "b")
    for name in ("images.zip", "manifest.csv", "rejected.csv", "thumbnails.npy"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_split_layout_patient_regex_and_official_splits(tmp_path):
    root = tmp_path / "chest_xray"
    seed = 0
    for split_name, n in (("train", 6), ("val", 2), ("test", 3)):
        for k, (cls, kind) in enumerate((("NORMAL", "normal"), ("PNEUMONIA", "bacteria"))):
            for i in range(n):
                seed += 1
                person = 100 * k + i // 2  # two images per person
                name = f"person{person}{split_name}_{kind}_{i}.jpeg"
                img = np.random.default_rng(seed).integers(0, 256, (40, 40), dtype=np.uint8)
                (root / split_name / cls).mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(root / split_name / cls / name, "JPEG")
    params = DataParams(source="folder", path=str(root), patient_regex=r"(person\d+\w+?)_")
    line = download.run(params, tmp_path / "raw")
    manifest, rejected, card = read_raw(tmp_path / "raw")
    assert "WARNING" not in line and rejected.empty and card["patients_known"]
    assert manifest["source_split"].value_counts().to_dict() == {"train": 12, "test": 6, "val": 4}
    row = manifest[manifest["image"] == "images.zip#train/PNEUMONIA/person101train_bacteria_3.jpeg"]
    assert row["patient_id"].item() == "person101train"
    assert manifest.groupby("patient_id").size().max() == 2
    split.run(SplitParams(), tmp_path / "raw", tmp_path / "split", tmp_path / "split.json")
    audit = json.loads((tmp_path / "split.json").read_text())
    assert audit["strategy"] == "official" and audit["test"]["n_images"] == 6
    assert audit["duplicate_overlap"] == 0


def test_split_layout_with_the_zoo_rejects_the_same_files(tmp_path):
    root = tmp_path / "chest_xray"
    for k, split_name in enumerate(("train", "val", "test")):
        for i in range(2):
            noise_png(root / split_name / "NORMAL" / f"IM-{i}.png", seed=10 * k + i)
    expected = write_image_zoo(root / "train" / "PNEUMONIA")
    line = download.run(DataParams(source="folder", path=str(root)), tmp_path / "raw")
    manifest, rejected, _ = read_raw(tmp_path / "raw")
    bad = {f"train/PNEUMONIA/{n}": r for n, r in expected.items() if r}
    assert dict(zip(rejected["path"], rejected["reason"], strict=True)).keys() == bad.keys()
    for path, reason in zip(rejected["path"], rejected["reason"], strict=True):
        assert bad[path] in reason, (path, reason)
    assert f"{len(bad)} rejected" in line
    kept = manifest[manifest["image"].str.contains("PNEUMONIA")]
    assert len(kept) == sum(1 for r in expected.values() if not r)
    assert set(kept["source_split"]) == {"train"}
    m1 = read_image(tmp_path / "raw", "images.zip#train/PNEUMONIA/mono1.dcm")
    assert m1[0].mean() > m1[-1].mean()  # MONOCHROME1 inverted


def test_regex_that_misses_some_files_is_reported(class_tree, tmp_path):
    root, _ = class_tree
    params = DataParams(source="folder", path=str(root), patient_regex=r"IM-(\d+)")
    line = download.run(params, tmp_path / "raw")
    manifest, _, _ = read_raw(tmp_path / "raw")
    assert set(manifest["patient_id"][manifest["label"] == "NORMAL"]) == {"0000", "0001", "0002"}
    assert "7 image(s) without a patient id count as their own patient" in line


def test_class_left_empty_names_the_class_and_cause(tmp_path):
    root = tmp_path / "data"
    noise_png(root / "good" / "a.png", 1)
    noise_png(root / "good" / "b.png", 2)
    (root / "broken").mkdir()
    (root / "broken" / "x.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"\['broken'\] have no images.*x.png: empty file"):
        download.run(DataParams(source="folder", path=str(root)), tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_nothing_readable_is_an_error(tmp_path):
    root = tmp_path / "data"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        (root / cls / "n.png").write_text("text")
    with pytest.raises(ValueError, match=r"no readable images.*not an image"):
        download.run(DataParams(source="folder", path=str(root)), tmp_path / "raw")


def test_folder_with_one_class_is_an_error(tmp_path):
    noise_png(tmp_path / "data" / "only" / "a.png", 1)
    with pytest.raises(ValueError, match="two or more class folders"):
        download.run(DataParams(source="folder", path=str(tmp_path / "data")), tmp_path / "raw")


def test_csv_source_maps_columns(tmp_path):
    base = tmp_path / "mura"
    rows = []
    for i in range(8):
        part = "wrist" if i % 2 else "elbow"
        rel = f"{part}/patient{i // 2}/image{i}.png"
        noise_png(base / rel, seed=i)
        rows.append((rel, "positive" if i % 4 < 2 else "negative", f"p{i // 2}", part, "train"))
    rows[-1] = (*rows[-1][:4], "valid")
    rows.append(("missing/none.png", "negative", "p9", "elbow", "train"))
    rows.append(("../outside.png", "negative", "p9", "elbow", "train"))
    rows.append((rows[0][0], "negative", "p0", "elbow", "train"))  # listed twice
    table = pd.DataFrame(rows, columns=["path", "finding", "subject", "body_part", "fold"])
    table.to_csv(base / "index.csv", index=False)
    params = DataParams.model_validate(
        {
            "source": "csv",
            "path": str(base / "index.csv"),
            "columns": {
                "image": "path",
                "label": "finding",
                "patient_id": "subject",
                "group": "body_part",
                "split": "fold",
            },
        }
    )
    line = download.run(params, tmp_path / "raw")
    manifest, rejected, card = read_raw(tmp_path / "raw")
    assert len(manifest) == 8 and "3 rejected" in line and "WARNING" not in line
    assert dict(zip(rejected["path"], rejected["reason"], strict=True)) == {
        "missing/none.png": "file not found",
        str(tmp_path / "outside.png"): f"path outside {base}",
        rows[0][0]: "listed twice",
    }
    assert list(manifest.columns) == ["image", "label", "patient_id", "source_split", "group"]
    assert manifest["group"].value_counts().to_dict() == {"elbow": 4, "wrist": 4}
    assert manifest["source_split"].iloc[-1] == "val"
    assert card["classes"] == ["negative", "positive"] and card["n_patients"] == 4


def test_csv_multilabel_flows_to_split_and_encode_labels(tmp_path):
    names = ["effusion", "mass", "nodule"]
    rows = []
    for i in range(60):
        noise_png(tmp_path / "img" / f"{i}.png", seed=i, size=(20, 20))
        positives = [n for k, n in enumerate(names) if (i >> k) & 1]
        rows.append((f"img/{i}.png", " | ".join(positives), f"p{i // 2}"))
    pd.DataFrame(rows, columns=["image", "label", "patient"]).to_csv(
        tmp_path / "t.csv", index=False
    )
    params = DataParams.model_validate(
        {"source": "csv", "path": str(tmp_path / "t.csv"), "columns": {"patient_id": "patient"}}
    )
    download.run(params, tmp_path / "raw")
    manifest, _, card = read_raw(tmp_path / "raw")
    assert card["task"] == "multilabel" and card["classes"] == names
    assert manifest["label"].iloc[3] == "effusion|mass" and manifest["label"].iloc[0] == ""
    encoded = encode_labels(manifest["label"], card["classes"], multilabel=True)
    assert encoded.shape == (60, 3) and encoded[3].tolist() == [1, 1, 0]
    assert card["class_counts"] == {"effusion": 30, "mass": 30, "nodule": 28}
    split.run(SplitParams(val=0.2, test=0.2), tmp_path / "raw", tmp_path / "s", tmp_path / "s.json")
    audit = json.loads((tmp_path / "s.json").read_text())
    for s in ("train", "val", "test"):  # every label in every split
        assert min(audit[s]["class_counts"].values()) > 0, audit[s]
    assert audit["patient_overlap"] == 0


def test_csv_without_patient_column_warns(tmp_path):
    for i in range(4):
        noise_png(tmp_path / f"{i}.png", seed=i)
    frame = pd.DataFrame({"image": [f"{i}.png" for i in range(4)], "label": list("abab")})
    frame.to_csv(tmp_path / "t.csv", index=False)
    line = download.run(
        DataParams(source="csv", path=str(tmp_path / "t.csv"), positive_class="b"), tmp_path / "raw"
    )
    assert "WARNING: no patient ids" in line and "data.columns.patient_id" in line


def test_csv_with_missing_column_names_it(tmp_path):
    pd.DataFrame({"file": ["a.png"], "label": ["x"]}).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(ValueError, match=r"column\(s\) \['image'\] not found"):
        download.run(DataParams(source="csv", path=str(tmp_path / "t.csv")), tmp_path / "raw")


@pytest.mark.parametrize(
    ("words", "named"),
    [("No Finding", None), ("normal", None), ("Nothing", "Nothing"), ("", None)],
)
def test_multilabel_no_finding_is_the_empty_label_set(tmp_path, words, named):
    rows = []
    for i, label in enumerate([words, "Mass|Nodule", "Effusion", words, "Nodule", words]):
        noise_png(tmp_path / f"{i}.png", seed=i)
        rows.append((f"{i}.png", label, f"p{i}"))
    pd.DataFrame(rows, columns=["Image Index", "Finding Labels", "Patient ID"]).to_csv(
        tmp_path / "t.csv", index=False
    )
    columns = {"image": "Image Index", "label": "Finding Labels", "patient_id": "Patient ID"}
    params = DataParams.model_validate(
        {"source": "csv", "path": str(tmp_path / "t.csv"), "columns": columns, "no_finding": named}
    )
    line = download.run(params, tmp_path / "raw")
    manifest, _, card = read_raw(tmp_path / "raw")
    assert card["classes"] == ["Effusion", "Mass", "Nodule"]  # never a class of its own
    assert card["n_no_finding"] == 3 and card["no_finding"] == ([words] if words else [])
    assert manifest["label"].tolist()[:3] == ["", "Mass|Nodule", "Effusion"]
    assert "3 image(s) with no finding" in line


def test_no_finding_param_is_checked_against_the_data(tmp_path):
    for i in range(4):
        noise_png(tmp_path / f"{i}.png", seed=i)
    labels = ["Mass|Nodule", "Nada", "Mass", "Nada"]
    pd.DataFrame({"image": [f"{i}.png" for i in range(4)], "label": labels}).to_csv(
        tmp_path / "t.csv", index=False
    )
    typo = DataParams(source="csv", path=str(tmp_path / "t.csv"), no_finding="nada")
    with pytest.raises(ValueError, match=r"data.no_finding: 'nada' is not a label .*'Nada'"):
        download.run(typo, tmp_path / "raw")
    single = tmp_path / "s.csv"
    single.write_text("image,label\n0.png,Mass\n1.png,Nada\n")
    with pytest.raises(ValueError, match=r"data.no_finding: .* read as single-label"):
        download.run(DataParams(source="csv", path=str(single), no_finding="Nada"), tmp_path / "r")


def test_multilabel_data_without_any_finding_is_refused(tmp_path):
    for i in range(3):
        noise_png(tmp_path / f"{i}.png", seed=i)
    labels = ["No Finding", "No Finding|normal", "No Finding"]
    pd.DataFrame({"image": [f"{i}.png" for i in range(3)], "label": labels}).to_csv(
        tmp_path / "t.csv", index=False
    )
    with pytest.raises(ValueError, match=r"no image of the csv source has a finding"):
        download.run(DataParams(source="csv", path=str(tmp_path / "t.csv")), tmp_path / "raw")
