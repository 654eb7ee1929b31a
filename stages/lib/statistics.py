"""Honest comparisons: patient-level bootstrap intervals, paired differences, DeLong, McNemar.

Images of one patient are correlated, so resampling images understates the uncertainty of
a test-set metric. Here a resample draws *patients* with replacement and keeps all their
images; it is written as a matrix of multiplicities `counts` (R resamples, N images), and
every metric is computed for all resamples at once from weighted confusion matrices and
weighted Mann-Whitney statistics, instead of one scikit-learn call per resample. The
weighted metrics equal `stages.lib.metrics.summarize` on the repeated images
(tests/test_statistics.py checks it against scikit-learn). A registered metric without a
weighted form here is computed on the repeated images (slower, same figures).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import numpy as np
from scipy import stats
from sklearn import metrics as skm
from tqdm import tqdm

from stages.lib import metric_registry, metrics
from stages.lib.metrics import CLASS_CI_KEYS, summarize

CHUNK_RESAMPLES = 250  # resamples per block: bounds memory at ~CHUNK * N * 8 bytes per array


# --- resampling ---------------------------------------------------------------------------


def resampling_unit(groups: np.ndarray | None) -> str:
    """What a bootstrap resample draws: "patient" when patient ids are given, else "image"."""
    return "image" if groups is None else "patient"


def cluster_codes(groups: np.ndarray | None, n: int) -> tuple[np.ndarray, int]:
    """Cluster index (0..G-1) of each of n images, and G.

    With no groups, or one image per group, every image is its own cluster in image order,
    so the patient bootstrap then draws exactly what the image bootstrap draws.
    """
    if n < 1:
        raise ValueError(f"cannot resample {n} images; need at least one")
    if groups is None:
        return np.arange(n), n
    groups = np.asarray(groups)
    if groups.shape != (n,):
        raise ValueError(f"groups has shape {groups.shape}; expected ({n},), one id per image")
    _, codes = np.unique(groups, return_inverse=True)
    n_clusters = int(codes.max()) + 1
    if n_clusters == n:
        return np.arange(n), n
    return codes.reshape(-1), n_clusters


def cluster_bootstrap_counts(
    groups: np.ndarray | None, n: int, n_resamples: int, seed: int
) -> np.ndarray:
    """Multiplicity of each image in each cluster-bootstrap resample: int32 (R, N).

    Each resample draws G clusters (patients) with replacement out of G and keeps every
    image of a drawn cluster, as often as the cluster was drawn. Without groups (or with
    one image per group) this is the ordinary image bootstrap.
    """
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    codes, n_clusters = cluster_codes(groups, n)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_clusters, size=(n_resamples, n_clusters))  # (R, G)
    # one bincount for all resamples: resample r's clusters live at r * G .. r * G + G - 1
    flat = (draws + np.arange(n_resamples)[:, None] * n_clusters).reshape(-1)
    per_cluster = np.bincount(flat, minlength=n_resamples * n_clusters)
    per_cluster = per_cluster.reshape(n_resamples, n_clusters).astype(np.int32)
    return per_cluster[:, codes]


# --- metrics of weighted samples (all resamples at once) ----------------------------------


def confusion_matrices(
    y_true: np.ndarray, y_pred: np.ndarray, weights: np.ndarray, n_classes: int
) -> np.ndarray:
    """Weighted confusion matrices (R, K, K), rows true and columns predicted classes."""
    cells = y_true * n_classes + y_pred
    one_hot = np.zeros((len(cells), n_classes * n_classes))
    one_hot[np.arange(len(cells)), cells] = 1.0
    return (weights @ one_hot).reshape(-1, n_classes, n_classes)  # one matrix product


def _divide(numerator: np.ndarray, denominator: np.ndarray, empty: float) -> np.ndarray:
    """numerator / denominator, `empty` where the denominator is 0 (no warning)."""
    defined = denominator > 0
    return np.where(defined, numerator / np.where(defined, denominator, 1.0), empty)


def accuracy(confusion: np.ndarray) -> np.ndarray:
    """Share of correct images per confusion matrix (R, K, K) -> (R,)."""
    return np.trace(confusion, axis1=1, axis2=2) / confusion.sum(axis=(1, 2))


def balanced_accuracy(confusion: np.ndarray) -> np.ndarray:
    """Mean recall over the classes present in y_true (scikit-learn's definition)."""
    support = confusion.sum(axis=2)
    recall = _divide(np.diagonal(confusion, axis1=1, axis2=2), support, 0.0)
    return recall.sum(axis=1) / (support > 0).sum(axis=1)


def f1_macro(confusion: np.ndarray) -> np.ndarray:
    """Mean F1 over all K classes; 0 for a class neither true nor predicted (zero_division=0)."""
    tp = np.diagonal(confusion, axis1=1, axis2=2)
    errors = confusion.sum(axis=2) + confusion.sum(axis=1) - 2 * tp  # fn + fp
    return _divide(2 * tp, 2 * tp + errors, 0.0).mean(axis=1)


def kappa(confusion: np.ndarray) -> np.ndarray:
    """Cohen's kappa; NaN when chance agreement is total (scikit-learn's undefined case)."""
    n = confusion.sum(axis=(1, 2))
    agree = np.trace(confusion, axis1=1, axis2=2)
    chance = (confusion.sum(axis=1) * confusion.sum(axis=2)).sum(axis=1)
    # 1 - (1 - p_o) / (1 - p_e), multiplied through by n^2 so integer counts stay exact
    return 1.0 - _divide(n * (n - agree), n * n - chance, np.nan)


def weighted_auc(positive: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC of one score for each weight vector (R, N) -> (R,), ties counting one half.

    The weighted Mann-Whitney statistic: the share of (positive, negative) weight pairs
    ordered correctly. NaN where a resample holds no positive or no negative weight.
    """
    order = np.argsort(scores, kind="stable")
    ranked = scores[order]
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])  # one per tied level
    w = weights[:, order]
    pos = np.add.reduceat(w * positive[order], starts, axis=1)  # (R, levels)
    neg = np.add.reduceat(w, starts, axis=1) - pos
    below = np.cumsum(neg, axis=1) - neg  # negative weight strictly below each level
    pairs = (pos * (below + 0.5 * neg)).sum(axis=1)
    return _divide(pairs, pos.sum(axis=1) * neg.sum(axis=1), np.nan)


def roc_auc(y_true: np.ndarray, probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Binary AUC (class 1), or macro one-vs-rest AUC; NaN where a class is absent."""
    if probs.shape[1] == 2:
        return weighted_auc(y_true == 1, probs[:, 1], weights)
    per_class = [weighted_auc(y_true == k, probs[:, k], weights) for k in range(probs.shape[1])]
    return np.mean(per_class, axis=0)  # NaN propagates, as in metrics.roc_auc


# the metrics with a weighted form (the fast path); any other figure of `metrics.summarize`
# is computed on the repeated images
CONFUSION_METRICS = {
    "accuracy": accuracy,
    "balanced_accuracy": balanced_accuracy,
    "f1_macro": f1_macro,
    "kappa": kappa,
}


def _metric_keys(keys: tuple[str, ...] | None) -> tuple[str, ...]:
    """`keys`, or by default the metrics the registry gives a single-label interval."""
    return metric_registry.interval_keys(multilabel=False) if keys is None else tuple(keys)


def summarize_weighted(
    y_true: np.ndarray,
    probs: np.ndarray,
    weights: np.ndarray,
    keys: tuple[str, ...] | None = None,
) -> dict[str, np.ndarray]:
    """`metrics.summarize` of each weighted sample: {key: (R,)} for weights (R, N).

    Integer weights are multiplicities: the result equals `summarize` on the images
    repeated that often. `keys` default to the registry's single-label interval metrics.
    """
    keys = _metric_keys(keys)
    unknown = sorted(set(keys) - set(metrics.SINGLE_LABEL))
    if unknown:
        raise ValueError(f"unknown metric keys {unknown}; choose from {list(metrics.SINGLE_LABEL)}")
    weights = np.atleast_2d(weights).astype(np.float64)
    values = {}
    if set(keys) & set(CONFUSION_METRICS):
        n_classes = probs.shape[1]
        confusion = confusion_matrices(y_true, probs.argmax(axis=1), weights, n_classes)
        values = {k: f(confusion) for k, f in CONFUSION_METRICS.items() if k in keys}
    if "roc_auc" in keys:
        values["roc_auc"] = roc_auc(y_true, probs, weights)
    for key in keys:
        if key not in values:
            values[key] = repeated_metric(key, y_true, probs, weights)
    return {k: values[k] for k in keys}


def repeated_metric(
    key: str, y_true: np.ndarray, probs: np.ndarray, weights: np.ndarray
) -> np.ndarray:
    """`metrics.summarize`'s `key` for each weight vector (R, N) -> (R,), on the images
    repeated as often as their weight: the slow path of a metric with no weighted form."""
    counts = weights.astype(np.int64)
    if not np.array_equal(counts, weights):
        raise ValueError(f"{key} has no weighted form here: its weights must be whole counts")
    order = np.arange(len(y_true))
    values = []
    for row in counts:
        idx = np.repeat(order, row)
        values.append(summarize(y_true[idx], probs[idx], (key,))[key])
    return np.asarray(values, dtype=np.float64)


# --- bootstrap intervals ------------------------------------------------------------------


def check_labels(y_true: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Integer labels (N,) matching probabilities (N, K >= 2); raises naming the mismatch."""
    y_true = np.asarray(y_true)
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ValueError(f"probs has shape {probs.shape}; expected (N, K) with K >= 2 classes")
    if y_true.shape != (probs.shape[0],):
        raise ValueError(f"y_true has shape {y_true.shape}; expected ({probs.shape[0]},)")
    if len(y_true) and (y_true.min() < 0 or y_true.max() >= probs.shape[1]):
        bad = y_true[(y_true < 0) | (y_true >= probs.shape[1])][0]
        raise ValueError(f"label {bad} is outside 0..{probs.shape[1] - 1}")
    return y_true.astype(np.int64)


def resampled_metrics(
    y_true: np.ndarray, probs: np.ndarray, counts: np.ndarray, keys: tuple[str, ...]
) -> dict[str, np.ndarray]:
    """`summarize_weighted` over blocks of resamples, so memory stays bounded for large N."""
    blocks = [
        summarize_weighted(y_true, probs, counts[start : start + CHUNK_RESAMPLES], keys)
        for start in range(0, len(counts), CHUNK_RESAMPLES)
    ]
    return {k: np.concatenate([b[k] for b in blocks]) for k in keys}


def percentile_interval(values: np.ndarray, level: float = 0.95) -> list[float] | None:
    """Percentile interval [lo, hi] (95% by default) over the defined (non-NaN) values;
    None if none."""
    defined = values[~np.isnan(values)]
    if not len(defined):
        return None
    tail = 50 * (1 - level)
    return np.percentile(defined, [tail, 100 - tail]).round(4).tolist()


def patient_groups(patient_ids: np.ndarray | None) -> np.ndarray | None:
    """Patient ids to resample by, or None when there is nothing to cluster (no ids, or one
    image per patient): the bootstrap is then the image bootstrap, and says so."""
    if patient_ids is None:
        return None
    ids = np.asarray(patient_ids)
    return ids if len(np.unique(ids)) < len(ids) else None


def class_intervals(
    y_true: np.ndarray,
    probs: np.ndarray,
    groups: np.ndarray | None,
    n_resamples: int,
    seed: int,
) -> list[dict[str, list[float]]]:
    """Per class (in column order) 95% intervals of precision, recall and F1 over patient
    resamples, from the resamples' confusion matrices (no loop per resample)."""
    y_true = check_labels(y_true, probs)
    n_classes = probs.shape[1]
    counts = cluster_bootstrap_counts(groups, len(y_true), n_resamples, seed)
    pred = probs.argmax(axis=1)
    draws: dict[str, list[np.ndarray]] = {k: [] for k in CLASS_CI_KEYS}
    for start in range(0, len(counts), CHUNK_RESAMPLES):
        confusion = confusion_matrices(
            y_true, pred, counts[start : start + CHUNK_RESAMPLES], n_classes
        )
        tp = np.diagonal(confusion, axis1=1, axis2=2)  # (R, K)
        true, predicted = confusion.sum(axis=2), confusion.sum(axis=1)
        draws["precision"].append(_divide(tp, predicted, 0.0))  # zero_division=0, as sklearn
        draws["recall"].append(_divide(tp, true, 0.0))
        draws["f1"].append(_divide(2 * tp, true + predicted, 0.0))
    stacked = {k: np.concatenate(v) for k, v in draws.items()}
    intervals = []
    for k in range(n_classes):
        cells = {m: percentile_interval(stacked[m][:, k]) for m in CLASS_CI_KEYS}
        intervals.append({m: ci for m, ci in cells.items() if ci is not None})
    return intervals


def bootstrap_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    groups: np.ndarray | None,
    n_resamples: int,
    seed: int,
    keys: tuple[str, ...] | None = None,
) -> dict[str, list[float]]:
    """Percentile 95% intervals {key: [lo, hi]} over patient (cluster) bootstrap resamples.

    Args:
        y_true: labels (N,), integers in 0..K-1.
        probs: class probabilities (N, K).
        groups: patient id of each image (N,), or None to resample images.
            `resampling_unit(groups)` names the unit for a report.
        n_resamples: number of bootstrap resamples.
        seed: seed of the resampling; the same seed gives the same intervals.
        keys: figures of `metrics.summarize`; default: the registry's single-label interval
            metrics. A key undefined in every resample (e.g. AUC with a class absent from
            the test set) is left out, as in `bootstrap_ci`.
    """
    y_true = check_labels(y_true, probs)
    keys = _metric_keys(keys)
    counts = cluster_bootstrap_counts(groups, len(y_true), n_resamples, seed)
    draws = resampled_metrics(y_true, probs, counts, keys)
    intervals = {k: percentile_interval(v) for k, v in draws.items()}
    return {k: ci for k, ci in intervals.items() if ci is not None}


def paired_bootstrap_difference(
    y_true: np.ndarray,
    probs_base: np.ndarray,
    probs_head: np.ndarray,
    groups: np.ndarray | None,
    n_resamples: int,
    seed: int,
    keys: tuple[str, ...] | None = None,
    level: float = 0.95,
) -> dict[str, dict]:
    """Head minus base on the same test images, with a paired 95% interval per metric.

    Both runs are scored on the *same* resamples (patients when `groups` is given), so the
    interval reflects the difference only, not two independent sampling errors. Returns
    {key: {"base", "head", "difference", "ci": [lo, hi]}}; a key whose difference is
    undefined in every resample is left out.
    """
    result = {}
    found = paired_bootstrap_draws(
        y_true, [probs_base], [probs_head], groups, n_resamples, seed, keys
    )
    for k, (base, head, draws) in found.items():
        ci = percentile_interval(draws, level)
        if ci is not None:
            b, h = float(base[0]), float(head[0])
            result[k] = {"base": round(b, 4), "head": round(h, 4), "difference": round(h - b, 4)}
            result[k]["ci"] = ci
    return result


def paired_bootstrap_draws(
    y_true: np.ndarray,
    base_members: list[np.ndarray],
    head_members: list[np.ndarray],
    groups: np.ndarray | None,
    n_resamples: int,
    seed: int,
    keys: tuple[str, ...] | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Several trainings a side (seeds), scored on the same test images and resamples.

    Returns {key: (base values, head values, draws)}: each training's figure on the whole
    test set, and per resample the head trainings' mean minus the base trainings' mean
    (NaN where undefined). With one training a side the draws are the paired difference.
    """
    shapes = {p.shape for p in [*base_members, *head_members]}
    if len(shapes) != 1:
        raise ValueError(f"the trainings' probabilities differ in shape: {sorted(shapes)}")
    y_true = check_labels(y_true, base_members[0])
    keys = _metric_keys(keys)
    whole = np.ones((1, len(y_true)))
    counts = cluster_bootstrap_counts(groups, len(y_true), n_resamples, seed)
    values, means = {}, {}
    for side, members in (("base", base_members), ("head", head_members)):
        full = [summarize_weighted(y_true, p, whole, keys) for p in members]
        draws = [resampled_metrics(y_true, p, counts, keys) for p in members]
        values[side] = {k: np.array([float(f[k][0]) for f in full]) for k in keys}
        means[side] = {k: np.mean([d[k] for d in draws], axis=0) for k in keys}
    return {
        k: (values["base"][k], values["head"][k], means["head"][k] - means["base"][k]) for k in keys
    }


# --- tests of two correlated classifiers --------------------------------------------------


class DeLongResult(NamedTuple):
    auc_a: float
    auc_b: float
    z: float
    p_value: float


class McNemarResult(NamedTuple):
    b: int  # a right, b wrong
    c: int  # a wrong, b right
    p_value: float


def binary_labels(y_true: np.ndarray) -> np.ndarray:
    """Boolean positives from 0/1 or bool labels; needs two positives and two negatives."""
    y_true = np.asarray(y_true)
    values = set(np.unique(y_true).tolist())
    if not values <= {0, 1}:
        raise ValueError(f"binary labels must be 0/1 or bool, got values {sorted(values)}")
    positive = y_true == 1
    if min(positive.sum(), (~positive).sum()) < 2:
        raise ValueError(
            f"DeLong needs at least two positives and two negatives, got "
            f"{int(positive.sum())} and {int((~positive).sum())}"
        )
    return positive


def delong_covariance(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUCs (M,) of M scores (M, N) and DeLong's covariance matrix of them (M, M).

    The fast midrank algorithm of Sun & Xu (2014), O(N log N): the structural components
    (placement values) of DeLong et al. (1988) are differences of midranks.
    """
    positive = binary_labels(y_true)
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    if scores.shape[1] != len(positive):
        raise ValueError(f"scores have shape {scores.shape}; expected (M, {len(positive)})")
    x, y = scores[:, positive], scores[:, ~positive]  # (M, m) positives, (M, n) negatives
    m, n = x.shape[1], y.shape[1]
    rank_x = stats.rankdata(x, axis=1)
    rank_y = stats.rankdata(y, axis=1)
    rank_all = stats.rankdata(np.hstack([x, y]), axis=1)
    aucs = (rank_all[:, :m].sum(axis=1) / m - (m + 1) / 2) / n
    v10 = (rank_all[:, :m] - rank_x) / n  # per positive: share of negatives below it
    v01 = 1.0 - (rank_all[:, m:] - rank_y) / m  # per negative: share of positives above it
    cov = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return aucs, cov


def delong_test(y_true: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray) -> DeLongResult:
    """DeLong's two-sided test that two correlated ROC AUCs (same images) are equal."""
    aucs, cov = delong_covariance(y_true, np.vstack([scores_a, scores_b]))
    difference = aucs[0] - aucs[1]
    variance = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    if variance <= 0:  # identical rankings or both perfect: no spread to test against
        z = 0.0 if difference == 0 else float(np.sign(difference) * np.inf)
    else:
        z = float(difference / np.sqrt(variance))
    p_value = float(2 * stats.norm.sf(abs(z)))
    return DeLongResult(float(aucs[0]), float(aucs[1]), z, p_value)


def delong_test_ovr(
    y_true: np.ndarray, probs_a: np.ndarray, probs_b: np.ndarray
) -> list[DeLongResult]:
    """DeLong's test of each class's one-vs-rest AUC, one result per class."""
    y_true = check_labels(y_true, probs_a)
    if probs_a.shape != probs_b.shape:
        raise ValueError(f"probs_a {probs_a.shape} and probs_b {probs_b.shape} differ")
    return [delong_test(y_true == k, probs_a[:, k], probs_b[:, k]) for k in range(probs_a.shape[1])]


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> McNemarResult:
    """Exact McNemar test: two-sided binomial test of the discordant pairs at 1/2.

    b counts images only run a gets right, c those only run b gets right; with no
    discordant pair the runs cannot be told apart and p = 1.
    """
    correct_a, correct_b = np.asarray(correct_a), np.asarray(correct_b)
    if correct_a.shape != correct_b.shape or correct_a.ndim != 1:
        raise ValueError(
            f"correct_a {correct_a.shape} and correct_b {correct_b.shape} must be equal 1-D"
        )
    if correct_a.dtype != bool or correct_b.dtype != bool:
        raise ValueError(f"expected bool arrays, got {correct_a.dtype} and {correct_b.dtype}")
    b = int((correct_a & ~correct_b).sum())
    c = int((~correct_a & correct_b).sum())
    p_value = 1.0 if b + c == 0 else float(stats.binomtest(b, b + c, 0.5).pvalue)
    return McNemarResult(b, c, p_value)


def bootstrap_ci(
    y_true: np.ndarray,
    probs: np.ndarray,
    n_resamples: int,
    seed: int,
    keys: tuple[str, ...] | None = None,
    summary: Callable[[np.ndarray, np.ndarray], dict[str, float]] = summarize,
    groups: np.ndarray | None = None,
) -> dict[str, list[float]]:
    """Percentile 95% intervals of any `summary` over patient resamples (images when
    `groups` is None), one call per resample: for what has no weighted form here
    (multi-label figures). Single-label headline figures: `bootstrap_metrics` (vectorised).
    `keys` default to the registry's single-label interval metrics."""
    keys = _metric_keys(keys)
    counts = cluster_bootstrap_counts(groups, len(y_true), n_resamples, seed)
    order = np.arange(len(y_true))
    draws: dict[str, list[float]] = {k: [] for k in keys}
    for row in tqdm(counts, desc="bootstrap", leave=False, mininterval=1):
        idx = np.repeat(order, row)
        values = summary(y_true[idx], probs[idx])
        for k in keys:
            draws[k].append(values[k])
    intervals = {k: percentile_interval(np.asarray(v, float)) for k, v in draws.items()}
    return {k: ci for k, ci in intervals.items() if ci is not None}


def class_scores(
    y_true: np.ndarray, probs: np.ndarray, multilabel: bool = False, threshold: float = 0.5
) -> dict[str, float]:
    """Precision, recall and F1 of every class, flat as "<class index>/<metric>".

    The same figures as `per_class` / `per_label`, without the ranking metrics, so that
    `bootstrap_ci` can resample them cheaply.
    """
    if multilabel:
        y_pred, y_true = (probs >= threshold).astype(int), y_true.astype(int)
        labels = None  # multi-hot targets: one binary score per column
    else:
        y_pred, labels = probs.argmax(axis=1), np.arange(probs.shape[1])
    p, r, f, _ = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average=None, zero_division=0
    )
    scores = {}
    for k in range(probs.shape[1]):
        scores |= {f"{k}/precision": p[k], f"{k}/recall": r[k], f"{k}/f1": f[k]}
    return {key: float(v) for key, v in scores.items()}


def class_bootstrap_ci(
    y_true: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    n_resamples: int,
    seed: int,
    multilabel: bool = False,
    groups: np.ndarray | None = None,
) -> dict[str, dict[str, list[float]]]:
    """Per-class 95% intervals of precision, recall and F1: {class: {metric: [lo, hi]}}."""
    keys = tuple(f"{k}/{m}" for k in range(len(classes)) for m in CLASS_CI_KEYS)
    summary = partial(class_scores, multilabel=multilabel)
    ci = bootstrap_ci(y_true, probs, n_resamples, seed, keys, summary, groups)
    return {
        name: {m: ci[f"{k}/{m}"] for m in CLASS_CI_KEYS if f"{k}/{m}" in ci}
        for k, name in enumerate(classes)
    }


def summarize_accuracy(
    y_true: np.ndarray, probs: np.ndarray, multilabel: bool = False, threshold: float = 0.5
) -> dict[str, float]:
    """{"accuracy": share of correct images} (multi-label: exact match); cheap to bootstrap."""
    if multilabel:
        correct = ((probs >= threshold) == (y_true == 1)).all(axis=1)
    else:
        correct = probs.argmax(axis=1) == y_true
    return {"accuracy": float(correct.mean())}
