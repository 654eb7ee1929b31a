"""Validation against test, per class: does the test population behave like the one the
model was chosen on?

A model is selected, and its threshold set, on validation images; a clinical test set often
comes from another time, site or scanner. Here each class's sensitivity, specificity and
calibration error (one-vs-rest ECE of its probability) are computed on both splits, each
with a patient-bootstrap 95% interval, and the difference test - val with an interval from
the two independent bootstraps. A figure is flagged as shifted when that interval excludes
0 at a family-wise level: Bonferroni over all the figures compared, so an unshifted test set
raises a false flag in at most 5% of evaluations, not in one of every 20 figures.

A bootstrap interval collapses at 0 and 1: a validation specificity of 1.000 (no false call
among 500 images) resamples to 1.000 every time, and a test value of 0.99 would then look
shifted although 0 of 500 against 8 of 850 is well within chance. So a sensitivity or
specificity is flagged only when Newcombe's score interval for the difference of two
proportions (from Wilson intervals, which stay honest at the ends) excludes 0 as well, at
the same level (`score_ci`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from stages.lib.statistics import (
    CHUNK_RESAMPLES,
    cluster_bootstrap_counts,
    confusion_matrices,
    percentile_interval,
)

FIGURES = ("sensitivity", "specificity", "calibration_error")
FAMILY_LEVEL = 0.95  # chance that no figure of an unshifted test set is flagged


def class_figures(
    y: np.ndarray, probs: np.ndarray, weights: np.ndarray, bins: int
) -> dict[str, np.ndarray]:
    """Per class figures of each weighted sample: {figure: (R, K)} for weights (R, N).

    Decisions are the argmax class; calibration error is the count-weighted mean
    |observed rate - mean probability| of the class over `bins` equal-width bins of its
    probability. A figure without images to define it (no positives, say) is NaN.
    """
    k = probs.shape[1]
    counts = _counts(confusion_matrices(y, probs.argmax(axis=1), weights, k))
    (hits, actual), (true_negatives, negatives) = counts["sensitivity"], counts["specificity"]
    total = actual.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        sensitivity = np.where(actual > 0, hits / actual, np.nan)
        specificity = np.where(negatives > 0, true_negatives / negatives, np.nan)
    calibration = np.empty_like(sensitivity)
    onehot_y = np.eye(k)[y]
    for c in range(k):
        which = np.minimum((probs[:, c] * bins).astype(int), bins - 1)
        in_bin = np.eye(bins)[which]  # (N, bins)
        observed = weights @ (in_bin * onehot_y[:, c : c + 1])
        expected = weights @ (in_bin * probs[:, c : c + 1])
        calibration[:, c] = np.abs(observed - expected).sum(axis=1) / total
    return {
        "sensitivity": sensitivity,
        "specificity": specificity,
        "calibration_error": calibration,
    }


def _counts(confusion: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per class (successes, trials) of sensitivity and specificity, each (R, K), from
    confusion matrices (R, K, K) with true classes in rows."""
    hits = np.diagonal(confusion, axis1=1, axis2=2)
    actual, called = confusion.sum(axis=2), confusion.sum(axis=1)
    negatives = confusion.sum(axis=(1, 2))[:, None] - actual
    return {
        "sensitivity": (hits, actual),
        "specificity": (negatives - (called - hits), negatives),
    }


def class_counts(y: np.ndarray, probs: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per class (successes, trials) of sensitivity and specificity: the counts behind them."""
    confusion = confusion_matrices(y, probs.argmax(axis=1), np.ones((1, len(y))), probs.shape[1])
    return {f: (k[0], n[0]) for f, (k, n) in _counts(confusion).items()}


def newcombe_interval(
    val: tuple[float, float], test: tuple[float, float], level: float
) -> list[float] | None:
    """Newcombe's hybrid score interval of test - val for two independent proportions
    (successes, trials), from scipy's Wilson intervals; None when a split has no trials."""
    (k1, n1), (k2, n2) = val, test
    if n1 == 0 or n2 == 0:
        return None
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = stats.binomtest(int(k1), int(n1)).proportion_ci(level, "wilson")
    l2, u2 = stats.binomtest(int(k2), int(n2)).proportion_ci(level, "wilson")
    d = p2 - p1
    lower = d - np.sqrt((p2 - l2) ** 2 + (u1 - p1) ** 2)
    upper = d + np.sqrt((u2 - p2) ** 2 + (p1 - l1) ** 2)
    return [round(float(lower), 4), round(float(upper), 4)]


def resampled_figures(
    y: np.ndarray,
    probs: np.ndarray,
    patients: np.ndarray | None,
    n_resamples: int,
    seed: int,
    bins: int,
) -> dict[str, np.ndarray]:
    """`class_figures` over patient-bootstrap resamples, in blocks (bounded memory)."""
    counts = cluster_bootstrap_counts(patients, len(y), n_resamples, seed)
    blocks = [
        class_figures(y, probs, counts[i : i + CHUNK_RESAMPLES].astype(float), bins)
        for i in range(0, n_resamples, CHUNK_RESAMPLES)
    ]
    return {f: np.concatenate([b[f] for b in blocks]) for f in FIGURES}


def compare_splits(
    val: tuple[np.ndarray, np.ndarray, np.ndarray | None],
    test: tuple[np.ndarray, np.ndarray, np.ndarray | None],
    classes: list[str],
    n_resamples: int = 1000,
    seed: int = 0,
    bins: int = 15,
) -> pd.DataFrame:
    """One row per class and figure: val and test values with 95% intervals, the difference
    test - val with its family-wise interval, and `shift` (that interval excludes 0, and
    for sensitivity and specificity Newcombe's score interval `score_ci` does too).

    `val` and `test` are (labels (N,), probabilities (N, K), patient ids or None).
    """
    point, draws, counts = {}, {}, {}
    for name, (y, probs, patients) in {"val": val, "test": test}.items():
        point[name] = class_figures(y, probs, np.ones((1, len(y))), bins)
        counts[name] = class_counts(y, probs)
        offset = 0 if name == "val" else 1  # independent resamples of the two splits
        draws[name] = resampled_figures(y, probs, patients, n_resamples, seed + offset, bins)
    m = len(FIGURES) * len(classes)
    level = 1 - (1 - FAMILY_LEVEL) / m
    rows = []
    for figure in FIGURES:
        for c, cls in enumerate(classes):
            row: dict = {"class": cls, "figure": figure}
            for name in ("val", "test"):
                row[name] = _round(point[name][figure][0, c])
                row[f"{name}_ci"] = percentile_interval(draws[name][figure][:, c])
            diff = draws["test"][figure][:, c] - draws["val"][figure][:, c]
            row["difference"] = _round(point["test"][figure][0, c] - point["val"][figure][0, c])
            row["difference_ci"] = percentile_interval(diff, level)
            score = None
            if figure in counts["val"]:
                score = newcombe_interval(
                    *((counts[n][figure][0][c], counts[n][figure][1][c]) for n in ("val", "test")),
                    level,
                )  # fmt: skip
            row["score_ci"] = score
            row["shift"] = _excludes_zero(row["difference_ci"]) and (
                figure not in counts["val"] or _excludes_zero(score)
            )
            rows.append(row)
    return pd.DataFrame(rows)


def _excludes_zero(ci: list[float] | None) -> bool:
    return bool(ci is not None and (ci[0] > 0 or ci[1] < 0))


def _round(value: float) -> float | None:
    return None if np.isnan(value) else round(float(value), 4)


def summarize_shift(table: pd.DataFrame) -> dict:
    """The `shift` section of metrics/detail/evaluate.json: flagged count, the level and
    every figure."""
    m = len(table)
    return {
        "flagged": int(table["shift"].sum()),
        "compared": m,
        "family_level": FAMILY_LEVEL,
        "difference_level": round(1 - (1 - FAMILY_LEVEL) / max(m, 1), 5),
        "figures": table.to_dict(orient="records"),
    }


def headline_text(table: pd.DataFrame) -> str:
    """A few words for the stage's summary line: how many figures moved, the largest."""
    flagged = table[table["shift"]]
    if flagged.empty:
        return f"no val/test shift ({len(table)} figures)"
    worst = flagged.loc[flagged["difference"].abs().idxmax()]
    return (
        f"SHIFT in {len(flagged)} of {len(table)} val/test figures (e.g. {worst['class']} "
        f"{worst['figure'].replace('_', ' ')} {worst['val']:.2f} -> {worst['test']:.2f})"
    )
