"""Classification metrics shared by train (validation) and evaluate (test), via scikit-learn."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import numpy as np
import pandas as pd
from sklearn import metrics as skm

CLASS_CI_KEYS = ("precision", "recall", "f1")

# A metric's function: labels and predictions -> one float. Single-label: y_true (N,)
# class indices, y_pred (N,) the argmax, probs (N, K). Multi-label: y_true and y_pred (N, K)
# 0/1 (a label predicted at probability >= threshold), probs (N, K).
MetricFunction = Callable[[np.ndarray, np.ndarray, np.ndarray], float]


def roc_auc(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Binary AUC, or macro one-vs-rest AUC for multiclass; NaN when a class is absent."""
    n_classes = probs.shape[1]
    if len(np.unique(y_true)) < n_classes:
        return float("nan")
    if n_classes == 2:
        return float(skm.roc_auc_score(y_true, probs[:, 1]))
    return float(skm.roc_auc_score(y_true, probs, multi_class="ovr", average="macro"))


def _macro(score: Callable, **kwargs: object) -> MetricFunction:
    """A scikit-learn score averaged over all K classes (labels absent from both sides too)."""

    def compute(y_true: np.ndarray, y_pred: np.ndarray, probs: np.ndarray) -> float:
        labels = np.arange(probs.shape[1])
        return score(y_true, y_pred, labels=labels, average="macro", zero_division=0, **kwargs)

    return compute


# the figures of `summarize`, in the order of metrics/evaluate.json; each one registered in
# `stages.lib.metric_registry` (tests/test_registry.py checks both agree)
SINGLE_LABEL: dict[str, MetricFunction] = {
    "accuracy": lambda y_true, y_pred, _: skm.accuracy_score(y_true, y_pred),
    "balanced_accuracy": lambda y_true, y_pred, _: skm.balanced_accuracy_score(y_true, y_pred),
    "f1_macro": _macro(skm.f1_score),
    "precision_macro": _macro(skm.precision_score),
    "recall_macro": _macro(skm.recall_score),
    "kappa": lambda y_true, y_pred, probs: skm.cohen_kappa_score(
        y_true, y_pred, labels=np.arange(probs.shape[1])
    ),
    "roc_auc": lambda y_true, _, probs: roc_auc(y_true, probs),
}


def summarize(
    y_true: np.ndarray, probs: np.ndarray, keys: Iterable[str] | None = None
) -> dict[str, float]:
    """Headline metrics of predicted class probabilities (N, K) against labels (N,): every
    figure of SINGLE_LABEL, or those of `keys`."""
    y_pred = probs.argmax(axis=1)
    chosen = SINGLE_LABEL if keys is None else {k: SINGLE_LABEL[k] for k in keys}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # undefined precision on empty predictions -> 0
        return {k: float(f(y_true, y_pred, probs)) for k, f in chosen.items()}


def per_class(y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict[str, dict]:
    """Precision, recall, F1, support, one-vs-rest AUC and average precision for each class."""
    y_pred = probs.argmax(axis=1)
    p, r, f, s = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=np.arange(len(classes)), zero_division=0
    )
    table = {}
    for k, name in enumerate(classes):
        table[name] = {
            "precision": float(p[k]),
            "recall": float(r[k]),
            "f1": float(f[k]),
            "support": int(s[k]),
            **_ranking(y_true == k, probs[:, k]),
        }
    return table


def _ranking(positives: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """ROC-AUC and average precision of one class's scores; NaN when one side is empty."""
    if not 0 < positives.sum() < len(positives):
        return {"roc_auc": float("nan"), "average_precision": float("nan")}
    return {
        "roc_auc": float(skm.roc_auc_score(positives, scores)),
        "average_precision": float(skm.average_precision_score(positives, scores)),
    }


# --- multi-label: targets (N, K) multi-hot, probs (N, K) independent sigmoids ---------------


def _present(y_true: np.ndarray) -> list[int]:
    """The labels (columns) that have both positives and negatives."""
    return [k for k in range(y_true.shape[1]) if 0 < y_true[:, k].sum() < len(y_true)]


def _label_mean(score: Callable[[np.ndarray, np.ndarray], float]) -> MetricFunction:
    """A binary score averaged over the labels present both ways (NaN if none is)."""

    def compute(y_true: np.ndarray, y_pred: np.ndarray, probs: np.ndarray) -> float:
        values = [score(y_true[:, k], y_pred[:, k]) for k in _present(y_true)]
        return float(np.mean(values)) if values else float("nan")

    return compute


def _label_auc(y_true: np.ndarray, y_pred: np.ndarray, probs: np.ndarray) -> float:
    aucs = [_ranking(y_true[:, k] == 1, probs[:, k])["roc_auc"] for k in range(y_true.shape[1])]
    return float(np.nanmean(aucs)) if not np.all(np.isnan(aucs)) else float("nan")


def _averaged(score: Callable, average: str) -> MetricFunction:
    return lambda y_true, y_pred, _: score(y_true, y_pred, average=average, zero_division=0)


# the figures of `summarize_multilabel`, in the order of metrics/evaluate.json
MULTI_LABEL: dict[str, MetricFunction] = {
    "accuracy": lambda y_true, y_pred, _: skm.accuracy_score(y_true, y_pred),  # exact match
    "balanced_accuracy": _label_mean(skm.balanced_accuracy_score),
    "f1_macro": _averaged(skm.f1_score, "macro"),
    "f1_micro": _averaged(skm.f1_score, "micro"),
    "precision_macro": _averaged(skm.precision_score, "macro"),
    "recall_macro": _averaged(skm.recall_score, "macro"),
    "kappa": _label_mean(skm.cohen_kappa_score),
    "hamming_loss": lambda y_true, y_pred, _: skm.hamming_loss(y_true, y_pred),
    "roc_auc": _label_auc,
}


def summarize_multilabel(
    y_true: np.ndarray, probs: np.ndarray, threshold: float = 0.5
) -> dict[str, float]:
    """Headline multi-label metrics; a label counts as predicted when its probability >= threshold.

    `accuracy` is the exact-match (subset) accuracy; `balanced_accuracy`, `kappa` and
    `roc_auc` are macro means over the labels that have both positives and negatives.
    """
    y_pred = (probs >= threshold).astype(int)
    y_true = y_true.astype(int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {k: float(f(y_true, y_pred, probs)) for k, f in MULTI_LABEL.items()}


def per_label(
    y_true: np.ndarray, probs: np.ndarray, classes: list[str], threshold: float = 0.5
) -> dict[str, dict]:
    """Per-label precision, recall, F1, support (positives), AUC and average precision."""
    y_pred = (probs >= threshold).astype(int)
    table = {}
    for k, name in enumerate(classes):
        truth = y_true[:, k].astype(int)
        p, r, f, _ = skm.precision_recall_fscore_support(
            truth, y_pred[:, k], labels=[1], zero_division=0
        )
        table[name] = {
            "precision": float(p[0]),
            "recall": float(r[0]),
            "f1": float(f[0]),
            "support": int(truth.sum()),
            **_ranking(truth == 1, probs[:, k]),
        }
    return table


# --- calibration ---------------------------------------------------------------------------


def confidence_outcomes(
    y_true: np.ndarray, probs: np.ndarray, multilabel: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, outcome) pairs whose agreement is calibration.

    Single-label: top-label confidence (max probability) and whether the argmax is right.
    Multi-label: every label's probability and whether the label is present.
    """
    if multilabel:
        return probs.ravel(), y_true.ravel().astype(float)
    return probs.max(axis=1), (probs.argmax(axis=1) == y_true).astype(float)


def reliability_table(
    y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15, multilabel: bool = False
) -> pd.DataFrame:
    """Reliability-diagram series: per non-empty equal-width confidence bin, the mean
    confidence, the observed accuracy (frequency) and the count."""
    conf, outcome = confidence_outcomes(y_true, probs, multilabel)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    rows = []
    for b in range(n_bins):
        inside = bins == b
        if inside.any():
            rows.append(
                {
                    "bin_lower": edges[b],
                    "bin_upper": edges[b + 1],
                    "confidence": float(conf[inside].mean()),
                    "accuracy": float(outcome[inside].mean()),
                    "count": int(inside.sum()),
                }
            )
    return pd.DataFrame(rows, columns=["bin_lower", "bin_upper", "confidence", "accuracy", "count"])


def expected_calibration_error(
    y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15, multilabel: bool = False
) -> float:
    """ECE: count-weighted mean |accuracy - confidence| over equal-width confidence bins."""
    table = reliability_table(y_true, probs, n_bins, multilabel)
    weights = table["count"] / table["count"].sum()
    return float((weights * (table["accuracy"] - table["confidence"]).abs()).sum())


def brier_score(y_true: np.ndarray, probs: np.ndarray, multilabel: bool = False) -> float:
    """Brier score: binary in [0, 1] (positive class), multiclass in [0, 2] (sum over
    classes, sklearn's convention), multi-label the mean binary score over labels."""
    if multilabel:
        return float(np.mean((probs - y_true) ** 2))
    if probs.shape[1] == 2:
        return float(skm.brier_score_loss(y_true, probs[:, 1], pos_label=1))
    return float(skm.brier_score_loss(y_true, probs, labels=np.arange(probs.shape[1])))


# --- binary operating point ----------------------------------------------------------------


def choose_threshold(
    y_true: np.ndarray, scores: np.ndarray, method: str, target_sensitivity: float = 0.9
) -> float:
    """Threshold on the positive-class probability (positive when score >= threshold).

    youden: maximises sensitivity + specificity - 1; sensitivity: the highest threshold
    whose sensitivity reaches `target_sensitivity` (so specificity is as high as it can be).
    """
    positives = np.asarray(y_true) == 1
    if not 0 < positives.sum() < len(positives):
        raise ValueError("choosing a threshold needs positive and negative validation images")
    fpr, tpr, thresholds = skm.roc_curve(positives, scores)
    thresholds = np.clip(thresholds, 0.0, 1.0)  # the first is +inf: "nothing positive"
    if method == "youden":
        return float(thresholds[np.argmax(tpr - fpr)])
    if method == "sensitivity":
        return float(thresholds[np.flatnonzero(tpr >= target_sensitivity - 1e-12)[0]])
    raise ValueError(f"unknown threshold method {method!r}; use youden or sensitivity")


def binary_at_threshold(y_true: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    """Operating-point metrics of `scores >= threshold` against binary labels."""
    y_true = np.asarray(y_true).astype(int)
    y_pred = (scores >= threshold).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(y_true, y_pred, labels=[0, 1]).ravel()

    def ratio(a: int, b: int) -> float:
        return float(a / b) if b else float("nan")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kappa = float(skm.cohen_kappa_score(y_true, y_pred, labels=[0, 1]))
    return {
        "threshold": float(threshold),
        "accuracy": ratio(tp + tn, len(y_true)),
        "balanced_accuracy": (ratio(tp, tp + fn) + ratio(tn, tn + fp)) / 2,
        "sensitivity": ratio(tp, tp + fn),
        "specificity": ratio(tn, tn + fp),
        "precision": ratio(tp, tp + fp),
        "npv": ratio(tn, tn + fn),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "kappa": kappa,
        "tp": int(tp),
        "fp": int(fp),
        "fn": int(fn),
        "tn": int(tn),
    }
