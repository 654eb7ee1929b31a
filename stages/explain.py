"""explain stage: Grad-CAM (pytorch-grad-cam) galleries and, where lesion masks exist, the
pointing game — does the CAM's peak fall inside the lesion?

Outputs: plots/explain/<class>.png (rows: true positives, false negatives, false positives,
true negatives for that class; the CAM of that class over each image, lesion outline in
green), plots/explain/gallery.csv, plots/explain/pointing.csv and metrics/explain.json.
"""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image
from torch import nn

from stages.lib import paths
from stages.lib.cam import TILE, compute_cams, find_target_layer, overlay, pointing_game
from stages.lib.inference import LoadedModel, ScoredSplit, load_model, score_split
from stages.lib.io import (
    atomic_dir,
    safe_name,
    write_csv,
    write_result,
)
from stages.lib.params import ExplainParams

# metrics/explain.json; per-class scores, CAM energy and empty CAMs go to the detail file
HEADLINE = ("method", "target_layer", "n_test", "n_abnormal", "pointing_game", "pointing_chance")
CELL_NAMES = {
    "TP": "true positive",
    "FN": "false negative",
    "FP": "false positive",
    "TN": "true negative",
}
CAPTION = 18  # px of text above each tile


def _text(width: int, height: int, text: str, middle: bool = False) -> np.ndarray:
    """A white strip with the text on its bottom line (or vertically centred)."""
    strip = np.full((height, width, 3), 255, np.uint8)
    baseline = height // 2 + 4 if middle else height - 5
    cv2.putText(
        strip, text, (3, baseline), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA
    )
    return strip


def gallery_image(
    rows: dict[str, list[tuple[np.ndarray, str]]], n_images: int, totals: dict[str, int]
) -> np.ndarray:
    """One PNG: a row per cell (label and count on the left), captioned tiles per row."""
    label_w, lines = 150, []
    for cell, tiles in rows.items():
        label = f"{CELL_NAMES[cell]}: {len(tiles)} of {totals[cell]}"
        cols = [_text(label_w, TILE + CAPTION, label, middle=True)]
        for tile, caption in tiles[:n_images]:
            cols.append(np.vstack([_text(TILE, CAPTION, caption), tile]))
            cols.append(np.full((TILE + CAPTION, 4, 3), 255, np.uint8))
        width = label_w + n_images * (TILE + 4)
        line = np.hstack(cols)
        lines.append(
            np.pad(line, ((0, 4), (0, width - line.shape[1]), (0, 0)), constant_values=255)
        )
    return np.vstack(lines)


def confusion_cells(truth: np.ndarray, pred: np.ndarray) -> dict[str, np.ndarray]:
    """Row indices of true/false positives/negatives for one class (boolean truth and pred)."""
    return {
        "TP": np.flatnonzero(truth & pred),
        "FN": np.flatnonzero(truth & ~pred),
        "FP": np.flatnonzero(~truth & pred),
        "TN": np.flatnonzero(~truth & ~pred),
    }


def write_gallery(
    out: Path,
    masks: np.ndarray | None,
    model: LoadedModel,
    test: ScoredSplit,
    layer: nn.Module,
    params: ExplainParams,
) -> pd.DataFrame:
    """plots/explain/<class>.png per class; returns the table of images shown."""
    multilabel = model.meta.multilabel
    images, frame, y, probs = test.images, test.frame, test.y, test.probs
    rng = np.random.default_rng(params.seed)
    shown = []
    for k, name in enumerate(model.meta.classes):
        truth = y[:, k] == 1 if multilabel else y == k
        pred = probs[:, k] >= 0.5 if multilabel else probs.argmax(axis=1) == k
        cells = confusion_cells(truth, pred)
        picks = {
            cell: np.sort(rng.choice(idx, min(len(idx), params.n_images), replace=False))
            for cell, idx in cells.items()
        }
        chosen = np.concatenate(list(picks.values())).astype(int)
        cams = compute_cams(
            model.net,
            np.asarray(images[chosen]),
            model.meta,
            np.full(len(chosen), k),
            params.method,
            layer,
            params.batch_size,
            model.device,
        )
        by_row = dict(zip(chosen.tolist(), cams, strict=True))
        rows = {}
        for cell, idx in picks.items():
            rows[cell] = []
            for i in idx:
                mask = None if masks is None else masks[i]
                caption = f"{frame['label'].iloc[i][:10]} p={probs[i, k]:.2f}"
                rows[cell].append((overlay(np.asarray(images[i]), by_row[i], mask), caption))
                shown.append(
                    {
                        "class": name,
                        "cell": cell,
                        "image": frame["image"].iloc[i],
                        "label": frame["label"].iloc[i],
                        "prob": round(float(probs[i, k]), 4),
                    }
                )
        totals = {cell: len(idx) for cell, idx in cells.items()}
        picture = gallery_image(rows, params.n_images, totals)
        Image.fromarray(picture).save(paths.gallery_image(out, safe_name(name)))
    return pd.DataFrame(shown, columns=["class", "cell", "image", "label", "prob"])


def lesion_targets(y: np.ndarray, probs: np.ndarray, multilabel: bool) -> np.ndarray:
    """The class whose CAM is scored: the true class (multi-label: the likeliest true label,
    or the likeliest label when a masked image has none)."""
    if not multilabel:
        return y
    return np.where(y.any(axis=1), np.where(y == 1, probs, -1.0).argmax(axis=1), probs.argmax(1))


def score_lesions(
    model: LoadedModel,
    test: ScoredSplit,
    masks: np.ndarray,
    layer: nn.Module,
    params: ExplainParams,
) -> tuple[dict, pd.DataFrame]:
    """Pointing game over the test images that have a non-empty lesion mask."""
    abnormal = np.flatnonzero(np.asarray(masks).reshape(len(masks), -1).any(axis=1))
    if not len(abnormal):
        return {}, pd.DataFrame()
    frame = test.frame
    targets = lesion_targets(test.y, test.probs, model.meta.multilabel)[abnormal]
    cams = compute_cams(
        model.net,
        np.asarray(test.images[abnormal]),
        model.meta,
        targets,
        params.method,
        layer,
        params.batch_size,
        model.device,
    )
    summary, table = pointing_game(cams, np.asarray(masks[abnormal]))
    table.insert(0, "label", frame["label"].to_numpy()[abnormal])
    table.insert(0, "image", frame["image"].to_numpy()[abnormal])
    by_label = table.groupby("label")
    summary["pointing_game_per_class"] = by_label["hit"].mean().round(4).to_dict()
    summary["pointing_chance_per_class"] = by_label["area_share"].mean().round(4).to_dict()
    return summary, table


def run(
    params: ExplainParams,
    processed_dir: Path = paths.PROCESSED,
    model_file: Path = paths.MODEL,
    metrics_file: Path = paths.EXPLAIN_METRICS,
    plots_dir: Path = paths.EXPLAIN_PLOTS,
) -> str:
    start = time.perf_counter()
    model = load_model(model_file)
    test = score_split(model, processed_dir, batch_size=params.batch_size)
    layer_name, layer = find_target_layer(model.net, params.target_layer, model.meta.input_size)
    masks_file = paths.split_masks(processed_dir, "test")
    result: dict = {"method": params.method, "target_layer": layer_name, "n_test": len(test.y)}
    with atomic_dir(plots_dir) as tmp:
        masks = np.load(masks_file, mmap_mode="r") if masks_file.is_file() else None
        shown = write_gallery(tmp, masks, model, test, layer, params)
        write_csv(tmp / paths.GALLERY_NAME, shown)
        if masks is not None:
            summary, table = score_lesions(model, test, masks, layer, params)
            result.update(summary)
            if len(table):
                write_csv(tmp / paths.POINTING_NAME, table.round(4))
        del masks  # close the memory map
    write_result(metrics_file, result, HEADLINE)
    pointing = (
        f", pointing game {result['pointing_game']:.3f} (chance {result['pointing_chance']:.3f}) "
        f"on {result['n_abnormal']:,} lesions"
        if "pointing_game" in result
        else ""
    )
    return (
        f"explain: {params.method} on {layer_name}, {len(shown):,} gallery images -> "
        f"{plots_dir}{pointing} in {time.perf_counter() - start:.1f} s"
    )
