"""`medpipe pr-summary`: Markdown for a pull request and a gate that fails only on a real drop.

The gate metric is compared paired, on the same test images, the way `medpipe diff` does:
against main's recorded spread (`medpipe spread`: K trainings of its recipe) when there is
one. The check fails only when the drop is larger than `report.gate_tolerance` *and*
beyond both test-sampling noise and training noise at `report.gate_level`
(`stages.lib.noise`). Without a recorded spread the gate cannot tell another seed or CPU
from a change: it says so, says how to record one, and passes. Hardware figures (timings,
latency) are listed apart, never gated.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from stages.lib import metric_registry, noise, paths
from stages.lib.errors import ToolFailed
from stages.lib.gitrepo import require_revisions
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
    """The verdict on one metric: old and new values (means over recorded trainings), the
    intervals of the difference, the noise verdict, and whether the drop is tolerated."""

    metric: str
    old: float | None
    new: float | None
    tolerance: float
    ci: list[float] | None = None  # test + training noise (test noise alone without spread)
    verdict: str = noise.NOT_JUDGED
    test_ci: list[float] | None = None
    training_sd: float | None = None

    @property
    def passed(self) -> bool:
        if self.old is None or self.new is None:
            return self.new is not None  # a new metric passes; a vanished one fails
        return not (
            self.worsened and self.verdict == noise.WORSE
        )  # beyond tolerance and both noises

    @property
    def undecided(self) -> bool:
        """A drop beyond the tolerance that the gate cannot attribute (a noise not measured)."""
        if self.old is None or self.new is None:
            return False
        explained = (noise.WORSE, noise.WITHIN_TEST, noise.WITHIN_TRAINING)
        return self.worsened and self.verdict not in explained

    @property
    def worsened(self) -> bool:
        """Worse by more than the tolerance, in the metric's direction (a drop of F1, a
        rise of ECE)."""
        assert self.old is not None and self.new is not None
        if metric_registry.higher_is_better(self.metric):
            return self.new < self.old - self.tolerance
        return self.new > self.old + self.tolerance

    def describe(self, level: float) -> str:
        if self.old is None and self.new is None:
            return f"**{self.metric}**: in neither run (run `medpipe evaluate` and commit metrics/)"
        if self.old is None:
            return (
                f"**{self.metric}**: {self.new:.4f}; the base has no value to compare with "
                "(its metrics were never committed): passes"
            )
        if self.new is None:
            return (
                f"**{self.metric}**: missing here (base {self.old:.4f}); run the pipeline "
                "(`dvc repro`) and commit its metrics"
            )
        text = f"**{self.metric}**: {self.old:.4f} → {self.new:.4f} ({self.new - self.old:+.4f}"
        if self.test_ci is not None:
            text += f"; one-sided {level:.0%} bounds: "
            text += "test noise [{:+.4f}, {:+.4f}]".format(*self.test_ci)
        if self.training_sd is not None and self.ci is not None:
            text += ", with training noise (seed sd {:.4f}) [{:+.4f}, {:+.4f}]".format(
                self.training_sd, *self.ci
            )
        text += f": {self.verdict}; tolerance {self.tolerance})"
        if self.undecided:
            text += (
                ". ⚠️ The gate cannot separate training noise from a change here: record the "
                "base's spread (`medpipe spread --seeds 3` on main, commit `metrics/spread/`)"
                if self.training_sd is None
                else ". ⚠️ Test noise was not assessed (no paired per-image predictions)"
            )
        return text


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
                params.gate_metric, row["base"], row["head"], params.gate_tolerance,
                row["ci"], row["verdict"], row["test_ci"], row["training_sd"],
            )  # fmt: skip
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
    before = diff.load_side(repo, base, base)
    after = diff.load_side(repo, None, "this branch")
    if before is None or after is None:
        where = base if before is None else "the workspace"
        reason = f"no per-image predictions ({paths.PREDICTIONS}) in {where}"
        return None, reason, base, "this branch"
    comparison = diff.judge_sides(before, after, evaluate.bootstrap, evaluate.seed, level)
    return comparison, comparison.reason, before.label, after.label


def summarize(
    repo: Path, base: str, params: ReportParams, evaluate: EvaluateParams | None = None
) -> tuple[str, Gate]:
    """Markdown for the pull request and the gate verdict."""
    evaluate = evaluate or EvaluateParams()
    require_revisions(repo, [base], "pr-summary")
    comparison, reason, base_label, head_label = paired_comparison(
        repo, base, evaluate, params.gate_level
    )
    metrics_md = dvc(repo, "metrics", "diff", base, "--md") or "_no metric changed_\n"
    params_md = dvc(repo, "params", "diff", base, "--md") or "_no param changed_\n"
    diff_json = json.loads(dvc(repo, "metrics", "diff", base, "--json") or "{}")
    file, _ = split_metric(params.gate_metric)
    current_path = repo / file
    current = json.loads(current_path.read_text()) if current_path.is_file() else {}
    gate = check_gate(diff_json, params, current, comparison)
    icon = "❌" if not gate.passed else "⚠️" if gate.undecided else "✅"
    results = (
        diff.markdown(comparison, base_label, head_label)
        if comparison is not None
        else f"_not compared: {reason}; neither noise can be assessed_\n"
    )
    markdown = (
        f"## medpipe: results against `{base}`\n\n{icon} {gate.describe(params.gate_level)}\n\n"
        f"### Results, paired on the test images\n\n{results}\n"
        f"### All metrics (`dvc metrics diff`)\n\n{metrics_md}\n"
        f"### Hardware-dependent figures\n\n{hardware_table(repo)}\n"
        f"### Params\n\n{params_md}"
    )
    return markdown, gate
