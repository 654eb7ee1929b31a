import json
import zipfile

import numpy as np
import pandas as pd
import pytest

from stages import download, split
from stages.lib.images import read_image, thumbnail
from stages.lib.io import npz_array
from stages.lib.labels import encode_labels
from stages.lib.params import DataParams, SplitParams
from tests.datasets import medmnist_arrays, write_npz


def write_medmnist(path, rgb=False, n=(20, 6, 8), labels=2):
    rng = np.random.default_rng(0)
    arrays = {}
    for split_name, count in zip(("train", "val", "test"), n, strict=True):
        shape = (count, 28, 28, 3) if rgb else (count, 28, 28)
        arrays[f"{split_name}_images"] = rng.integers(0, 255, shape, dtype=np.uint8)
        arrays[f"{split_name}_labels"] = (np.arange(count) % labels).reshape(-1, 1)
    np.savez(path, **arrays)
    return arrays


def test_synthetic_download_writes_manifest_and_card(tmp_path):
    params = DataParams.model_validate({"synthetic": {"n_patients": 12, "image_size": [64, 80]}})
    line = download.run(params, tmp_path / "raw")
    manifest = pd.read_csv(tmp_path / "raw/manifest.csv", keep_default_na=False)
    card = json.loads((tmp_path / "raw/dataset.json").read_text())
    assert card["n_images"] == len(manifest) and card["n_patients"] == 12
    assert line.startswith("download: ")
    abnormal = manifest[manifest["label"] != "normal"]
    assert (abnormal["mask"] != "").all() and (
        manifest[manifest["label"] == "normal"]["mask"] == ""
    ).all()
    img = read_image(tmp_path / "raw", manifest["image"][0])
    assert img.ndim == 2 and img.dtype == np.uint8


def test_synthetic_default_holds_out_its_test_site_and_splits_the_rest_by_patient(tmp_path):
    params = DataParams.model_validate({"synthetic": {"n_patients": 60, "image_size": [64, 80]}})
    download.run(params, tmp_path / "raw")
    manifest = pd.read_csv(tmp_path / "raw/manifest.csv", keep_default_na=False)
    assert set(manifest["group"]) == {"site-a", "site-b", "site-c"}
    held_out = manifest["group"] == "site-c"
    assert (manifest["source_split"][held_out] == "test").all()
    assert (manifest["source_split"][~held_out] == "train").all()
    assert (
        "test site site-c (held out)"
        in json.loads((tmp_path / "raw/dataset.json").read_text())["description"]
    )
    split.run(SplitParams(), tmp_path / "raw", tmp_path / "split", tmp_path / "split.json")
    frames = {s: pd.read_csv(tmp_path / f"split/{s}.csv") for s in ("train", "val", "test")}
    assert set(frames["test"]["group"]) == {"site-c"}  # the unseen site, and all of it
    assert len(frames["test"]) == held_out.sum()
    for s in ("train", "val"):  # validation comes from the training sites, by patient
        assert set(frames[s]["group"]) == {"site-a", "site-b"}
    assert not set(frames["train"]["patient_id"]) & set(frames["val"]["patient_id"])
    assert json.loads((tmp_path / "split.json").read_text())["patient_overlap"] == 0


def test_npz_download_keeps_official_splits(tmp_path):
    arrays = write_medmnist(tmp_path / "pneumoniamnist.npz")
    params = DataParams(source="npz", path=str(tmp_path / "pneumoniamnist.npz"))
    download.run(params, tmp_path / "raw")
    manifest = pd.read_csv(tmp_path / "raw/manifest.csv", keep_default_na=False)
    card = json.loads((tmp_path / "raw/dataset.json").read_text())
    assert card["classes"] == ["normal", "pneumonia"]  # names from medmnist's INFO
    assert manifest["source_split"].value_counts().to_dict() == {"train": 20, "test": 8, "val": 6}
    row = manifest[manifest["image"] == "source.npz#test/3"].iloc[0]
    assert row["label"] == card["classes"][int(arrays["test_labels"][3, 0])]
    assert np.array_equal(read_image(tmp_path / "raw", row["image"]), arrays["test_images"][3])
    split.run(SplitParams(), tmp_path / "raw", tmp_path / "split", tmp_path / "split.json")
    audit = json.loads((tmp_path / "split.json").read_text())
    assert audit["strategy"] == "official"
    assert audit["test"]["n_images"] == 8


def test_npz_without_medmnist_arrays_is_a_clear_error(tmp_path):
    np.savez(tmp_path / "x.npz", images=np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="lacks arrays"):
        download.run(DataParams(source="npz", path=str(tmp_path / "x.npz")), tmp_path / "raw")
    assert not (tmp_path / "raw").exists()  # nothing half-written


def test_npz_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data\.path"):
        download.run(DataParams(source="npz", path=str(tmp_path / "nope.npz")), tmp_path / "raw")


def test_compressed_multilabel_npz_is_stored_for_memory_mapping(tmp_path):
    arrays = medmnist_arrays("multilabel")
    write_npz(tmp_path / "chestmnist_64.npz", arrays, compress=True)
    line = download.run(
        DataParams(source="npz", path=str(tmp_path / "chestmnist_64.npz")), tmp_path / "raw"
    )
    card = json.loads((tmp_path / "raw/dataset.json").read_text())
    manifest = pd.read_csv(tmp_path / "raw/manifest.csv", dtype=str, keep_default_na=False)
    assert card["task"] == "multilabel" and len(card["classes"]) == 14
    assert card["classes"][1] == "cardiomegaly" and card["name"] == "chestmnist_64"
    labels = np.concatenate([arrays[f"{s}_labels"] for s in ("train", "val", "test")])
    assert np.array_equal(encode_labels(manifest["label"], card["classes"], True), labels)
    with zipfile.ZipFile(tmp_path / "raw/source.npz") as zf:  # rewritten uncompressed
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_STORED}
    assert isinstance(npz_array(tmp_path / "raw/source.npz", "test_images"), np.memmap)
    assert np.array_equal(
        read_image(tmp_path / "raw", "source.npz#test/7"), arrays["test_images"][7]
    )
    assert "atelectasis" in line


def test_npz_with_unknown_name_gets_generic_class_names(tmp_path):
    write_npz(tmp_path / "mine.npz", medmnist_arrays("rgb"))
    download.run(DataParams(source="npz", path=str(tmp_path / "mine.npz")), tmp_path / "raw")
    card = json.loads((tmp_path / "raw/dataset.json").read_text())
    assert card["classes"] == [f"class_{i}" for i in range(8)] and card["channels"] == 3


def test_npz_with_mismatched_labels_is_a_clear_error(tmp_path):
    arrays = medmnist_arrays("gray")
    arrays["val_labels"] = arrays["val_labels"][:3]
    write_npz(tmp_path / "x.npz", arrays)
    with pytest.raises(ValueError, match="val_labels must be N x 1"):
        download.run(DataParams(source="npz", path=str(tmp_path / "x.npz")), tmp_path / "raw")


def test_synthetic_writes_thumbnails_and_empty_rejected(tmp_path):
    params = DataParams.model_validate({"synthetic": {"n_patients": 8, "image_size": [64, 64]}})
    download.run(params, tmp_path / "raw")
    manifest = pd.read_csv(tmp_path / "raw/manifest.csv")
    thumbs = np.load(tmp_path / "raw/thumbnails.npy")
    assert thumbs.shape == (len(manifest), 16, 16)
    assert np.array_equal(thumbs[2], thumbnail(read_image(tmp_path / "raw", manifest["image"][2])))
    assert (tmp_path / "raw/rejected.csv").read_text().strip() == "path,reason,label"
