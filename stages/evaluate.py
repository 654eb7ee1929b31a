"""evaluate stage: test-set metrics with bootstrap CIs, per-class table, confusion and ROC."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_curve

from stages import metrics
from stages.io import atomic_dir, read_processed, safe_name, write_csv, write_json
from stages.models import load_checkpoint, predict, select_device
from stages.params import EvaluateParams

PROCESSED_DIR = Path("data/processed")
MODEL_FILE = Path("models/model.pt")
METRICS_FILE = Path("metrics/evaluate.json")
PLOTS_DIR = Path("plots/evaluate")


def evaluate_probs(
    y: np.ndarray, probs: np.ndarray, classes: list[str], params: EvaluateParams
) -> dict:
    """Everything evaluate.json holds, from labels and predicted probabilities."""
    result = {k: round(v, 4) for k, v in metrics.summarize(y, probs).items()}
    result["n_test"] = len(y)
    result["per_class"] = {
        name: {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
        for name, row in metrics.per_class(y, probs, classes).items()
    }
    if params.bootstrap:
        result["ci"] = metrics.bootstrap_ci(y, probs, params.bootstrap, params.seed)
    return result


def roc_tables(y: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict[str, pd.DataFrame]:
    """One-vs-rest ROC points (fpr, tpr, threshold) per class present in the test set."""
    tables = {}
    for k, name in enumerate(classes):
        if 0 < (y == k).sum() < len(y):
            fpr, tpr, thr = roc_curve(y == k, probs[:, k])
            tables[name] = pd.DataFrame(
                {"fpr": fpr.round(5), "tpr": tpr.round(5), "threshold": np.clip(thr, 0, 1).round(5)}
            )
    return tables


def run(
    params: EvaluateParams,
    processed_dir: Path = PROCESSED_DIR,
    model_file: Path = MODEL_FILE,
    metrics_file: Path = METRICS_FILE,
    plots_dir: Path = PLOTS_DIR,
) -> str:
    start = time.perf_counter()
    device = select_device("auto")
    model, meta = load_checkpoint(model_file, device)
    images, frame, _ = read_processed(processed_dir, "test")
    classes = meta["classes"]
    y = frame["y"].to_numpy()
    probs = predict(model, images, meta, params.batch_size, device)
    result = evaluate_probs(y, probs, classes, params)
    pred = probs.argmax(axis=1)
    with atomic_dir(plots_dir) as tmp:
        names = np.array(classes)
        write_csv(
            tmp / "confusion.csv", pd.DataFrame({"actual": names[y], "predicted": names[pred]})
        )
        columns = {f"prob_{c}": probs[:, k].round(6) for k, c in enumerate(classes)}
        keep = [c for c in ("image", "patient_id", "group") if c in frame]
        write_csv(
            tmp / "predictions.csv",
            frame[keep].assign(
                label=frame["label"], predicted=names[pred], correct=pred == y, **columns
            ),
        )
        for name, table in roc_tables(y, probs, classes).items():
            write_csv(tmp / "roc" / f"{safe_name(name)}.csv", table)
    write_json(metrics_file, result)
    ci = result.get("ci", {}).get("accuracy")
    ci_text = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
    return (
        f"evaluate: {len(y):,} test images: accuracy {result['accuracy']:.3f}{ci_text}, "
        f"balanced {result['balanced_accuracy']:.3f}, F1 {result['f1_macro']:.3f}, "
        f"kappa {result['kappa']:.3f}, AUC {result['roc_auc']:.3f} "
        f"in {time.perf_counter() - start:.1f} s"
    )
