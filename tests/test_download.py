import json

import numpy as np
import pandas as pd
import pytest

from stages import download, split
from stages.io import read_image
from stages.params import DataParams, SplitParams


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
