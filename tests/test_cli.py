"""One CLI test per stage, run in order on a tiny synthetic project in a temporary folder."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from stages.cli import app
from stages.lib.images import read_image
from stages.lib.io import read_result
from tests.conftest import write_params

runner = CliRunner()


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("project")


def invoke(project: Path, stage: str, monkeypatch) -> str:
    monkeypatch.chdir(project)
    if not (project / "params.yaml").exists():
        write_params(project / "params.yaml")
    result = runner.invoke(app, [stage])
    assert result.exit_code == 0, result.output
    summary = [line for line in result.stdout.splitlines() if line.startswith(f"{stage}:")]
    assert len(summary) == 1, result.output  # one summary line per stage
    return summary[0]


def test_download(project, monkeypatch):
    line = invoke(project, "download", monkeypatch)
    assert "images of 60 patients" in line
    manifest = pd.read_csv(project / "data/raw/manifest.csv")
    assert list(manifest.columns[:4]) == ["image", "label", "patient_id", "source_split"]
    card = json.loads((project / "data/raw/dataset.json").read_text())
    assert card["classes"] == ["normal", "bacterial", "viral"] and card["task"] == "multiclass"


def test_split(project, monkeypatch):
    invoke(project, "split", monkeypatch)
    audit = json.loads((project / "metrics/split.json").read_text())
    assert audit["patient_overlap"] == 0
    total = sum(audit[s]["n_images"] for s in ("train", "val", "test"))
    assert total == len(pd.read_csv(project / "data/raw/manifest.csv"))


def test_preprocess(project, monkeypatch):
    invoke(project, "preprocess", monkeypatch)
    images = np.load(project / "data/processed/train_images.npy")
    assert images.shape[1:] == (32, 32, 1) and images.dtype == np.uint8
    assert (project / "plots/preprocess/samples.png").stat().st_size > 1000
    assert (project / "data/processed/test_masks.npy").exists()


def test_train(project, monkeypatch):
    line = invoke(project, "train", monkeypatch)
    assert "resnet10t" in line
    blob = torch.load(project / "models/model.pt", weights_only=True)
    meta = blob["meta"]
    assert meta["classes"] == ["normal", "bacterial", "viral"]
    assert meta["model_name"] == "resnet10t" and meta["input_size"] == 32
    assert meta["preprocess"]["equalize"] == "clahe"
    summary = read_result(project / "metrics/train.json")
    assert {
        "best_epoch",
        "epochs_run",
        "best_val_f1_macro",
        "train_seconds",
        "images_per_second",
    } <= set(summary)
    history = pd.read_csv(project / "plots/train/history.csv")
    assert list(history["epoch"]) == list(range(1, summary["epochs_run"] + 1))


def test_evaluate(project, monkeypatch):
    invoke(project, "evaluate", monkeypatch)
    result = read_result(project / "metrics/evaluate.json")
    for key in (
        "accuracy",
        "balanced_accuracy",
        "f1_macro",
        "precision_macro",
        "recall_macro",
        "kappa",
        "roc_auc",
        "n_test",
        "per_class",
        "ci",
    ):
        assert key in result
    confusion = pd.read_csv(project / "plots/evaluate/confusion.csv")
    assert list(confusion.columns) == ["actual", "predicted"]
    assert len(confusion) == result["n_test"]
    assert (project / "plots/evaluate/roc/normal.csv").exists()
    for key in ("ece", "brier", "params_millions", "model_size_mb", "latency_ms"):
        assert result[key] >= 0, key
    assert result["latency_ms"] > 0 and result["tta"] is True  # the default
    assert list(pd.read_csv(project / "plots/evaluate/pr/normal.csv").columns) == [
        "recall",
        "precision",
        "threshold",
    ]
    calibration = pd.read_csv(project / "plots/evaluate/calibration.csv")
    assert calibration["count"].sum() == result["n_test"]
    normalized = pd.read_csv(project / "plots/evaluate/confusion_normalized.csv")
    assert normalized["count"].sum() == result["n_test"]
    low, high = result["ci"]["accuracy"]
    assert low <= result["accuracy"] <= high


def test_export(project, monkeypatch):
    line = invoke(project, "export", monkeypatch)
    assert "TorchScript" in line and "ONNX" in line
    summary = read_result(project / "metrics/export.json")
    assert summary["torchscript_max_abs_diff"] <= 1e-4 and summary["onnx_max_abs_diff"] <= 1e-4
    assert (project / "models/model.ts").stat().st_size > 1e5
    assert (project / "models/model.onnx").stat().st_size > 1e5


def test_embed(project, monkeypatch):
    invoke(project, "embed", monkeypatch)
    table = pd.read_csv(project / "plots/embed/embedding.csv")
    assert {"x", "y", "label", "predicted"} <= set(table.columns)
    assert -1 <= json.loads((project / "metrics/embed.json").read_text())["silhouette"] <= 1


def test_explain(project, monkeypatch):
    line = invoke(project, "explain", monkeypatch)
    assert "gradcam on layer1" in line and "pointing game" in line  # 8 x 8 at 32 px
    result = read_result(project / "metrics/explain.json")
    assert 0 <= result["pointing_game"] <= 1 and 0 < result["pointing_chance"] < 1
    assert result["n_abnormal"] > 0 and result["target_layer"] == "layer1"
    for name in ("normal", "bacterial", "viral"):
        with Image.open(project / f"plots/explain/{name}.png") as img:
            assert img.size[0] > 300 and img.mode == "RGB"
    gallery = pd.read_csv(project / "plots/explain/gallery.csv")
    assert set(gallery["cell"]) <= {"TP", "FN", "FP", "TN"} and len(gallery) > 0
    pointing = pd.read_csv(project / "plots/explain/pointing.csv")
    assert len(pointing) == result["n_abnormal"]
    assert set(pointing["label"]) <= {"bacterial", "viral"}  # only images with a lesion


def test_predict_matches_evaluate(project, monkeypatch, tmp_path):
    """Same probabilities as the evaluate stage: preprocessing is shared, not duplicated."""
    monkeypatch.chdir(project)
    evaluated = pd.read_csv(project / "plots/evaluate/predictions.csv")
    refs = [f"data/raw/{ref}" for ref in evaluated["image"]]
    out = tmp_path / "predictions.csv"
    result = runner.invoke(app, ["predict", *refs, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"predict: {len(refs)} image(s)" in result.output
    got = pd.read_csv(out)
    columns = [c for c in evaluated.columns if c.startswith("prob_")]
    assert np.abs(got[columns].to_numpy() - evaluated[columns].to_numpy()).max() < 1e-5
    assert list(got["predicted"]) == list(evaluated["predicted"])
    # the same images as PNG files in a folder give the same probabilities
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, ref in enumerate(evaluated["image"][:3]):
        Image.fromarray(read_image(project / "data/raw", ref)).save(folder / f"{i}.png")
    runner.invoke(app, ["predict", str(folder), "--out", str(out)])
    from_png = pd.read_csv(out)
    assert np.abs(from_png[columns].to_numpy() - evaluated[columns].to_numpy()[:3]).max() < 1e-5


def test_report(project, monkeypatch):
    line = invoke(project, "report", monkeypatch)
    page = (project / "reports/report.html").read_text()
    assert "MB" in line
    for anchor in (
        "data",
        "preprocessing",
        "training",
        "results",
        "calibration",
        "deployment",
        "embedding",
        "explain",
        "params",
    ):
        assert f'id="{anchor}"' in page
    assert page.count('<img alt="Grad-CAM gallery for ') == 3  # embedded, one per class
    assert "Pointing game" in page and "ONNX" in page
    assert page.count("plotly.js v") == 1  # the library is inlined once
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=\"https?:", page)  # offline


def test_stage_without_inputs_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params.yaml")
    result = runner.invoke(app, ["evaluate"])
    assert result.exit_code == 1
    assert "models/model.pt: model checkpoint not found" in result.output


def test_version():
    from importlib.metadata import version

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"medpipe {version('medpipe')}"


def test_dvc_yaml_check_and_write(tmp_path):
    from tests.conftest import ROOT

    good = (ROOT / "dvc.yaml").read_text()
    path = tmp_path / "dvc.yaml"
    path.write_text(good.replace("      - stages/lib/cam.py\n", "", 1))
    drift = runner.invoke(app, ["dvc-yaml", "--check", "--path", str(path)])
    assert drift.exit_code == 1 and "+      - stages/lib/cam.py" in drift.output
    assert "run `medpipe dvc-yaml`" in drift.output
    assert path.read_text() != good  # --check writes nothing
    fixed = runner.invoke(app, ["dvc-yaml", "--path", str(path)])
    assert fixed.exit_code == 0 and path.read_text() == good
    same = runner.invoke(app, ["dvc-yaml", "--check", "--path", str(path)])
    assert same.exit_code == 0 and "matches the code" in same.output
