"""`medpipe predict` on files, folders and DICOM with a small random-weight checkpoint.

That predict gives the evaluate stage's probabilities on the test images is checked in
tests/test_cli.py, on the trained tiny project.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from typer.testing import CliRunner

from stages.cli import app
from stages.lib.images import read_image
from stages.lib.models import save_checkpoint
from stages.lib.params import PreprocessParams
from stages.tools import predict
from tests.conftest import model_meta

CLASSES = ["normal", "bacterial", "viral"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "model.pt"
    model = timm.create_model("resnet10t", num_classes=3, in_chans=1)
    preprocess = PreprocessParams(size=32).model_dump()
    meta = model_meta(CLASSES, "multiclass", [0.45], [0.25], input_size=32, preprocess=preprocess)
    save_checkpoint(path, model, meta)
    return path


def chest(seed: int) -> np.ndarray:
    """A 16-bit test image spanning the full range (so DICOM scaling is the identity)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:80, 0:72]
    img = 30000 + 20000 * np.sin(xx / 9.0) * np.cos(yy / 11.0) + rng.normal(0, 2000, (80, 72))
    img = np.clip(img, 0, 65535)
    img[0, 0], img[-1, -1] = 0, 65535
    return img.astype(np.uint16)


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2") -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_dicom_goes_through_predict_like_the_same_pixels_as_png(checkpoint, tmp_path):
    pixels = chest(0)
    dcm = write_dicom(tmp_path / "study.dcm", pixels)
    Image.fromarray(pixels).save(tmp_path / "same.png")  # 16-bit PNG of the same pixels
    out = tmp_path / "pred.csv"
    summary = predict.run([str(dcm), str(tmp_path / "same.png")], checkpoint, out)
    assert "predict: 2 image(s)" in summary and "0 skipped" in summary
    table = pd.read_csv(out)
    probs = table[[f"prob_{c}" for c in CLASSES]].to_numpy()
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert np.abs(probs[0] - probs[1]).max() < 1e-6
    assert table["predicted"].isin(CLASSES).all()


def test_monochrome1_dicom_is_inverted(tmp_path):
    pixels = chest(1)
    normal = read_image(tmp_path, write_dicom(tmp_path / "m2.dcm", pixels).name)
    inverted = read_image(
        tmp_path, write_dicom(tmp_path / "m1.dcm", 65535 - pixels, "MONOCHROME1").name
    )
    assert normal.dtype == np.uint16
    assert np.abs(normal.astype(int) - inverted.astype(int)).max() <= 1


def test_folders_are_searched_and_bad_files_skipped(checkpoint, tmp_path):
    folder = tmp_path / "in" / "nested"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.fromarray((chest(i) // 257).astype(np.uint8)).save(folder / f"img{i}.png")
    (folder / "notes.txt").write_text("listed as skipped: not an image")
    (folder / "broken.png").write_text("not a png")
    out = tmp_path / "pred.csv"
    summary = predict.run([str(tmp_path / "in")], checkpoint, out)
    assert "3 image(s)" in summary and "2 skipped" in summary and "broken.png" in summary
    assert "skipped: " in summary and "notes.txt (not an image" in summary  # every file listed
    assert [Path(p).name for p in pd.read_csv(out)["path"]] == ["img0.png", "img1.png", "img2.png"]


def test_missing_and_unreadable_inputs_fail_clearly(checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        predict.run([str(tmp_path / "nope.png")], checkpoint, tmp_path / "p.csv")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match="none of the 1 input"):
        predict.run([str(tmp_path / "bad.png")], checkpoint, tmp_path / "p.csv")


def test_cli_writes_csv_table_and_cam_overlays(checkpoint, tmp_path):
    for i in range(2):
        Image.fromarray((chest(i) // 257).astype(np.uint8)).save(tmp_path / f"x{i}.png")
    out, cams = tmp_path / "p.csv", tmp_path / "cams"
    result = CliRunner().invoke(
        app,
        [
            "predict",
            str(tmp_path / "x0.png"),
            str(tmp_path / "x1.png"),
            "--model",
            str(checkpoint),
            "--out",
            str(out),
            "--cam",
            str(cams),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "prob_viral" in result.output and "predict: 2 image(s)" in result.output
    assert len(pd.read_csv(out)) == 2
    overlays = sorted(cams.glob("*.png"))
    assert len(overlays) == 2 and Image.open(overlays[0]).size == (128, 128)
    missing = CliRunner().invoke(app, ["predict", "x.png", "--model", str(tmp_path / "no.pt")])
    assert missing.exit_code == 1 and "model checkpoint not found" in missing.output


def test_binary_threshold_calls_the_positive_class(tmp_path, checkpoint):
    path = tmp_path / "binary.pt"
    model = timm.create_model("resnet10t", num_classes=2, in_chans=1)
    preprocess = PreprocessParams(size=32).model_dump()
    meta = model_meta(
        ["abnormal", "normal"], input_size=32, preprocess=preprocess, positive_class="abnormal"
    )
    save_checkpoint(path, model, meta)
    for i in range(3):
        Image.fromarray((chest(i) // 256).astype(np.uint8)).save(tmp_path / f"{i}.png")
    images = [str(tmp_path / f"{i}.png") for i in range(3)]
    out = tmp_path / "p.csv"
    args = ["predict", *images, "-m", str(path), "-o", str(out)]
    for threshold, called in (("0", 3), ("1", 0)):
        result = CliRunner().invoke(app, [*args, "--threshold", threshold])
        assert result.exit_code == 0, result.output
        assert f"positive class abnormal: {called} called (P >= {threshold})" in result.output
        assert (pd.read_csv(out)["predicted"] == "abnormal").sum() == called
    result = CliRunner().invoke(app, args)
    assert "positive class abnormal" in result.output and "(the most likely class)" in result.output
    result = CliRunner().invoke(
        app, ["predict", images[0], "-m", str(checkpoint), "-o", str(out), "--threshold", "0.5"]
    )
    assert result.exit_code != 0 and "only binary models" in result.output
