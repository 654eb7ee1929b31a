"""`medpipe diff BASE [HEAD]`: two runs compared on the same test images, with both noises.

Each run's per-image predictions (`plots/evaluate/predictions.csv`, git-tracked) are read
at its revision (HEAD defaults to the workspace); where a revision recorded the spread of
its recipe (`medpipe spread`: K trainings, `metrics/spread/`), all K trainings stand for
that side. On the same images with the same labels the runs are *paired*: every headline
metric gets the difference head - base with a paired patient-level bootstrap interval
(test-sampling noise) and, where a spread is recorded, an interval that adds the
seed-to-seed spread (training noise). The verdict says which noise explains the difference
or that it is beyond both (`stages.lib.noise`, the same rule as pr-summary and compare).
Accuracy gets McNemar's exact test and ROC-AUC DeLong's test (first training of each side).
Other test sets are not paired: the figures are shown side by side and the reason given.
"""

from __future__ import annotations

import io
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from stages.lib import metric_registry, metrics, noise, paths, spread, statistics
from stages.lib.errors import ToolFailed
from stages.lib.gitrepo import require_revisions
from stages.lib.io import read_csv

DEFAULT_RESAMPLES = 1000  # when evaluate.bootstrap is 0 (no intervals in evaluate), not here


@dataclass
class Comparison:
    """Head against base: per metric base, head, difference, intervals, verdict, test."""

    paired: bool
    reason: str  # why the runs are not paired ("" when they are)
    level: float
    unit: str = "image"  # what the bootstrap resampled
    n_images: int = 0
    rows: dict[str, dict] = field(default_factory=dict)
    k_base: int = 1  # trainings standing for each side (a recorded spread: K seeds)
    k_head: int = 1
    spread_notes: list[str] = field(default_factory=list)  # why a side has no spread

    @property
    def training_measured(self) -> bool:
        return self.k_base + self.k_head > 2


@dataclass
class Side:
    """One side of a comparison: its trainings' predictions and where they come from."""

    runs: list[pd.DataFrame]
    label: str  # "main (3 seeds)", "the workspace"
    note: str = ""  # why no spread counts for this side ("" when one does)


def load_side(repo: Path, rev: str | None, name: str) -> Side | None:
    """The recorded spread at `rev` (None: the workspace) when it matches that revision's
    recipe, else its single run; None when it has no predictions at all."""
    recorded, note = spread.load(repo, rev, name)
    single = read_predictions(repo, rev)
    if single is None:
        return None
    if recorded is not None:
        own = recorded.member_like(single)
        if own is not None:  # the side's own run first (McNemar and DeLong compare those)
            others = [recorded.predictions[s] for s in sorted(recorded.predictions) if s != own]
            return Side([single, *others], f"{name} ({recorded.k} seeds)")
        note = (
            f"the spread in {name} does not include {name}'s own run (recorded on another "
            "revision, or before its last `dvc repro`): not used"
        )
    return Side([single], name, note)

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


def compare(
    base: pd.DataFrame | list[pd.DataFrame],
    head: pd.DataFrame | list[pd.DataFrame],
    n_resamples: int,
    seed: int,
    level: float = 0.95,
) -> Comparison:
    """Head against base, paired when they scored the same test images; each side one run
    or the K trainings of its recorded spread."""
    base = base if isinstance(base, list) else [base]
    head = head if isinstance(head, list) else [head]
    reason = why_not_paired(base[0], head[0])
    if reason:
        return unpaired(base[0], head[0], reason, level)
    order = base[0]["image"]
    columns = prob_columns(base[0])
    y, _, patients = arrays(base[0], columns)

    def probs(frame: pd.DataFrame) -> np.ndarray:
        return frame.set_index("image").loc[order, columns].to_numpy(dtype=np.float64)

    groups = statistics.patient_groups(patients)
    found = statistics.paired_bootstrap_draws(
        y, [probs(f) for f in base], [probs(f) for f in head], groups,
        n_resamples or DEFAULT_RESAMPLES, seed, metric_registry.compared_keys(),
    )  # fmt: skip
    rows = {}
    for key, (base_values, head_values, draws) in found.items():
        direction = metric_registry.higher_is_better(key)
        judged = noise.judge(base_values, head_values, draws, level, direction)
        if judged.test_ci is None:  # undefined in every resample
            continue
        rows[key] = {
            "base": round(float(base_values.mean()), 4),
            "head": round(float(head_values.mean()), 4),
            "difference": round(judged.difference, 4),
            "test_ci": judged.test_ci,
            "ci": judged.ci,
            "training_sd": judged.training_sd,
            "verdict": judged.label,
        }
    first = probs(base[0]), probs(head[0])
    correct = (first[0].argmax(1) == y), (first[1].argmax(1) == y)
    mcnemar = statistics.mcnemar_exact(*correct)
    if "accuracy" in rows:
        discordant = f"{mcnemar.b} vs {mcnemar.c} images right in one run only"
        rows["accuracy"]["test"] = f"McNemar exact p={mcnemar.p_value:.3g} ({discordant})"
    if "roc_auc" in rows:
        rows["roc_auc"]["test"] = delong_text(y, *first)
    unit = statistics.resampling_unit(groups)
    return Comparison(True, "", level, unit, len(y), rows, len(base), len(head))


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
    for key in metric_registry.compared_keys():
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
        f"| metric | {base} | {head} | difference | test noise | test + training noise | "
        "verdict | test |",
        "| --- | ---: | ---: | ---: | --- | --- | --- | --- |",
    ]
    for key, row in comparison.rows.items():
        test = "[{:+.4f}, {:+.4f}]".format(*row["test_ci"]) if row.get("test_ci") else ""
        both = (
            "[{:+.4f}, {:+.4f}]".format(*row["ci"])
            if row.get("training_sd") is not None
            else ("not recorded" if comparison.paired else "")
        )
        lines.append(
            f"| {key} | {row['base']:.4f} | {row['head']:.4f} | {row['difference']:+.4f} | "
            f"{test} | {both} | {row['verdict']} | {row.get('test', '')} |"
        )
    if not comparison.paired:
        how = f"Not paired: {comparison.reason}. The figures are side by side, no interval."
        return "\n".join(lines) + f"\n\n{how}\n"
    how = (
        f"Paired on the same {comparison.n_images:,} test images; test noise from a paired "
        f"bootstrap resampling {comparison.unit}s. Intervals are one-sided {pct} bounds "
        "(worse: the upper bound is below zero; better: the lower bound above)."
    )
    if comparison.training_measured:
        how += (
            f" Training noise from the seed-to-seed spread ({comparison.k_base} training(s) "
            f"of the base, {comparison.k_head} of the head; `medpipe spread`)."
        )
    else:
        how += " " + NO_SPREAD
    notes = "".join(f"\n- {n}" for n in comparison.spread_notes)
    return "\n".join(lines) + f"\n\n{how}\n{notes}\n"


NO_SPREAD = (
    "**Training noise is not recorded**, so a difference beyond test noise may still be "
    "another seed or another CPU: record it on the base (`medpipe spread --seeds 3` on main, "
    "then commit `metrics/spread/`)."
)


def run(base: str, head: str | None, n_resamples: int, seed: int, level: float, repo: Path) -> str:
    require_revisions(repo, [base] + ([head] if head else []), "diff")
    head_name = head or "workspace"
    before = load_side(repo, base, base)
    after = load_side(repo, head, head_name)
    if before is None or after is None:
        missing = base if before is None else head_name
        raise FileNotFoundError(
            f"{paths.PREDICTIONS} is not in {missing} (run `medpipe evaluate`, commit it)"
        )
    comparison = judge_sides(before, after, n_resamples, seed, level)
    return markdown(comparison, before.label, after.label)


def judge_sides(before: Side, after: Side, n_resamples: int, seed: int, level: float):
    comparison = compare(before.runs, after.runs, n_resamples, seed, level)
    comparison.spread_notes = [n for n in (before.note, after.note) if n]
    return comparison
