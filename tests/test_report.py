"""The report in a real browser: headless Chromium (Debian's chromium + chromium-driver) with
networking disabled; the page must render every section from its own inlined code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from stages import report
from stages.io import safe_name
from stages.params import parse_params
from tests.conftest import TINY

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
SECTIONS = ("data", "preprocessing", "training", "results", "embedding", "params")
EVIL = "<script>alert(1)</script>"


def write_inputs(root: Path, classes: list[str], seed: int = 0) -> None:
    """The files the report stage reads, as the other stages would write them (tiny)."""
    rng = np.random.default_rng(seed)
    (root / "data/raw").mkdir(parents=True)
    for sub in ("metrics", "plots/preprocess", "plots/train", "plots/evaluate/roc", "plots/embed"):
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
    }
    (root / "data/raw/dataset.json").write_text(json.dumps(card))
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
    row = {"precision": 0.8, "recall": 0.7, "f1": 0.75, "support": 11, "roc_auc": 0.9}
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
    (root / "metrics/evaluate.json").write_text(json.dumps(result))
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


def test_user_strings_are_escaped(in_tmp: Path):
    page = build(in_tmp, ["normal", EVIL]).read_text()
    assert EVIL not in page  # tables escape it; plot data JSON-escapes "<" as \u003c
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-sync",
        "--disable-component-update",
        "--window-size=1280,2000",
        # no network: every host resolves to nothing, and no proxy is reachable
        "--host-resolver-rules=MAP * ~NOTFOUND",
        "--proxy-server=127.0.0.1:9",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


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
