"""The explain stage: gallery cells, and a run without masks on a multi-label model."""

from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image

from stages import explain
from stages.lib.io import read_result
from stages.lib.params import ExplainParams
from tests.conftest import tiny_processed


def test_confusion_cells():
    truth = np.array([True, True, False, False, True])
    pred = np.array([True, False, True, False, True])
    cells = explain.confusion_cells(truth, pred)
    assert list(cells["TP"]) == [0, 4] and list(cells["FN"]) == [1]
    assert list(cells["FP"]) == [2] and list(cells["TN"]) == [3]


def test_run_without_masks_draws_galleries_and_skips_pointing_game(tmp_path):
    classes = ["effusion", "nodule"]
    processed, checkpoint = tiny_processed(tmp_path, "multilabel", classes, n=12)
    metrics_file, plots = tmp_path / "explain.json", tmp_path / "plots"
    params = ExplainParams(method="gradcam++", n_images=2, target_layer="layer3")
    line = explain.run(params, processed, checkpoint, metrics_file, plots)
    assert line.startswith("explain: gradcam++ on layer3") and "pointing" not in line
    result = read_result(metrics_file)
    assert result["target_layer"] == "layer3" and "pointing_game" not in result
    gallery = pd.read_csv(plots / "gallery.csv")
    assert set(gallery["class"]) <= set(classes)
    assert gallery.groupby(["class", "cell"]).size().max() <= 2
    for name in classes:
        with Image.open(plots / f"{name}.png") as img:
            assert img.mode == "RGB" and img.size[1] > 4 * 128
    assert not (plots / "pointing.csv").exists()


def test_scored_class_is_the_likeliest_true_label():
    y = np.array([[0, 1, 1], [0, 0, 0], [1, 0, 0]])
    probs = np.array([[0.9, 0.2, 0.5], [0.1, 0.7, 0.3], [0.1, 0.8, 0.1]])
    assert explain.lesion_targets(y, probs, True).tolist() == [2, 1, 0]  # no label: the likeliest
    assert explain.lesion_targets(np.array([2, 0]), probs[:2], False).tolist() == [2, 0]
