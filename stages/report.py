"""report stage: one self-contained HTML page (Plotly inlined once, images embedded).

Every user-controlled string (class names, paths, params) goes through `html.escape`; the
page loads nothing from the network.
"""

from __future__ import annotations

import hashlib
import html
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import yaml

from stages.lib import metric_registry, paths
from stages.lib.figures import (
    confusion_figures,
    curve_figures,
    dropped_note,
    headline_table,
    metric_table,
    no_finding_note,
)
from stages.lib.io import atomic_path, read_csv, read_json, read_result, safe_name
from stages.lib.page import (
    Page,
    environment,
    git_commit,
    image_tag,
    render,
    table,
)
from stages.lib.params import Params
from stages.lib.pipeline import stage_params

REJECTED_SHOWN = 20  # rows of rejected.csv shown in the data card


def source_line(card: dict) -> str:
    """Where the data came from: dataset.json's source, url, citation and licence (escaped)."""
    fields = (
        ("Source", card.get("source")),
        ("URL", card.get("url")),
        ("Citation", card.get("citation")),
        ("Licence", card.get("licence") or card.get("license")),
    )
    parts = [f"{label}: {html.escape(str(value))}" for label, value in fields if value]
    return f"<p>{'; '.join(parts)}.</p>" if parts else ""


def rejected_block(rejected: pd.DataFrame, path: Path, shown: int = REJECTED_SHOWN) -> str:
    """'N rejected files' and a table of the first `shown` rows (path, reason[, label])."""
    n = len(rejected)
    text = f"<p>{n:,} rejected file{'' if n == 1 else 's'} (unreadable or invalid at download)"
    if n > shown:
        text += f"; the first {shown} below, all in <code>{html.escape(str(path))}</code>"
    text += ".</p>"
    return text + (table(rejected.head(shown)) if n else "")


def positive_note(card: dict) -> str:
    """ ", positive class X" for binary tasks (what sensitivity and the threshold refer to)."""
    positive = card.get("positive_class")
    return f", positive class <b>{html.escape(positive)}</b>" if positive else ""


def data_section(
    page: Page, card: dict, split: dict, rejected: pd.DataFrame, rejected_file: Path
) -> None:
    page.section("data", "Data")
    page.add(
        f"<p>{html.escape(card.get('description', ''))} — "
        f"{card['n_images']:,} images of {card['n_patients']:,} patients; task "
        f"{html.escape(card['task'])}{positive_note(card)}.</p>"
    )
    rows = []
    for c in card["classes"]:
        train = split["train"]
        rows.append(
            (
                c,
                train["class_counts_before"][c],
                train["class_counts"][c],
                split["val"]["class_counts"][c],
                split["test"]["class_counts"][c],
            )
        )
    if "n_no_finding" in split["train"]:  # multi-label: the empty label set, as a row
        rows.append(
            (
                "(no finding)",
                split["train"]["n_no_finding_before"],
                split["train"]["n_no_finding"],
                split["val"]["n_no_finding"],
                split["test"]["n_no_finding"],
            )
        )
    columns = ["class", "train", "train after undersampling", "val", "test"]
    page.add(table(pd.DataFrame(rows, columns=columns)))
    page.add(no_finding_note(card))
    page.add(dropped_note(split))
    page.add(source_line(card))
    patients = ", ".join(f"{s} {split[s]['n_patients']:,}" for s in ("train", "val", "test"))
    overlap = split["patient_overlap"]
    verdict = (
        '<span class="ok">no patient in two splits</span>'
        if overlap == 0
        else f'<span class="bad">{overlap} patient(s) in two splits</span>'
    )
    page.add(
        f"<p>Patients per split: {patients}. Leakage audit ({html.escape(split['strategy'])}"
        f" split): {verdict}.</p>"
    )
    page.add(rejected_block(rejected, rejected_file))


def members_note(train: dict) -> str:
    """An ensemble's size and its validation score, before the epochs line."""
    members = train.get("members")
    if not members:
        return ""
    score = next((v for k, v in train.items() if k.startswith("ensemble_val_")), None)
    text = f"Ensemble of {members} models (seeds in a row), scored as their mean probability"
    return text + (f"; validation {score:.3f} as one model" if score is not None else "") + ". "


def training_section(page: Page, history: pd.DataFrame, train: dict) -> None:
    page.section("training", "Training")
    page.add(
        f"<p>{members_note(train)}{train['epochs_run']} epochs, best epoch {train['best_epoch']}"
        f"{' (weight average)' if train.get('best_weights') == 'ema' else ''}, "
        f"{train['images_per_second']:.0f} images/s on {html.escape(str(train['device']))}, "
        f"{train['train_seconds']:.0f} s.</p>"
    )
    loss, scores = go.Figure(), go.Figure()
    members = history.groupby("member") if "member" in history else [(None, history)]
    for member, rows in members:  # an ensemble: one curve per member
        tag = "" if member is None else f" (member {member})"
        for col in ("train_loss", "val_loss"):
            loss.add_scatter(x=rows["epoch"], y=rows[col], name=col + tag, mode="lines+markers")
        for col in metric_registry.monitor_metrics():
            scores.add_scatter(x=rows["epoch"], y=rows[col], name=col + tag, mode="lines+markers")
    loss.update_layout(title="Loss", xaxis_title="epoch", height=340)
    scores.update_layout(title="Validation metrics", xaxis_title="epoch", height=340)
    page.pair((loss, "loss-curve"), (scores, "val-curve"))


def results_section(
    page: Page, result: dict, confusion: pd.DataFrame, classes: list[str], plots_dir: Path
) -> None:
    page.section("results", "Test results")
    unit = result.get("ci_unit", "image")
    how = "all images of a drawn patient kept together" if unit == "patient" else "no patient ids"
    tta = (
        " Each probability is the mean over the image, four small shifts and a zoom "
        "(test-time augmentation, <code>evaluate.tta</code>), on validation as on test."
        if result.get("tta")
        else ""
    )
    page.add(
        f"<p>{result['n_test']:,} test images; 95% bootstrap intervals resampling {unit}s "
        f"({how}).{tta}</p>"
    )
    page.add(table(headline_table(result)))
    page.add(table(metric_table({c: result["per_class"][c] for c in classes}, "class")))
    heat, norm = confusion_figures(confusion, classes)
    roc, pr = curve_figures(plots_dir, classes, result["per_class"])
    page.pair((heat, "confusion"), (roc, "roc"))
    page.pair((norm, "confusion-normalized"), (pr, "pr"))


def calibration_section(page: Page, result: dict, reliability: pd.DataFrame) -> None:
    page.section("calibration", "Calibration and operating point")
    page.add(
        f"<p>Expected calibration error {result['ece']:.3f} (0 = confidence matches accuracy), "
        f"Brier score {result['brier']:.3f}. Reliability: mean confidence against observed "
        "accuracy per confidence bin (marker size = images in the bin).</p>"
    )
    fig = go.Figure()
    fig.add_scatter(
        x=reliability["confidence"],
        y=reliability["accuracy"],
        mode="lines+markers",
        name="model",
        marker={"size": 6 + 18 * (reliability["count"] / reliability["count"].max()) ** 0.5},
        customdata=reliability["count"],
        hovertemplate="confidence %{x:.3f}<br>accuracy %{y:.3f}<br>%{customdata} images",
    )
    fig.add_scatter(x=[0, 1], y=[0, 1], name="perfect", line={"dash": "dot", "color": "#999"})
    fig.update_layout(
        title="Reliability diagram",
        xaxis_title="confidence",
        yaxis_title="accuracy",
        height=380,
        width=520,
    )
    page.figure(fig, "reliability")
    threshold = result.get("threshold")
    if threshold:
        note = (
            f" ({html.escape(threshold['fallback'])}; 0.5 kept)" if "fallback" in threshold else ""
        )
        positive = html.escape(threshold.get("positive_class") or "positive")
        page.add(
            f"<p>Positive class: <b>{positive}</b> (sensitivity is its recall, specificity "
            f"the other class's). Operating threshold on P({positive}) chosen on the "
            f"validation split by "
            f"{html.escape(threshold['method'])}: {threshold['value']:.3f}{note} "
            f"(validation sensitivity {threshold['val_sensitivity']:.3f}, specificity "
            f"{threshold['val_specificity']:.3f}). Test metrics at 0.5 and at that threshold:</p>"
        )
        keys = [k for k in threshold["at_default"] if k != "threshold"]
        rows = [(k, threshold["at_default"][k], threshold["at_chosen"][k]) for k in keys]
        columns = ["metric", "at 0.5", f"at {threshold['value']:.3f}"]
        page.add(table(pd.DataFrame(rows, columns=columns, dtype=object)))
    groups = result.get("per_group")
    if groups:
        page.add(
            "<p>Metrics per group (manifest column <code>group</code>); intervals resample "
            "within each group:</p>"
        )
        page.add(table(metric_table(groups, "group")))


def interval_text(value: float | None, ci: list[float] | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def shift_section(page: Page, shift: dict) -> None:
    """Validation and test side by side per class, and whether they disagree."""
    page.section("shift", "Validation against test")
    flagged, compared = shift["flagged"], shift["compared"]
    verdict = (
        f'<span class="bad">shift: {flagged} of {compared} figures differ</span>'
        if flagged
        else f'<span class="ok">no shift detected in {compared} figures</span>'
    )
    page.add(
        f"<p>{verdict}. The model and its threshold were chosen on the validation split; "
        "a test population from another site, time or scanner can behave differently. Per "
        "class, sensitivity, specificity and calibration error (one-vs-rest ECE) on both "
        "splits, each with a 95% patient-bootstrap interval, and the difference test - val "
        f"with a {shift['difference_level']:.2%} interval (Bonferroni over the {compared} "
        "figures, so an unshifted test set is flagged in at most 5% of evaluations); a "
        "sensitivity or specificity is flagged only when Newcombe's score interval of the "
        "difference excludes 0 too, as a bootstrap interval collapses at 0 and 1. "
        "Validation figures of the selected model are optimistic by construction.</p>"
    )
    rows = [
        (
            r["class"],
            r["figure"].replace("_", " "),
            interval_text(r["val"], r["val_ci"]),
            interval_text(r["test"], r["test_ci"]),
            interval_text(r["difference"], r["difference_ci"]),
            "SHIFT" if r["shift"] else "",
        )
        for r in shift["figures"]
    ]
    columns = ["class", "figure", "validation", "test", "test - val", "flag"]
    page.add(table(pd.DataFrame(rows, columns=columns)))


def deployment_section(page: Page, result: dict, export: dict | None) -> None:
    page.section("deployment", "Deployment")
    rows = [
        ("parameters (millions)", result.get("params_millions", "")),
        ("checkpoint size (MB)", result.get("model_size_mb", "")),
        (
            f"latency, batch 1, PyTorch on {result.get('latency_device', 'n/a')} (ms)",
            result.get("latency_ms", "not measured"),
        ),
    ]
    if export:
        rows += [
            ("ONNX Runtime latency, batch 1, CPU (ms)", export["onnx_latency_ms"]),
            ("TorchScript size (MB)", export["torchscript_size_mb"]),
            ("ONNX size (MB)", export["onnx_size_mb"]),
            (
                f"TorchScript max |diff| to PyTorch ({export['n_checked']} test images)",
                f"{export['torchscript_max_abs_diff']:.1e}",
            ),
            (
                f"ONNX max |diff| to PyTorch ({export['n_checked']} test images)",
                f"{export['onnx_max_abs_diff']:.1e}",
            ),
        ]
    page.add(table(pd.DataFrame(rows, columns=["figure", "value"]), floats="{:.3f}"))


def explain_section(page: Page, explain: dict, explain_dir: Path, classes: list[str]) -> None:
    page.section("explain", "Where the model looks (Grad-CAM)")
    text = (
        f"{html.escape(explain['method'])} on layer "
        f"<code>{html.escape(explain['target_layer'])}</code>."
    )
    if "pointing_game" in explain:
        chance = explain.get("pointing_chance_per_class", {})
        per_class = ", ".join(
            f"{html.escape(c)} {v:.1%} vs chance {chance.get(c, float('nan')):.1%}"
            for c, v in explain["pointing_game_per_class"].items()
        )
        text += (
            f" Pointing game: the CAM peak of the true class lies inside the lesion mask in "
            f"{explain['pointing_game']:.1%} of {explain['n_abnormal']:,} abnormal test images "
            f"({per_class}); chance (mean lesion area share) is "
            f"{explain['pointing_chance']:.1%}. Share of CAM energy inside the lesion: "
            f"{explain['cam_energy_in_mask']:.1%}."
        )
    page.add(f"<p>{text}</p>")
    page.add(
        "<p>Per class: rows of true positives, false negatives, false positives and true "
        "negatives with the CAM of that class; lesion outlines in green.</p>"
    )
    for c in classes:
        path = paths.gallery_image(explain_dir, safe_name(c))
        if path.is_file():
            page.add(f"<h3>{html.escape(c)}</h3>")
            page.add(image_tag(path, f"Grad-CAM gallery for {c}"))


METHOD_NAMES = {"tsne": "t-SNE", "umap": "UMAP", "pca": "PCA"}


def embedding_section(page: Page, embedding: pd.DataFrame, embed: dict) -> None:
    page.section("embedding", "Feature map")
    page.add(
        f"<p>{html.escape(METHOD_NAMES.get(embed['method'], embed['method']))} map of the "
        f"penultimate features of "
        f"{embed['n_points']:,} test images; silhouette by true label "
        f"{embed['silhouette']:.3f}. Crosses are misclassified.</p>"
    )
    fig = px.scatter(
        embedding,
        x="x",
        y="y",
        color="label",
        symbol=embedding["correct"].map({True: "correct", False: "wrong"}),
        symbol_map={"correct": "circle", "wrong": "x"},
        hover_data={"label": True, "predicted": True, "image": True, "x": False, "y": False},
    )
    fig.update_traces(marker={"size": 6, "opacity": 0.8})
    fig.update_layout(height=520, legend_title_text="")
    page.figure(fig, "tsne")


def result_params(params: Params) -> dict:
    """The params that produced the results, per section: every key a stage depends on in
    dvc.yaml (operational keys such as num_workers are left out: they change no result), of
    the data keys only those its source reads (`DataParams.in_effect`)."""
    shown: dict = {}
    for key in stage_params("report"):
        section, _, name = key.partition(".")
        values = getattr(params, section).model_dump()
        if section != "data" or name in params.data.in_effect():
            shown.setdefault(section, {}).update({name: values[name]} if name else values)
    return shown


def run(
    params: Params,
    params_file: Path,
    report_file: Path = paths.REPORT,
    rejected_file: Path = paths.REJECTED,
) -> str:
    start = time.perf_counter()
    card = read_json(paths.DATASET_CARD)
    classes = card["classes"]
    result = read_result(paths.EVALUATE_METRICS)
    page = Page()
    rejected = read_csv(rejected_file, required=("path", "reason"))
    data_section(page, card, read_json(paths.SPLIT_METRICS), rejected, rejected_file)
    page.section("preprocessing", "Preprocessing")
    p = params.preprocess
    page.add(
        f"<p>Border crop {p.crop_borders}, equalisation {html.escape(p.equalize)}, "
        f"blur {p.blur}, resized to {p.size} x {p.size}, {p.channels} channel(s). "
        "Pairs of raw image | stored model input, a row per class.</p>"
    )
    page.add(image_tag(paths.SAMPLES, "samples before and after"))
    training_section(page, read_csv(paths.HISTORY), read_result(paths.TRAIN_METRICS))
    confusion = read_csv(paths.CONFUSION)
    results_section(page, result, confusion, classes, paths.EVALUATE_PLOTS)
    if "ece" in result:
        calibration_section(page, result, read_csv(paths.CALIBRATION))
    if "shift" in result:
        shift_section(page, result["shift"])
    export = read_result(paths.EXPORT_METRICS) if paths.EXPORT_METRICS.is_file() else None
    deployment_section(page, result, export)
    embedding_section(page, read_csv(paths.EMBEDDING), read_json(paths.EMBED_METRICS))
    if paths.EXPLAIN_METRICS.is_file():
        explain = read_result(paths.EXPLAIN_METRICS)
        explain_section(page, explain, paths.EXPLAIN_PLOTS, classes)
    shown = yaml.safe_dump(result_params(params), sort_keys=False)
    page.section("params", "Parameters")
    page.add(f"<p>From {html.escape(str(params_file))}: every key the results depend on.</p>")
    page.add(f"<pre>{html.escape(shown)}</pre>")
    digest = hashlib.sha256(Path(params_file).read_bytes()).hexdigest()[:12]
    header = html.escape(
        f"{card['name']} · {params.model.name} · commit {git_commit()} · params {digest} · "
        f"{environment()} · {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
    )
    title = f"medpipe report — {card['name']}, {params.model.name}"
    with atomic_path(report_file) as tmp:
        tmp.write_text(render(page, title, header), encoding="utf-8")
    size_mb = report_file.stat().st_size / 1e6
    return (
        f"report: {report_file} ({size_mb:.1f} MB, accuracy {result['accuracy']:.3f}, "
        f"F1 {result['f1_macro']:.3f}) in {time.perf_counter() - start:.1f} s"
    )
