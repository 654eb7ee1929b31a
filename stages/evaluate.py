"""evaluate stage: test-set metrics with bootstrap CIs, calibration, operating threshold,
per-group and per-class tables with CIs, confusion/ROC/PR/reliability series and deployment
figures."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import precision_recall_curve, roc_curve

from stages.lib import metric_registry, metrics, paths, shift, statistics
from stages.lib.checkpoint import ModelMeta
from stages.lib.inference import (
    LoadedModel,
    ScoredSplit,
    count_parameters,
    load_model,
    measure_latency,
    score_split,
)
from stages.lib.io import (
    atomic_dir,
    safe_name,
    write_csv,
    write_result,
)
from stages.lib.labels import call_positive
from stages.lib.params import EvaluateParams

# metrics/evaluate.json: these facts of the run and the registry's headline metrics; the
# rest (precision/recall, Brier, CIs, per class and group, threshold, deployment figures)
# goes to metrics/detail/evaluate.json
HEADLINE_FACTS = ("n_test", "ci_unit", "positive_class", "shift_flags")


def headline() -> tuple[str, ...]:
    """The keys of metrics/evaluate.json (its order is the order the result was computed)."""
    return (*HEADLINE_FACTS, *metric_registry.headline_keys())


def _rounded(values: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in values.items()}


def evaluate_probs(
    y: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    params: EvaluateParams,
    multilabel: bool = False,
    patients: np.ndarray | None = None,
) -> dict:
    """Headline, per-class, calibration and CI figures from labels and probabilities.

    `y` is (N,) class indices, or (N, K) multi-hot when `multilabel`. Intervals resample
    `patients` (all images of a drawn patient) when several images share a patient id:
    images of one patient are correlated, so resampling images would understate the
    uncertainty. `ci_unit` says which unit was resampled.
    """
    summary = metrics.summarize_multilabel if multilabel else metrics.summarize
    per_class = metrics.per_label if multilabel else metrics.per_class
    result = _rounded(summary(y, probs))
    result["n_test"] = len(y)
    result["per_class"] = {
        name: _rounded(row) for name, row in per_class(y, probs, classes).items()
    }
    result["ece"] = round(
        metrics.expected_calibration_error(y, probs, params.calibration_bins, multilabel), 4
    )
    result["brier"] = round(metrics.brier_score(y, probs, multilabel), 4)
    if params.bootstrap:
        groups = statistics.patient_groups(patients)
        result["ci_unit"] = statistics.resampling_unit(groups)
        result["ci"] = intervals(y, probs, groups, params, multilabel)
        for name, ci in class_intervals(y, probs, classes, groups, params, multilabel).items():
            result["per_class"][name]["ci"] = ci
    return result


def intervals(
    y: np.ndarray,
    probs: np.ndarray,
    groups: np.ndarray | None,
    params: EvaluateParams,
    multilabel: bool,
    keys: tuple[str, ...] | None = None,
) -> dict[str, list[float]]:
    """95% intervals of the headline metrics: vectorised for single-label tasks, one
    summary per resample for multi-label ones."""
    n, seed = params.bootstrap, params.seed
    keys = keys or metric_registry.interval_keys(multilabel)
    if multilabel:
        summary = metrics.summarize_multilabel
        return statistics.bootstrap_ci(y, probs, n, seed, keys, summary, groups)
    return statistics.bootstrap_metrics(y, probs, groups, n, seed, keys)


def class_intervals(
    y: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    groups: np.ndarray | None,
    params: EvaluateParams,
    multilabel: bool,
) -> dict[str, dict[str, list[float]]]:
    """Per class 95% intervals of precision, recall and F1."""
    n, seed = params.bootstrap, params.seed
    if multilabel:
        return statistics.class_bootstrap_ci(y, probs, classes, n, seed, True, groups)
    per_class = statistics.class_intervals(y, probs, groups, n, seed)
    return dict(zip(classes, per_class, strict=True))


def threshold_report(
    y_val: np.ndarray,
    p_val: np.ndarray,
    y_test: np.ndarray,
    p_test: np.ndarray,
    params: EvaluateParams,
    positive: str = "",
) -> dict:
    """Binary tasks: threshold on P(positive) chosen on validation, test metrics at 0.5 and
    at it. `y_*` are 1 for the positive class, `p_*` its probabilities; `positive` names it.

    A validation split without both classes keeps 0.5 (noted in the report as `fallback`).
    """
    report: dict = {"positive_class": positive, "method": params.threshold_method}
    try:
        chosen = metrics.choose_threshold(
            y_val, p_val, params.threshold_method, params.target_sensitivity
        )
    except ValueError as exc:
        chosen, report["fallback"] = 0.5, str(exc)
    # reported with 4 decimals and applied as reported; rounded down, so the images the
    # method called positive stay positive (a sensitivity target stays met)
    chosen = math.floor(chosen * 1e4) / 1e4
    val = metrics.binary_at_threshold(y_val, p_val, chosen)
    return {
        **report,
        "value": round(chosen, 4),
        "val_sensitivity": round(val["sensitivity"], 4),
        "val_specificity": round(val["specificity"], 4),
        "at_default": _rounded(metrics.binary_at_threshold(y_test, p_test, 0.5)),
        "at_chosen": _rounded(metrics.binary_at_threshold(y_test, p_test, chosen)),
    }


def group_metrics(
    y: np.ndarray,
    probs: np.ndarray,
    groups: pd.Series,
    multilabel: bool = False,
    params: EvaluateParams | None = None,
    patients: np.ndarray | None = None,
) -> dict[str, dict]:
    """Every headline metric per value of the manifest's `group` column (empty values
    skipped), each with its 95% interval when `params.bootstrap` > 0, resampling patients
    within the group (the interval of that group's figure)."""
    summary = metrics.summarize_multilabel if multilabel else metrics.summarize
    keys = metric_registry.interval_keys(multilabel)
    table = {}
    for name in sorted(set(groups) - {""}):
        rows = (groups == name).to_numpy()
        values = summary(y[rows], probs[rows])
        table[str(name)] = {"n": int(rows.sum()), **_rounded({k: values[k] for k in keys})}
        if params is not None and params.bootstrap:
            members = statistics.patient_groups(None if patients is None else patients[rows])
            ci = intervals(y[rows], probs[rows], members, params, multilabel, keys)
            table[str(name)]["ci"] = ci
    return table


def _positives(y: np.ndarray, k: int, multilabel: bool) -> np.ndarray:
    return y[:, k] == 1 if multilabel else y == k


def curve_tables(
    y: np.ndarray, probs: np.ndarray, classes: list[str], multilabel: bool = False
) -> tuple[dict[str, pd.DataFrame], dict[str, pd.DataFrame]]:
    """One-vs-rest ROC (fpr, tpr, threshold) and PR (recall, precision, threshold) per class
    that has positives and negatives in the test set."""
    roc, pr = {}, {}
    for k, name in enumerate(classes):
        positives = _positives(y, k, multilabel)
        if not 0 < positives.sum() < len(positives):
            continue
        fpr, tpr, thr = roc_curve(positives, probs[:, k])
        roc[name] = pd.DataFrame(
            {"fpr": fpr.round(5), "tpr": tpr.round(5), "threshold": np.clip(thr, 0, 1).round(5)}
        )
        precision, recall, thr = precision_recall_curve(positives, probs[:, k])
        pr[name] = pd.DataFrame(
            {
                "recall": recall.round(5),
                "precision": precision.round(5),
                "threshold": np.append(thr, 1.0).round(5),  # last point has no threshold
            }
        )
    return roc, pr


def confusion_pairs(
    y: np.ndarray, pred: np.ndarray, classes: list[str], multilabel: bool = False
) -> pd.DataFrame:
    """(actual, predicted) rows for `dvc plots`; multi-label: one row per image and label."""
    names = np.array(classes)
    if not multilabel:
        return pd.DataFrame({"actual": names[y], "predicted": names[pred]})

    def side(present: np.ndarray, k: int) -> np.ndarray:
        return np.where(present == 1, names[k], f"no {names[k]}")

    k_idx = range(len(classes))
    return pd.DataFrame(
        {
            "actual": np.concatenate([side(y[:, k], k) for k in k_idx]),
            "predicted": np.concatenate([side(pred[:, k], k) for k in k_idx]),
        }
    )


def normalized_confusion(pairs: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """Long table (actual, predicted, count, share): share = count / images of that actual."""
    counts = pd.crosstab(pairs["actual"], pairs["predicted"])
    counts = counts.reindex(index=order, columns=order, fill_value=0)
    shares = counts.div(counts.sum(axis=1).replace(0, 1), axis=0)
    long = counts.stack().rename("count").to_frame()
    long["share"] = shares.stack().round(4)
    return long.rename_axis(["actual", "predicted"]).reset_index()


def patient_ids(frame: pd.DataFrame) -> np.ndarray | None:
    return frame["patient_id"].astype(str).to_numpy() if "patient_id" in frame else None


def deployment_figures(model: LoadedModel, model_file: Path, runs: int) -> dict:
    """Parameters, checkpoint size and batch-1 latency on the device used."""
    device = model.device
    figures = {
        "params_millions": round(count_parameters(model.net) / 1e6, 3),
        "model_size_mb": round(model_file.stat().st_size / 1e6, 2),
    }
    if runs:
        figures["latency_ms"] = round(measure_latency(model.net, model.meta, device, runs), 3)
        figures["latency_device"] = (
            f"{device.type} ({torch.get_num_threads()} threads)"
            if device.type == "cpu"
            else device.type
        )
    return figures


def write_plots(
    out: Path,
    test: ScoredSplit,
    meta: ModelMeta,
    params: EvaluateParams,
    threshold: float | None = None,
) -> None:
    """The plots folder: confusion tables, predictions, ROC/PR curves, calibration."""
    frame, y, probs = test.frame, test.y, test.probs
    classes, multilabel, positive = meta.classes, meta.multilabel, meta.positive_index
    names = np.array(classes)
    pred = (probs >= 0.5).astype(int) if multilabel else probs.argmax(axis=1)
    pairs = confusion_pairs(y, pred, classes, multilabel)
    write_csv(out / paths.CONFUSION_NAME, pairs)
    order = [v for c in classes for v in (c, f"no {c}")] if multilabel else classes
    write_csv(out / paths.CONFUSION_NORMALIZED_NAME, normalized_confusion(pairs, order))
    columns = {f"prob_{c}": probs[:, k].round(6) for k, c in enumerate(classes)}
    keep = [c for c in ("image", "patient_id", "group") if c in frame]
    if multilabel:
        predicted = ["|".join(names[row == 1]) for row in pred]
        correct = (pred == y).all(axis=1)
    else:
        predicted, correct = names[pred], pred == y
    table = frame[keep].assign(label=frame["label"], predicted=predicted, correct=correct)
    if threshold is not None and positive is not None:
        table["predicted_at_threshold"] = call_positive(probs, classes, positive, threshold)
    write_csv(out / paths.PREDICTIONS_NAME, table.assign(**columns))
    roc, pr = curve_tables(y, probs, classes, multilabel)
    for name in roc:
        for kind, curve in zip(paths.CURVE_KINDS, (roc, pr), strict=True):
            write_csv(paths.curve_file(out, kind, safe_name(name)), curve[name])
    write_csv(
        out / paths.CALIBRATION_NAME,
        metrics.reliability_table(y, probs, params.calibration_bins, multilabel).round(5),
    )


def run(
    params: EvaluateParams,
    processed_dir: Path = paths.PROCESSED,
    model_file: Path = paths.MODEL,
    metrics_file: Path = paths.EVALUATE_METRICS,
    plots_dir: Path = paths.EVALUATE_PLOTS,
) -> str:
    start = time.perf_counter()
    model = load_model(model_file)
    classes, multilabel = model.meta.classes, model.meta.multilabel
    test = score_split(model, processed_dir, "test", params.batch_size, params.tta)
    frame, y, probs = test.frame, test.y, test.probs
    patients = patient_ids(frame)
    result = evaluate_probs(y, probs, classes, params, multilabel, patients)
    result["tta"] = params.tta
    threshold, pos = None, model.meta.positive_index
    val = (
        None
        if multilabel
        else score_split(model, processed_dir, "val", params.batch_size, params.tta)
    )
    shift_table = None
    if val is not None and params.bootstrap:
        shift_table = shift.compare_splits(
            (val.y, val.probs, patient_ids(val.frame)),
            (y, probs, patients),
            classes,
            params.bootstrap,
            params.seed,
            params.calibration_bins,
        )
        result["shift"] = shift.summarize_shift(shift_table)
        result["shift_flags"] = result["shift"]["flagged"]
    if pos is not None:
        positive = classes[pos]
        result["positive_class"] = positive
        result["threshold"] = threshold_report(
            val.y == pos, val.probs[:, pos], y == pos, probs[:, pos], params, positive
        )
        threshold = result["threshold"]["value"]
        at = result["threshold"]["at_chosen"]  # the operating point, chosen on validation
        result.update(sensitivity=at["sensitivity"], specificity=at["specificity"])
    if "group" in frame and (frame["group"].astype(str) != "").any():
        result["per_group"] = group_metrics(
            y, probs, frame["group"].astype(str), multilabel, params, patients
        )
    result.update(deployment_figures(model, model_file, params.latency_runs))
    with atomic_dir(plots_dir) as tmp:
        write_plots(tmp, test, model.meta, params, threshold)
        if shift_table is not None:
            write_csv(tmp / paths.SHIFT_NAME, shift_table.astype({"val_ci": str, "test_ci": str}))
    write_result(metrics_file, result, headline())
    ci = result.get("ci", {}).get("accuracy")
    ci_text = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
    kappa = "" if multilabel else f"kappa {result['kappa']:.3f}, "
    extra = ""
    if threshold is not None:
        extra = (
            f", positive {classes[pos]}: threshold {threshold:.3f}, sensitivity "
            f"{result['sensitivity']:.3f}, specificity {result['specificity']:.3f}"
        )
    latency = f", {result['latency_ms']:.1f} ms/image" if "latency_ms" in result else ""
    if shift_table is not None:
        latency += f"; {shift.headline_text(shift_table)}"
    return (
        f"evaluate: {len(y):,} test images: accuracy {result['accuracy']:.3f}{ci_text}, "
        f"balanced {result['balanced_accuracy']:.3f}, F1 {result['f1_macro']:.3f}, {kappa}"
        f"AUC {result['roc_auc']:.3f}, ECE {result['ece']:.3f}{extra}{latency} "
        f"in {time.perf_counter() - start:.1f} s"
    )
