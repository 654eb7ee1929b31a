"""Result tables and figures shared by the report and other pages: headline and per-class
tables with their intervals, confusion matrices, ROC and precision-recall curves."""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from stages.lib import metric_registry, paths
from stages.lib.page import class_curves, interval


def table_order() -> tuple[str, ...]:
    """Column order of the per-class and per-group tables: counts, the per-class figures,
    the single-label metrics in registry order; others after, as stored."""
    registered = metric_registry.summary_keys(multilabel=False)
    return ("n", "support", "precision", "recall", "f1", *registered, "average_precision")


def metric_table(rows: dict[str, dict], first: str) -> pd.DataFrame:
    """One row per entry of `rows` ({name: {metric: value, ..., "ci": {metric: [lo, hi]}}}),
    each metric that has an interval followed by its "95% CI" column."""
    rank = {key: i for i, key in enumerate(table_order())}
    records = []
    for name, values in rows.items():
        ci = values.get("ci", {})
        record: dict = {first: name}
        for key in sorted(values, key=lambda k: rank.get(k, len(rank))):
            if key == "ci":
                continue
            record[key] = values[key]
            if key in ci:
                record[f"{key} 95% CI"] = interval(ci[key])
        records.append(record)
    frame = pd.DataFrame(records)
    ci_columns = [c for c in frame.columns if c.endswith(" 95% CI")]
    return frame.fillna({c: "" for c in ci_columns})  # a metric without an interval


def headline_table(result: dict) -> pd.DataFrame:
    """One row per figure of the predictions (the registry's summary metrics, in its order):
    value and its 95% interval."""
    ci = result.get("ci", {})
    keys = metric_registry.summary_keys()
    rows = [(k, result[k], *(ci.get(k) or ("", ""))) for k in keys if k in result]
    return pd.DataFrame(rows, columns=["metric", "value", "CI low", "CI high"])


def confusion_figures(confusion: pd.DataFrame, classes: list[str]) -> tuple[go.Figure, go.Figure]:
    """The confusion matrix as counts and as the share of each actual class."""
    seen = set(confusion["actual"]) | set(confusion["predicted"])
    order = [*classes, *sorted(seen - set(classes))]  # multi-label adds "no <label>"
    counts = pd.crosstab(confusion["actual"], confusion["predicted"]).reindex(
        index=order, columns=order, fill_value=0
    )
    shares = counts.div(counts.sum(axis=1).replace(0, 1), axis=0).round(3)
    style = {"x": order, "y": order, "text_auto": True, "color_continuous_scale": "Blues"}
    style["labels"] = {"x": "predicted", "y": "actual"}
    heat = px.imshow(counts.to_numpy(), **style)
    heat.update_layout(title="Confusion matrix", height=380)
    norm = px.imshow(shares.to_numpy(), zmin=0, zmax=1, **style)
    norm.update_layout(title="Confusion matrix, share of each actual class", height=380)
    return heat, norm


def curve_figures(
    plots_dir: Path, classes: list[str], per_class: dict
) -> tuple[go.Figure, go.Figure]:
    """One-vs-rest ROC and precision-recall curves, one trace per class."""
    roc = class_curves(
        plots_dir, "roc", classes, "fpr", "tpr", lambda c: f"AUC {per_class[c]['roc_auc']:.3f}"
    )
    roc.add_scatter(x=[0, 1], y=[0, 1], name="chance", line={"dash": "dot", "color": "#999"})
    roc.update_layout(
        title="ROC (one vs rest)",
        xaxis_title="false positive rate",
        yaxis_title="true positive rate",
        height=380,
    )
    pr = class_curves(
        plots_dir,
        "pr",
        classes,
        "recall",
        "precision",
        lambda c: f"AP {per_class[c].get('average_precision', float('nan')):.3f}",
    )
    pr.update_layout(
        title="Precision-recall (one vs rest)",
        xaxis_title="recall",
        yaxis_title="precision",
        height=380,
    )
    return roc, pr


def no_finding_note(card: dict) -> str:
    """Multi-label data: how many images have no finding, and which label value said so."""
    if "n_no_finding" not in card:
        return ""
    named = card.get("no_finding") or []
    said = (
        f" (labelled {', '.join(html.escape(n) for n in named)}: read as the empty label set, "
        "not as a class)"
        if named
        else ""
    )
    share = card["n_no_finding"] / max(card["n_images"], 1)
    return f"<p>{card['n_no_finding']:,} images ({share:.0%}) have no finding{said}.</p>"


def dropped_note(split: dict) -> str:
    """split.drop_duplicates: the copies of earlier-split images removed from val and test."""
    dropped = split.get("dropped_duplicates")
    if not dropped:
        return ""
    parts = []
    for s in ("val", "test"):
        counts = ", ".join(f"{html.escape(c)} {n:,}" for c, n in dropped[s]["class_counts"].items())
        parts.append(f"{s} {dropped[s]['n_images']:,} ({counts})")
    return (
        f"<p>Near-duplicates dropped: {dropped['n_images']:,} images copied an image of an "
        f"earlier split and were removed: {'; '.join(parts)}. The listed files are in "
        f"<code>{paths.DUPLICATES}</code>.</p>"
    )
