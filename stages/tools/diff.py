"""`medpipe diff BASE [HEAD]`: two runs compared on the same test images, with uncertainty.

Each run's per-image predictions (`plots/evaluate/predictions.csv`, git-tracked) are read
at its revision (HEAD defaults to the workspace). On the same images with the same labels
the runs are *paired*: every headline metric gets the difference head - base with a paired
patient-level bootstrap interval (both runs scored on the same resamples), accuracy gets
McNemar's exact test and ROC-AUC DeLong's test. A difference is "better" or "worse" only
when its interval excludes zero, else "within noise". Other test sets are not paired: the
figures are shown side by side and the reason is given.
"""

from __future__ import annotations

import io
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from stages.lib import metrics, paths, statistics
from stages.lib.errors import ToolFailed
from stages.lib.io import read_csv

KEYS = metrics.SUMMARY_KEYS
DEFAULT_RESAMPLES = 1000  # when evaluate.bootstrap is 0 (no intervals in evaluate), not here


@dataclass
class Comparison:
    """Head against base: per metric base, head, difference, interval, verdict, test."""

    paired: bool
    reason: str  # why the runs are not paired ("" when they are)
    level: float
    unit: str = "image"  # what the bootstrap resampled
    n_images: int = 0
    rows: dict[str, dict] = field(default_factory=dict)

    def verdict(self, key: str) -> str:
        return self.rows.get(key, {}).get("verdict", "not compared")


def read_predictions(repo: Path, rev: str | None) -> pd.DataFrame | None:
    """The per-image predictions at git revision `rev` (None: the workspace), or None."""
    relative = paths.PREDICTIONS.as_posix()
    if rev is None:
        path = repo / relative
        return read_csv(path) if path.is_file() else None
    done = subprocess.run(
        ["git", "show", f"{rev}:{relative}"], cwd=repo, capture_output=True, check=False
    )
    if done.returncode != 0:
        message = done.stderr.decode(errors="replace").strip()
        if "does not exist" in message or "exists on disk, but not in" in message:
            return None
        raise ToolFailed(f"git show {rev}:{relative} failed: {message}")
    text = io.StringIO(done.stdout.decode())
    return pd.read_csv(text, dtype={"patient_id": str, "label": str}, keep_default_na=False)


def prob_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if c.startswith("prob_")]


def multilabel(frame: pd.DataFrame) -> bool:
    """Multi-label predictions: `|`-joined labels, or an image with no label at all."""
    labels = frame["label"].astype(str)
    return bool(labels.str.contains("|", regex=False).any() or (labels == "").any())


def why_not_paired(base: pd.DataFrame, head: pd.DataFrame) -> str:
    """ "" when both runs scored the same images with the same labels and classes."""
    if prob_columns(base) != prob_columns(head):
        return f"other classes ({prob_columns(base)} vs {prob_columns(head)})"
    if multilabel(base) or multilabel(head):
        return "multi-label predictions: the paired tests are for single-label tasks"
    left, right = base.set_index("image"), head.set_index("image")
    if set(left.index) != set(right.index):
        common = len(set(left.index) & set(right.index))
        return f"other test images ({len(base)} vs {len(head)}, {common} in common)"
    if not left["label"].equals(right.loc[left.index, "label"]):
        return "the same images carry other labels"
    return ""


def arrays(
    frame: pd.DataFrame, columns: list[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Labels as class indices, probabilities, patient ids (None without)."""
    classes = [c.removeprefix("prob_") for c in columns]
    y = label_indices(frame["label"], classes)
    patients = frame["patient_id"].astype(str).to_numpy() if "patient_id" in frame else None
    return y, frame[columns].to_numpy(dtype=np.float64), patients


def label_indices(labels: pd.Series, classes: list[str]) -> np.ndarray:
    lookup = {c: k for k, c in enumerate(classes)}
    unknown = sorted(set(labels) - set(lookup))
    if unknown:
        raise ValueError(f"{paths.PREDICTIONS}: labels {unknown} are not classes {classes}")
    return labels.map(lookup).to_numpy()


def verdict(ci: list[float]) -> str:
    return "better" if ci[0] > 0 else "worse" if ci[1] < 0 else "within noise"


def compare(
    base: pd.DataFrame, head: pd.DataFrame, n_resamples: int, seed: int, level: float = 0.95
) -> Comparison:
    """Head against base, paired when they scored the same test images."""
    reason = why_not_paired(base, head)
    if reason:
        return unpaired(base, head, reason, level)
    head = head.set_index("image").loc[base["image"]].reset_index()  # base's row order
    columns = prob_columns(base)
    y, probs_base, patients = arrays(base, columns)
    probs_head = head[columns].to_numpy(dtype=np.float64)
    groups = statistics.patient_groups(patients)
    rows = statistics.paired_bootstrap_difference(
        y, probs_base, probs_head, groups, n_resamples or DEFAULT_RESAMPLES, seed, KEYS, level
    )
    for row in rows.values():
        row["verdict"] = verdict(row["ci"])
    correct = (probs_base.argmax(1) == y), (probs_head.argmax(1) == y)
    mcnemar = statistics.mcnemar_exact(*correct)
    if "accuracy" in rows:
        discordant = f"{mcnemar.b} vs {mcnemar.c} images right in one run only"
        rows["accuracy"]["test"] = f"McNemar exact p={mcnemar.p_value:.3g} ({discordant})"
    if "roc_auc" in rows:
        rows["roc_auc"]["test"] = delong_text(y, probs_base, probs_head)
    unit = statistics.resampling_unit(groups)
    return Comparison(True, "", level, unit, len(y), rows)


def delong_text(y: np.ndarray, probs_base: np.ndarray, probs_head: np.ndarray) -> str:
    """DeLong's test: on the positive class (binary), else one-vs-rest per class."""
    try:
        if probs_base.shape[1] == 2:
            result = statistics.delong_test(y == 1, probs_base[:, 1], probs_head[:, 1])
            return f"DeLong p={result.p_value:.3g}"
        per_class = statistics.delong_test_ovr(y, probs_base, probs_head)
    except ValueError as exc:  # too few positives or negatives of a class
        return f"DeLong not computed ({exc})"
    return "DeLong per class p=" + ", ".join(f"{r.p_value:.3g}" for r in per_class)


def unpaired(base: pd.DataFrame, head: pd.DataFrame, reason: str, level: float) -> Comparison:
    """Each run's own figures, side by side (no interval: they are not paired)."""
    rows = {}
    figures = []
    for frame in (base, head):
        columns = prob_columns(frame)
        if multilabel(frame) or not columns:
            figures.append({})
            continue
        y, probs, _ = arrays(frame, columns)
        figures.append(metrics.summarize(y, probs))
    for key in KEYS:
        b, h = (f.get(key) for f in figures)
        if b is not None and h is not None:
            rows[key] = {"base": round(b, 4), "head": round(h, 4), "difference": round(h - b, 4)}
            rows[key]["verdict"] = "not paired"
    return Comparison(False, reason, level, "image", len(head), rows)


def markdown(comparison: Comparison, base: str, head: str) -> str:
    """A Markdown table of the comparison, with how it was made."""
    if not comparison.rows:
        return f"_no per-image predictions to compare ({comparison.reason})_\n"
    pct = f"{comparison.level:.0%}"
    lines = [
        f"| metric | {base} | {head} | difference | {pct} interval | verdict | test |",
        "| --- | ---: | ---: | ---: | --- | --- | --- |",
    ]
    for key, row in comparison.rows.items():
        ci = "[{:+.4f}, {:+.4f}]".format(*row["ci"]) if "ci" in row else ""
        lines.append(
            f"| {key} | {row['base']:.4f} | {row['head']:.4f} | {row['difference']:+.4f} | "
            f"{ci} | {row['verdict']} | {row.get('test', '')} |"
        )
    if comparison.paired:
        how = (
            f"Paired on the same {comparison.n_images:,} test images; intervals from a paired "
            f"bootstrap resampling {comparison.unit}s."
        )
    else:
        how = f"Not paired: {comparison.reason}. The figures are side by side, no interval."
    return "\n".join(lines) + f"\n\n{how}\n"


def run(base: str, head: str | None, n_resamples: int, seed: int, level: float, repo: Path) -> str:
    before = read_predictions(repo, base)
    after = read_predictions(repo, head)
    head_name = head or "workspace"
    if before is None or after is None:
        missing = base if before is None else head_name
        raise FileNotFoundError(
            f"{paths.PREDICTIONS} is not in {missing} (run `medpipe evaluate`, commit it)"
        )
    comparison = compare(before, after, n_resamples, seed, level)
    return markdown(comparison, base, head_name)
