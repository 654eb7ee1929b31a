"""`medpipe pr-summary`: Markdown for a pull request and a gate that fails only on a real drop.

The gate metric is compared paired, on the same test images (`medpipe diff`): the check
fails when the drop is larger than `report.gate_tolerance` *and* the paired interval of the
difference (level `report.gate_level`) excludes zero. Where the runs cannot be paired (no
per-image predictions at the base, other test images) it falls back to the drop alone and
says so. Hardware figures (timings, latency) are listed apart, never gated.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from stages.lib import paths
from stages.lib.errors import ToolFailed
from stages.lib.io import read_json
from stages.lib.params import EvaluateParams, ReportParams
from stages.tools import diff

DEFAULT_METRICS_FILE = paths.EVALUATE_METRICS.as_posix()
# hardware-dependent figures: (detail file, key, label); shown for the head, never compared
HARDWARE = (
    (paths.TRAIN_DETAIL, "train_seconds", "training time (s)"),
    (paths.TRAIN_DETAIL, "images_per_second", "training throughput (img/s)"),
    (paths.EVALUATE_DETAIL, "latency_ms", "latency, batch 1 (ms)"),
    (paths.EXPORT_DETAIL, "onnx_latency_ms", "ONNX Runtime latency (ms)"),
)


@dataclass(frozen=True)
class Gate:
    """The verdict on one metric: old and new values, the paired interval of the
    difference when there is one, and whether the drop is tolerated."""

    metric: str
    old: float | None
    new: float | None
    tolerance: float
    ci: list[float] | None = None  # paired interval of new - old

    @property
    def passed(self) -> bool:
        if self.old is None or self.new is None:
            return self.new is not None  # a new metric passes; a vanished one fails
        dropped = self.new < self.old - self.tolerance
        if self.ci is None:  # not paired: the drop alone decides
            return not dropped
        return not (dropped and self.ci[1] < 0)  # beyond the tolerance and beyond noise

    def describe(self, level: float) -> str:
        if self.old is None or self.new is None:
            return f"**{self.metric}**: {self.old} → {self.new}"
        text = f"**{self.metric}**: {self.old} → {self.new} ({self.new - self.old:+.4f}"
        if self.ci is not None:
            noise = "beyond noise" if self.ci[0] > 0 or self.ci[1] < 0 else "within noise"
            text += f", {level:.0%} paired interval [{self.ci[0]:+.4f}, {self.ci[1]:+.4f}]: {noise}"
        else:
            text += ", not paired"
        return text + f"; tolerance {self.tolerance})"


def dvc(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["dvc", *args], cwd=repo, capture_output=True, text=True, check=False, timeout=300
    )
    if done.returncode != 0:
        raise ToolFailed(f"dvc {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def split_metric(name: str) -> tuple[str, str]:
    """`file:key` or bare `key` (looked up in metrics/evaluate.json)."""
    file, _, key = name.rpartition(":")
    return (file or DEFAULT_METRICS_FILE), key


def check_gate(
    diff_json: dict, params: ReportParams, current: dict, paired: diff.Comparison | None = None
) -> Gate:
    """Gate from `dvc metrics diff --json` (changed metrics only), the current metrics, and
    the paired comparison where the gate metric is one of its headline metrics."""
    file, key = split_metric(params.gate_metric)
    if paired is not None and paired.paired and file == DEFAULT_METRICS_FILE:
        row = paired.rows.get(key)
        if row is not None:
            return Gate(
                params.gate_metric, row["base"], row["head"], params.gate_tolerance, row["ci"]
            )
    entry = diff_json.get(file, {}).get(key)
    if entry is not None:
        return Gate(params.gate_metric, entry.get("old"), entry.get("new"), params.gate_tolerance)
    value = current.get(key)  # unchanged metrics are absent from the diff
    return Gate(params.gate_metric, value, value, params.gate_tolerance)


def hardware_table(repo: Path) -> str:
    """The head's hardware-dependent figures (they vary with the machine, not the model)."""
    rows = []
    for file, key, label in HARDWARE:
        path = repo / file
        value = read_json(path).get(key) if path.is_file() else None
        if value is not None:
            rows.append(f"| {label} | {value} |")
    if not rows:
        return "_none recorded_\n"
    device = repo / paths.TRAIN_METRICS
    where = read_json(device).get("device", "?") if device.is_file() else "?"
    head = f"Measured on this run's machine ({where}); they differ across machines, so they are "
    head += "not compared with the base.\n\n| figure | value |\n| --- | ---: |\n"
    return head + "\n".join(rows) + "\n"


def paired_comparison(repo: Path, base: str, evaluate: EvaluateParams, level: float):
    """`medpipe diff base` of the workspace, or None with the reason when it cannot run."""
    before = diff.read_predictions(repo, base)
    after = diff.read_predictions(repo, None)
    if before is None or after is None:
        where = base if before is None else "the workspace"
        return None, f"no per-image predictions ({paths.PREDICTIONS}) in {where}"
    comparison = diff.compare(before, after, evaluate.bootstrap, evaluate.seed, level)
    return comparison, comparison.reason


def summarize(
    repo: Path, base: str, params: ReportParams, evaluate: EvaluateParams | None = None
) -> tuple[str, Gate]:
    """Markdown for the pull request and the gate verdict."""
    evaluate = evaluate or EvaluateParams()
    comparison, reason = paired_comparison(repo, base, evaluate, params.gate_level)
    metrics_md = dvc(repo, "metrics", "diff", base, "--md") or "_no metric changed_\n"
    params_md = dvc(repo, "params", "diff", base, "--md") or "_no param changed_\n"
    diff_json = json.loads(dvc(repo, "metrics", "diff", base, "--json") or "{}")
    file, _ = split_metric(params.gate_metric)
    current_path = repo / file
    current = json.loads(current_path.read_text()) if current_path.is_file() else {}
    gate = check_gate(diff_json, params, current, comparison)
    icon = "✅" if gate.passed else "❌"
    results = (
        diff.markdown(comparison, base, "this branch")
        if comparison is not None
        else f"_not compared: {reason}; the gate judges the drop alone_\n"
    )
    markdown = (
        f"## medpipe: results against `{base}`\n\n{icon} {gate.describe(params.gate_level)}\n\n"
        f"### Results, paired on the test images\n\n{results}\n"
        f"### All metrics (`dvc metrics diff`)\n\n{metrics_md}\n"
        f"### Hardware-dependent figures\n\n{hardware_table(repo)}\n"
        f"### Params\n\n{params_md}"
    )
    return markdown, gate
