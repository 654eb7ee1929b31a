"""The report in a real browser: headless Chromium (Debian's chromium + chromium-driver) with
networking disabled; the page must render every section from its own inlined code."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from stages import evaluate, report
from stages.lib import shift
from stages.lib.io import read_result, safe_name, write_result
from stages.lib.params import parse_params
from tests.conftest import TINY

SECTIONS = (
    "data",
    "preprocessing",
    "training",
    "results",
    "calibration",
    "deployment",
    "embedding",
    "explain",
    "params",
)
EVIL = "<script>alert(1)</script>"
N_REJECTED = 23


def write_inputs(root: Path, classes: list[str], seed: int = 0) -> None:
    """The files the report stage reads, as the other stages would write them (tiny), with
    every optional input present so that every section renders."""
    rng = np.random.default_rng(seed)
    (root / "data/raw").mkdir(parents=True)
    for sub in (
        "metrics",
        "plots/preprocess",
        "plots/train",
        "plots/evaluate/roc",
        "plots/evaluate/pr",
        "plots/embed",
        "plots/explain",
    ):
        (root / sub).mkdir(parents=True, exist_ok=True)
    counts = {c: 10 + i for i, c in enumerate(classes)}
    card = {
        "name": "toy",
        "description": f"toy set with {classes[0]}",
        "task": "multiclass",
        "classes": classes,
        "n_images": 99,
        "n_patients": 50,
        "license": "CC0",
        "source": "url",
        "url": "https://example.org/toy.zip",
        "citation": "Doe et al., Toy X-rays & friends, 2024",
    }
    (root / "data/raw/dataset.json").write_text(json.dumps(card))
    pd.DataFrame(  # more than the 20 rows the data card shows
        {
            "path": [f"images/{classes[i % len(classes)]}/bad{i}.png" for i in range(N_REJECTED)],
            "reason": "cannot identify image file",
            "label": [classes[i % len(classes)] for i in range(N_REJECTED)],
        }
    ).to_csv(root / "data/raw/rejected.csv", index=False)
    split = {
        s: {"n_images": 33, "n_patients": 16, "class_counts": counts, "class_counts_before": counts}
        for s in ("train", "val", "test")
    }
    split |= {"patient_overlap": 0, "strategy": "patient"}
    (root / "metrics/split.json").write_text(json.dumps(split))
    Image.fromarray(rng.integers(0, 255, (64, 128), dtype=np.uint8)).save(
        root / "plots/preprocess/samples.png"
    )
    epochs = np.arange(1, 6)
    history = {"epoch": epochs, "train_loss": 1 / epochs, "val_loss": 1.2 / epochs}
    for key in ("val_accuracy", "val_balanced_accuracy", "val_f1_macro", "val_roc_auc"):
        history[key] = 1 - 0.5 / epochs
    pd.DataFrame(history).to_csv(root / "plots/train/history.csv", index=False)
    train = {
        "best_epoch": 5,
        "epochs_run": 5,
        "best_val_f1_macro": 0.9,
        "train_seconds": 1.0,
        "images_per_second": 100.0,
        "device": "cpu",
    }
    (root / "metrics/train.json").write_text(json.dumps(train))
    row = {
        "precision": 0.8,
        "recall": 0.7,
        "f1": 0.75,
        "support": 11,
        "roc_auc": 0.9,
        "average_precision": 0.85,
        "ci": {"precision": [0.7, 0.9], "recall": [0.6, 0.8], "f1": [0.65, 0.85]},
    }
    result = {
        k: 0.8
        for k in (
            "accuracy",
            "balanced_accuracy",
            "f1_macro",
            "precision_macro",
            "recall_macro",
            "kappa",
            "roc_auc",
        )
    }
    result |= {"n_test": 40, "per_class": {c: row for c in classes}, "ci": {"accuracy": [0.7, 0.9]}}
    result["tta"] = True
    at = {"threshold": 0.5, "accuracy": 0.8, "sensitivity": 0.75, "specificity": 0.85, "tp": 9}
    result |= {
        "ece": 0.05,
        "brier": 0.2,
        "threshold": {
            "method": "youden",
            "value": 0.42,
            "val_sensitivity": 0.9,
            "val_specificity": 0.8,
            "at_default": at,
            "at_chosen": {**at, "threshold": 0.42, "sensitivity": 0.9},
        },
        "per_group": {
            g: {"n": 20, "accuracy": 0.8, "roc_auc": 0.9, "ci": {"accuracy": [0.6, 0.95]}}
            for g in ("hand", "wrist")
        },
        "shift": shift.summarize_shift(shifted_table(classes)),
        "params_millions": 4.9,
        "model_size_mb": 19.6,
        "latency_ms": 3.2,
        "latency_device": "cpu (4 threads)",
    }
    write_result(root / "metrics/evaluate.json", result, evaluate.headline())
    export = {
        "onnx_latency_ms": 1.5,
        "torchscript_size_mb": 19.7,
        "onnx_size_mb": 19.5,
        "torchscript_max_abs_diff": 1e-7,
        "onnx_max_abs_diff": 2e-7,
        "n_checked": 16,
    }
    (root / "metrics/export.json").write_text(json.dumps(export))
    explain = {
        "method": "gradcam",
        "target_layer": "layer4",
        "pointing_game": 0.7,
        "n_abnormal": 20,
        "pointing_chance": 0.1,
        "cam_energy_in_mask": 0.4,
        "pointing_game_per_class": {c: 0.7 for c in classes[1:]},
        "pointing_chance_per_class": {c: 0.1 for c in classes[1:]},
    }
    (root / "metrics/explain.json").write_text(json.dumps(explain))
    for c in classes:
        Image.fromarray(rng.integers(0, 255, (32, 64, 3), dtype=np.uint8)).save(
            root / f"plots/explain/{safe_name(c)}.png"
        )
    names = np.array(classes)
    pd.DataFrame(
        {
            "actual": names[rng.integers(0, len(classes), 40)],
            "predicted": names[rng.integers(0, len(classes), 40)],
        }
    ).to_csv(root / "plots/evaluate/confusion.csv", index=False)
    for c in classes:
        pd.DataFrame({"fpr": [0, 0.2, 1], "tpr": [0, 0.8, 1]}).to_csv(
            root / f"plots/evaluate/roc/{safe_name(c)}.csv", index=False
        )
        pd.DataFrame({"recall": [1, 0.8, 0], "precision": [0.5, 0.9, 1]}).to_csv(
            root / f"plots/evaluate/pr/{safe_name(c)}.csv", index=False
        )
    pd.DataFrame(
        {
            "bin_lower": [0.4, 0.6, 0.8],
            "bin_upper": [0.6, 0.8, 1.0],
            "confidence": [0.5, 0.7, 0.9],
            "accuracy": [0.45, 0.72, 0.88],
            "count": [5, 15, 20],
        }
    ).to_csv(root / "plots/evaluate/calibration.csv", index=False)
    labels = names[rng.integers(0, len(classes), 40)]
    pd.DataFrame(
        {
            "x": rng.normal(size=40),
            "y": rng.normal(size=40),
            "label": labels,
            "predicted": labels,
            "correct": True,
            "image": [f"img{i}" for i in range(40)],
        }
    ).to_csv(root / "plots/embed/embedding.csv", index=False)
    (root / "metrics/embed.json").write_text(
        json.dumps({"silhouette": 0.3, "n_points": 40, "method": "tsne"})
    )


def shifted_table(classes: list[str]):
    """Val/test comparison where the test split calls a third of class 0 something else."""
    rng = np.random.default_rng(0)
    k = len(classes)

    def split(flip):
        y = np.arange(300) % k
        probs = np.full((300, k), 0.1 / (k - 1))
        probs[np.arange(300), y] = 0.9
        moved = (y == 0) & (rng.random(300) < flip)
        probs[moved] = np.roll(probs[moved], 1, axis=1)
        return y, probs, None

    return shift.compare_splits(split(0.02), split(0.4), classes, 200, 0)


def build(root: Path, classes: list[str]) -> Path:
    write_inputs(root, classes)
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(TINY))
    report.run(parse_params(TINY), params_file, root / "reports/report.html")
    return root / "reports/report.html"


@pytest.fixture
def built(in_tmp: Path) -> Path:
    return build(in_tmp, ["normal", "bacterial", "viral"])


def test_report_is_self_contained(built: Path):
    page = built.read_text()
    assert page.count("plotly.js v") == 1
    assert "<script src=" not in page and "<link " not in page
    for anchor in SECTIONS:
        assert f'id="{anchor}"' in page


def test_header_names_commit_params_hash_and_versions(built: Path):
    import torch

    page = built.read_text()
    header = page.split('<p class="meta">', 1)[1].split("</p>", 1)[0]
    digest = hashlib.sha256((built.parents[1] / "params.yaml").read_bytes()).hexdigest()[:12]
    assert f"params {digest}" in header
    assert re.search(r"commit (unknown|[0-9a-f]{7,})", header)  # the temp dir is not a repo
    assert f"torch {torch.__version__}" in header and "timm " in header and "dvc " in header


def test_data_card_shows_source_and_rejected_files(built: Path):
    page = built.read_text()
    data = page.split('id="data"', 1)[1].split("<h2 ", 1)[0]
    assert "Source: url" in data and "URL: https://example.org/toy.zip" in data
    assert "Doe et al., Toy X-rays &amp; friends, 2024" in data  # escaped
    assert "Licence: CC0" in data
    assert f"{N_REJECTED} rejected files" in data
    assert data.count("cannot identify image file") == report.REJECTED_SHOWN  # first 20 only
    assert "data/raw/rejected.csv" in data


def test_data_card_without_rejected_files(in_tmp: Path):
    write_inputs(in_tmp, ["a", "b"])
    pd.DataFrame(columns=["path", "reason", "label"]).to_csv(
        in_tmp / "data/raw/rejected.csv", index=False
    )  # what the download stage writes when every file was read
    (in_tmp / "params.yaml").write_text(yaml.safe_dump(TINY))
    report.run(parse_params(TINY), in_tmp / "params.yaml", in_tmp / "out.html")
    data = (in_tmp / "out.html").read_text().split('id="data"', 1)[1].split("<h2 ", 1)[0]
    assert "0 rejected files" in data and "<td>" in data  # class table only
    assert data.count("<table>") == 1


def test_per_class_and_per_group_tables_show_intervals(built: Path):
    page = built.read_text()
    for column in ("precision 95% CI", "recall 95% CI", "f1 95% CI", "accuracy 95% CI"):
        assert f"<th>{column}</th>" in page
    assert "<td>0.700</td><td>[0.600, 0.800]</td>" in page  # recall, then its interval
    assert "<td>hand</td><td>20</td><td>0.800</td><td>[0.600, 0.950]</td>" in page


def test_results_say_the_probabilities_are_test_time_averages(built: Path, in_tmp: Path):
    section = built.read_text().split('id="results"', 1)[1].split("<h2 ", 1)[0]
    assert "test-time augmentation" in section
    result = read_result(in_tmp / "metrics/evaluate.json")  # without TTA the note goes
    write_result(in_tmp / "metrics/evaluate.json", result | {"tta": False}, evaluate.headline())
    params_file = in_tmp / "params.yaml"
    report.run(parse_params(TINY), params_file, in_tmp / "reports/plain.html")
    section = (in_tmp / "reports/plain.html").read_text().split('id="results"', 1)[1]
    assert "test-time augmentation" not in section.split("<h2 ", 1)[0]


def test_validation_and_test_are_side_by_side_with_the_shift_flag(built: Path):
    section = built.read_text().split('id="shift"', 1)[1].split("<h2 ", 1)[0]
    assert "shift: " in section and "figures differ" in section
    assert "<th>validation</th><th>test</th><th>test - val</th><th>flag</th>" in section
    row = section.split("<td>normal</td><td>sensitivity</td>", 1)[1].split("</tr>", 1)[0]
    assert "SHIFT" in row  # a third of the normal test images called something else
    assert section.count("<td>SHIFT</td>") >= 1


def test_user_strings_are_escaped(in_tmp: Path):
    page = build(in_tmp, ["normal", EVIL]).read_text()
    assert EVIL not in page  # tables escape it; plot data JSON-escapes "<" as \u003c
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_report_renders_in_chromium(browser, built: Path, tmp_path: Path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(built.resolve().as_uri())
    WebDriverWait(browser, 30).until(
        lambda d: d.execute_script("return document.querySelectorAll('.main-svg').length") > 0
    )
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []
    for anchor in SECTIONS:
        assert browser.find_element(By.ID, anchor).is_displayed()
    points = browser.execute_script(
        "return document.querySelectorAll('#tsne .scatterlayer .point').length"
    )
    assert points == 40  # every embedded test image is drawn
    shot = tmp_path / "report.png"
    browser.save_screenshot(str(shot))
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.std() > 10  # not a blank page


def test_malicious_class_name_does_not_execute(browser, in_tmp: Path):
    from selenium.common.exceptions import NoAlertPresentException

    page = build(in_tmp, ["normal", EVIL])
    browser.get(page.resolve().as_uri())
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text  # noqa: B018 - reading it is the check
    assert (
        EVIL
        in browser.find_element("id", "data").find_element("xpath", "following-sibling::table").text
    )
