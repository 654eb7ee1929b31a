"""Classification metrics shared by train (validation) and evaluate (test), via scikit-learn."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn import metrics as skm
from tqdm import tqdm

SUMMARY_KEYS = ("accuracy", "balanced_accuracy", "f1_macro", "kappa", "roc_auc")


def roc_auc(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Binary AUC, or macro one-vs-rest AUC for multiclass; NaN when a class is absent."""
    n_classes = probs.shape[1]
    if len(np.unique(y_true)) < n_classes:
        return float("nan")
    if n_classes == 2:
        return float(skm.roc_auc_score(y_true, probs[:, 1]))
    return float(skm.roc_auc_score(y_true, probs, multi_class="ovr", average="macro"))


def summarize(y_true: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Headline metrics of predicted class probabilities (N, K) against labels (N,)."""
    y_pred = probs.argmax(axis=1)
    labels = np.arange(probs.shape[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # undefined precision on empty predictions -> 0
        return {
            "accuracy": float(skm.accuracy_score(y_true, y_pred)),
            "balanced_accuracy": float(skm.balanced_accuracy_score(y_true, y_pred)),
            "f1_macro": float(
                skm.f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)
            ),
            "precision_macro": float(
                skm.precision_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)
            ),
            "recall_macro": float(
                skm.recall_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)
            ),
            "kappa": float(skm.cohen_kappa_score(y_true, y_pred, labels=labels)),
            "roc_auc": roc_auc(y_true, probs),
        }


def summarize_multilabel(
    y_true: np.ndarray, probs: np.ndarray, threshold: float = 0.5
) -> dict[str, float]:
    """Headline metrics of per-label probabilities (N, K) against multi-hot targets (N, K).

    accuracy is exact-match (all labels right); balanced accuracy, kappa and ROC-AUC are
    macro averages over the labels that have both positives and negatives.
    """
    y = y_true.astype(int)
    y_pred = (probs >= threshold).astype(int)
    present = [k for k in range(y.shape[1]) if 0 < y[:, k].sum() < len(y)]

    def macro(score) -> float:
        return float(np.mean([score(k) for k in present])) if present else float("nan")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "accuracy": float(skm.accuracy_score(y, y_pred)),
            "balanced_accuracy": macro(
                lambda k: skm.balanced_accuracy_score(y[:, k], y_pred[:, k])
            ),
            "f1_macro": float(skm.f1_score(y, y_pred, average="macro", zero_division=0)),
            "precision_macro": float(
                skm.precision_score(y, y_pred, average="macro", zero_division=0)
            ),
            "recall_macro": float(skm.recall_score(y, y_pred, average="macro", zero_division=0)),
            "kappa": macro(lambda k: skm.cohen_kappa_score(y[:, k], y_pred[:, k])),
            "roc_auc": macro(lambda k: skm.roc_auc_score(y[:, k], probs[:, k])),
        }


def per_class(y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict[str, dict]:
    """Precision, recall, F1, support and one-vs-rest AUC for each class."""
    y_pred = probs.argmax(axis=1)
    p, r, f, s = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=np.arange(len(classes)), zero_division=0
    )
    table = {}
    for k, name in enumerate(classes):
        positives = y_true == k
        auc = (
            float(skm.roc_auc_score(positives, probs[:, k]))
            if 0 < positives.sum() < len(y_true)
            else float("nan")
        )
        table[name] = {
            "precision": float(p[k]),
            "recall": float(r[k]),
            "f1": float(f[k]),
            "support": int(s[k]),
            "roc_auc": auc,
        }
    return table


def bootstrap_ci(
    y_true: np.ndarray,
    probs: np.ndarray,
    n_resamples: int,
    seed: int,
    keys: tuple[str, ...] = SUMMARY_KEYS,
) -> dict[str, list[float]]:
    """Percentile 95% intervals of `keys` over resamples of the test images (with replacement)."""
    rng = np.random.default_rng(seed)
    n = len(y_true)
    draws: dict[str, list[float]] = {k: [] for k in keys}
    for _ in tqdm(range(n_resamples), desc="bootstrap", leave=False, mininterval=1):
        idx = rng.integers(0, n, n)
        values = summarize(y_true[idx], probs[idx])
        for k in keys:
            draws[k].append(values[k])
    return {
        k: np.nanpercentile(v, [2.5, 97.5]).round(4).tolist()
        for k, v in draws.items()
        if not np.all(np.isnan(v))
    }
