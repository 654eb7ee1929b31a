"""evaluate's pure parts: threshold report, per-group metrics, curves, confusion tables,
multi-label outputs, TTA views and the deployment figures."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from torch import nn

from stages import evaluate
from stages.lib.inference import (
    ExportedClassifier,
    LoadedModel,
    measure_latency,
    predict,
    tta_views,
)
from stages.lib.io import read_json, read_result
from stages.lib.params import EvaluateParams
from tests.conftest import model_meta, tiny_processed

META = model_meta(["a", "b", "c"], "multiclass", [0.5], [0.25])


class FixedLogits(nn.Module):
    """A stand-in network: logits = mean brightness times a fixed vector."""

    def __init__(self, weights: list[float]) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(weights))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2, 3))[:, None] * self.w


def test_threshold_chosen_on_validation_and_applied_to_test():
    rng = np.random.default_rng(0)
    y_val = rng.integers(0, 2, 300)
    p_val = np.clip(0.2 + 0.3 * y_val + rng.normal(0, 0.1, 300), 0, 1)  # best cut near 0.35
    y_test = rng.integers(0, 2, 300)
    p_test = np.clip(0.2 + 0.3 * y_test + rng.normal(0, 0.1, 300), 0, 1)
    report = evaluate.threshold_report(y_val, p_val, y_test, p_test, EvaluateParams())
    assert 0.25 < report["value"] < 0.45
    chosen, default = report["at_chosen"], report["at_default"]
    assert chosen["threshold"] == report["value"] and default["threshold"] == 0.5
    assert chosen["balanced_accuracy"] > default["balanced_accuracy"]  # 0.5 misses positives
    strict = EvaluateParams(threshold_method="sensitivity", target_sensitivity=0.99)
    assert (
        evaluate.threshold_report(y_val, p_val, y_test, p_test, strict)["val_sensitivity"] >= 0.99
    )


def test_threshold_falls_back_to_half_without_both_classes_in_validation():
    report = evaluate.threshold_report(
        np.zeros(10, int),
        np.linspace(0, 1, 10),
        np.array([0, 1]),
        np.array([0.2, 0.8]),
        EvaluateParams(),
    )
    assert report["value"] == 0.5 and "fallback" in report


def test_group_metrics_split_by_group_and_skip_empty():
    y = np.array([0, 1, 0, 1, 0, 1])
    probs = np.eye(2)[np.array([0, 1, 1, 0, 0, 1])] * 0.8 + 0.1
    groups = pd.Series(["hand", "hand", "wrist", "wrist", "", ""])
    table = evaluate.group_metrics(y, probs, groups)
    assert set(table) == {"hand", "wrist"}
    assert table["hand"]["accuracy"] == 1.0 and table["wrist"]["accuracy"] == 0.0
    assert table["hand"]["n"] == 2


def test_curves_and_normalized_confusion():
    y = np.array([0, 0, 1, 1, 2, 2])
    probs = np.eye(3)[np.array([0, 1, 1, 1, 2, 0])] * 0.7 + 0.1
    roc, pr = evaluate.curve_tables(y, probs, ["a", "b", "c"])
    assert set(roc) == set(pr) == {"a", "b", "c"}
    assert list(pr["b"].columns) == ["recall", "precision", "threshold"]
    assert pr["b"]["recall"].max() == 1.0
    pairs = evaluate.confusion_pairs(y, probs.argmax(1), ["a", "b", "c"])
    norm = evaluate.normalized_confusion(pairs, ["a", "b", "c"])
    assert len(norm) == 9 and norm["count"].sum() == 6
    assert norm.groupby("actual")["share"].sum().round(6).eq(1.0).all()
    row = norm[(norm.actual == "a") & (norm.predicted == "b")]
    assert row["share"].item() == 0.5


def test_multilabel_evaluation_keys_and_confusion_rows():
    y = np.array([[1, 0], [0, 1], [1, 1], [0, 0]], np.float32)
    probs = np.array([[0.9, 0.2], [0.3, 0.8], [0.7, 0.4], [0.1, 0.1]])
    result = evaluate.evaluate_probs(
        y, probs, ["a", "b"], EvaluateParams(bootstrap=20), multilabel=True
    )
    assert {"accuracy", "f1_macro", "f1_micro", "roc_auc", "ece", "brier", "ci"} <= set(result)
    assert -1 <= result["kappa"] <= 1  # macro over labels
    assert result["per_class"]["a"]["f1"] == 1.0
    pairs = evaluate.confusion_pairs(y.astype(int), (probs >= 0.5).astype(int), ["a", "b"], True)
    assert len(pairs) == 8 and set(pairs["actual"]) == {"a", "no a", "b", "no b"}


def test_predict_uses_sigmoid_for_multilabel_and_softmax_otherwise():
    images = np.full((3, 16, 16, 1), 200, np.uint8)
    model = FixedLogits([2.0, 1.0, -1.0])
    soft = predict(model, images, META, 2, torch.device("cpu"))
    sig = predict(model, images, replace(META, task="multilabel"), 2, torch.device("cpu"))
    assert np.allclose(soft.sum(1), 1.0)
    assert not np.allclose(sig.sum(1), 1.0)
    logits = model(torch.full((1, 1, 16, 16), (200 / 255 - 0.5) / 0.25))
    assert np.allclose(sig[0], torch.sigmoid(logits)[0].detach().numpy(), atol=1e-6)


def test_tta_views_are_small_shifts_and_a_zoom_without_flips():
    x = torch.arange(64.0).view(1, 1, 8, 8)
    views = tta_views(x)
    assert len(views) == 6 and all(v.shape == x.shape for v in views)
    assert torch.equal(views[0], x)
    flipped = torch.flip(x, dims=[3])
    assert not any(torch.equal(v, flipped) for v in views)
    assert torch.equal(views[2][..., :-1], x[..., 1:])  # shifted left by one pixel


def test_tta_changes_little_on_a_brightness_model():
    images = np.random.default_rng(0).integers(0, 255, (4, 16, 16, 1), dtype=np.uint8)
    model = FixedLogits([1.0, -1.0])
    plain = predict(model, images, META, 4, torch.device("cpu"))
    averaged = predict(model, images, META, 4, torch.device("cpu"), tta=True)
    assert np.abs(plain - averaged).max() < 0.05


def test_deployment_figures_on_a_real_checkpoint(tmp_path):
    from stages.lib.models import save_checkpoint

    model = timm.create_model("resnet10t", num_classes=3, in_chans=1).eval()
    meta = replace(META, input_size=32)
    save_checkpoint(tmp_path / "m.pt", model, meta)
    loaded = LoadedModel(model, meta, torch.device("cpu"))
    figures = evaluate.deployment_figures(loaded, tmp_path / "m.pt", 5)
    n = sum(p.numel() for p in model.parameters())
    assert figures["params_millions"] == pytest.approx(n / 1e6, abs=1e-3)
    assert figures["model_size_mb"] == pytest.approx(n * 4 / 1e6, rel=0.05)  # float32 weights
    assert 0 < figures["latency_ms"] < 10_000 and figures["latency_device"].startswith("cpu")


def test_deployable_equals_predict():
    model = timm.create_model("resnet10t", num_classes=2, in_chans=1).eval()
    meta = replace(META, input_size=32)
    images = np.random.default_rng(0).integers(0, 255, (5, 32, 32, 1), dtype=np.uint8)
    expected = predict(model, images, meta, 5, torch.device("cpu"))
    with torch.inference_mode():
        got = ExportedClassifier(model, meta)(torch.from_numpy(images).permute(0, 3, 1, 2).float())
    assert np.abs(got.numpy() - expected).max() < 1e-6
    assert measure_latency(model, meta, torch.device("cpu"), runs=3, warmup=1) > 0


def test_run_binary_with_groups_writes_threshold_and_group_metrics(tmp_path):
    processed, checkpoint = tiny_processed(tmp_path, "binary", ["normal", "pneumonia"], groups=True)
    metrics_file, plots = tmp_path / "evaluate.json", tmp_path / "plots"
    params = EvaluateParams(bootstrap=20, latency_runs=3)
    line = evaluate.run(params, processed, checkpoint, metrics_file, plots)
    assert "threshold" in line and "ms/image" in line
    result = read_result(metrics_file)
    assert result["threshold"]["method"] == "youden"
    assert 0 <= result["threshold"]["value"] <= 1
    assert set(result["per_group"]) == {"hand", "wrist"}
    assert sum(g["n"] for g in result["per_group"].values()) == result["n_test"] == 24
    assert all(len(g["ci"]["accuracy"]) == 2 for g in result["per_group"].values())
    assert set(result["per_class"]["pneumonia"]["ci"]) == {"precision", "recall", "f1"}
    table = pd.read_csv(plots / "predictions.csv")
    expected = np.where(
        table["prob_pneumonia"] >= result["threshold"]["value"], "pneumonia", "normal"
    )
    assert (table["predicted_at_threshold"] == expected).all()
    assert (plots / "pr/pneumonia.csv").exists() and (plots / "calibration.csv").exists()
    # validation and test compared per class: 2 classes x 3 figures, each with intervals
    assert result["shift"]["compared"] == 6 and result["shift_flags"] == result["shift"]["flagged"]
    assert "shift_flags" in read_json(metrics_file)  # a headline figure: `dvc metrics diff`
    frame = pd.read_csv(plots / "shift.csv")
    assert set(frame["figure"]) == {"sensitivity", "specificity", "calibration_error"}
    assert "val/test" in line


def test_positive_class_sorting_first_is_the_one_thresholded(tmp_path):
    """MURA's classes sort as [abnormal, normal]: sensitivity, specificity and the
    threshold must be about abnormal, not about the class that sorts second."""
    classes = ["abnormal", "normal"]
    torch.manual_seed(0)  # a fixed random checkpoint
    processed, checkpoint = tiny_processed(tmp_path, "binary", classes, positive="abnormal")
    metrics_file, plots = tmp_path / "evaluate.json", tmp_path / "plots"
    line = evaluate.run(
        EvaluateParams(bootstrap=0, latency_runs=0), processed, checkpoint, metrics_file, plots
    )
    assert "positive abnormal" in line
    result = read_result(metrics_file)
    assert result["positive_class"] == result["threshold"]["positive_class"] == "abnormal"
    table = pd.read_csv(plots / "predictions.csv")
    threshold = result["threshold"]["value"]
    expected = np.where(table["prob_abnormal"] >= threshold, "abnormal", "normal")
    assert (table["predicted_at_threshold"] == expected).all()
    called = table["predicted_at_threshold"] == "abnormal"
    sick = table["label"] == "abnormal"
    assert result["sensitivity"] == pytest.approx(called[sick].mean(), abs=1e-4)
    assert result["specificity"] == pytest.approx((~called[~sick]).mean(), abs=1e-4)
    at_chosen = result["threshold"]["at_chosen"]
    assert at_chosen["tp"] == int((called & sick).sum())
    assert at_chosen["fn"] == int((~called & sick).sum())


def test_run_multilabel(tmp_path):
    classes = ["a", "b", "c"]
    processed, checkpoint = tiny_processed(tmp_path, "multilabel", classes)
    metrics_file, plots = tmp_path / "evaluate.json", tmp_path / "plots"
    evaluate.run(
        EvaluateParams(bootstrap=10, latency_runs=0), processed, checkpoint, metrics_file, plots
    )
    result = read_result(metrics_file)
    assert {"f1_micro", "hamming_loss", "ece", "brier"} <= set(result)
    assert set(result["per_class"]) == set(classes) and "latency_ms" not in result
    table = pd.read_csv(plots / "predictions.csv", keep_default_na=False)
    probs = table[[f"prob_{c}" for c in classes]].to_numpy()
    assert not np.allclose(probs.sum(axis=1), 1.0)  # sigmoid, not softmax
    assert len(pd.read_csv(plots / "confusion.csv")) == 24 * 3


def test_evaluate_probs_adds_per_class_and_group_intervals_keeping_keys():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 240)
    probs = np.eye(3)[np.where(rng.random(240) < 0.8, y, rng.integers(0, 3, 240))] * 0.7 + 0.1
    classes = ["a", "b", "c"]
    result = evaluate.evaluate_probs(y, probs, classes, EvaluateParams(bootstrap=200))
    for name in classes:
        row = result["per_class"][name]
        assert {"precision", "recall", "f1", "support", "roc_auc", "ci"} <= set(row)
        for key, (lo, hi) in row["ci"].items():
            assert lo <= row[key] <= hi
    without = evaluate.evaluate_probs(y, probs, classes, EvaluateParams(bootstrap=0))
    assert "ci" not in without["per_class"]["a"]
    groups = pd.Series(np.where(np.arange(240) < 120, "hand", "wrist"))
    table = evaluate.group_metrics(y, probs, groups, params=EvaluateParams(bootstrap=200))
    for row in table.values():
        lo, hi = row["ci"]["accuracy"]
        assert lo <= row["accuracy"] <= hi
        for key in ("balanced_accuracy", "f1_macro", "kappa", "roc_auc"):  # every headline
            lo, hi = row["ci"][key]
            assert lo <= row[key] <= hi, key
    assert "ci" not in evaluate.group_metrics(y, probs, groups)["hand"]


def test_intervals_resample_patients_when_they_have_several_images():
    """Correlated images of one patient: the patient interval is wider, and the stage says
    which unit it resampled; one image per patient gives the image bootstrap."""
    rng = np.random.default_rng(0)
    n_patients, per = 80, 3
    patient_right = rng.random(n_patients) < 0.8  # a patient's images are right or wrong together
    y = rng.integers(0, 3, n_patients * per)
    right = np.repeat(patient_right, per)
    pred = np.where(right, y, (y + 1) % 3)
    probs = np.full((len(y), 3), 0.1)
    probs[np.arange(len(y)), pred] = 0.8
    patients = np.repeat([f"p{i}" for i in range(n_patients)], per)
    params = EvaluateParams(bootstrap=400)
    by_patient = evaluate.evaluate_probs(y, probs, list("abc"), params, patients=patients)
    by_image = evaluate.evaluate_probs(y, probs, list("abc"), params)
    assert by_patient["ci_unit"] == "patient" and by_image["ci_unit"] == "image"
    width = {r["ci_unit"]: np.diff(r["ci"]["accuracy"])[0] for r in (by_patient, by_image)}
    assert width["patient"] > 1.3 * width["image"]
    unique = np.array([f"q{i}" for i in range(len(y))])
    single = evaluate.evaluate_probs(y, probs, list("abc"), params, patients=unique)
    assert single["ci_unit"] == "image" and single["ci"] == by_image["ci"]
