"""`medpipe pr-summary`: Markdown of `dvc metrics diff` and `dvc params diff` for a pull
request, and a gate that fails when a chosen metric drops more than a tolerance."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from stages.lib.errors import ToolFailed
from stages.lib.params import ReportParams

DEFAULT_METRICS_FILE = "metrics/evaluate.json"


@dataclass(frozen=True)
class Gate:
    """The verdict on one metric: old and new values and whether the drop is tolerated."""

    metric: str
    old: float | None
    new: float | None
    tolerance: float

    @property
    def passed(self) -> bool:
        if self.old is None or self.new is None:
            return self.new is not None  # a new metric passes; a vanished one fails
        return self.new >= self.old - self.tolerance


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


def check_gate(diff: dict, params: ReportParams, current: dict) -> Gate:
    """Gate from `dvc metrics diff --json` (changed metrics only) and the current metrics."""
    file, key = split_metric(params.gate_metric)
    entry = diff.get(file, {}).get(key)
    if entry is not None:
        return Gate(params.gate_metric, entry.get("old"), entry.get("new"), params.gate_tolerance)
    value = current.get(key)  # unchanged metrics are absent from the diff
    return Gate(params.gate_metric, value, value, params.gate_tolerance)


def summarize(repo: Path, base: str, params: ReportParams) -> tuple[str, Gate]:
    """Markdown for the pull request and the gate verdict."""
    metrics_md = dvc(repo, "metrics", "diff", base, "--md") or "_no metric changed_\n"
    params_md = dvc(repo, "params", "diff", base, "--md") or "_no param changed_\n"
    diff = json.loads(dvc(repo, "metrics", "diff", base, "--json") or "{}")
    file, _ = split_metric(params.gate_metric)
    current_path = repo / file
    current = json.loads(current_path.read_text()) if current_path.is_file() else {}
    gate = check_gate(diff, params, current)
    icon = "✅" if gate.passed else "❌"
    verdict = f"{icon} **{gate.metric}**: {gate.old} → {gate.new} (tolerance {gate.tolerance})"
    markdown = (
        f"## medpipe: results against `{base}`\n\n{verdict}\n\n### Metrics\n\n"
        f"{metrics_md}\n### Params\n\n{params_md}"
    )
    return markdown, gate
