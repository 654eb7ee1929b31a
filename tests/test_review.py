"""`medpipe pr-summary` in a real git + DVC repo: the gate fails on a drop, else passes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stages.lib.params import ReportParams
from stages.tools.review import Gate, check_gate
from tests.conftest import write_params

DVC_YAML = """stages:
  evaluate:
    cmd: python -c "print('evaluated')"
    params: [evaluate]
    metrics:
      - metrics/evaluate.json:
          cache: false
"""


def test_gate_uses_diff_or_current_value():
    params = ReportParams(gate_metric="f1_macro", gate_tolerance=0.02)
    diff = {"metrics/evaluate.json": {"f1_macro": {"old": 0.8, "new": 0.7, "diff": -0.1}}}
    assert not check_gate(diff, params, {}).passed
    assert check_gate({}, params, {"f1_macro": 0.8}).passed  # unchanged
    assert Gate("x", 0.8, 0.79, 0.02).passed and not Gate("x", 0.8, None, 0.02).passed


def run(repo: Path, env: dict, *cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300, check=False
    )


@pytest.fixture
def repo(tmp_path: Path, subprocess_env: dict) -> Path:
    for cmd in (("git", "init", "-q", "-b", "main"), ("dvc", "init", "-q")):
        assert run(tmp_path, subprocess_env, *cmd).returncode == 0
    write_params(tmp_path / "params.yaml")
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/evaluate.json").write_text(json.dumps({"f1_macro": 0.8, "accuracy": 0.9}))
    for cmd in (("git", "add", "-A"), ("git", "commit", "-qm", "base")):
        assert run(tmp_path, subprocess_env, *cmd).returncode == 0
    return tmp_path


@pytest.mark.parametrize(("new_f1", "code"), [(0.7, 1), (0.79, 0), (0.85, 0)])
def test_pr_summary_gate(repo: Path, subprocess_env: dict, new_f1: float, code: int):
    (repo / "metrics/evaluate.json").write_text(json.dumps({"f1_macro": new_f1, "accuracy": 0.9}))
    done = run(repo, subprocess_env, "medpipe", "pr-summary", "--base", "main")
    assert done.returncode == code, done.stderr
    assert "## medpipe: results against `main`" in done.stdout
    assert "| metrics/evaluate.json | f1_macro" in done.stdout  # dvc's Markdown table
    if code:
        assert "gate failed: **f1_macro**: 0.8 → 0.7" in done.stderr
        assert "not paired" in done.stderr  # no per-image predictions: the drop alone


def predictions(n_patients: int, right: np.ndarray, seed: int) -> pd.DataFrame:
    """plots/evaluate/predictions.csv of a 3-class model: 2 images per patient; `right`
    says per patient whether the model is right on both images."""
    rng = np.random.default_rng(seed)
    classes = ["normal", "bacterial", "viral"]
    y = rng.integers(0, 3, 2 * n_patients)
    ok = np.repeat(right, 2)
    pred = np.where(ok, y, (y + 1) % 3)
    probs = rng.uniform(0.0, 0.2, (len(y), 3))
    probs[np.arange(len(y)), pred] += 0.8
    probs /= probs.sum(axis=1, keepdims=True)
    frame = pd.DataFrame(
        {
            "image": [f"img{i}.png" for i in range(len(y))],
            "patient_id": np.repeat([f"p{i}" for i in range(n_patients)], 2),
            "label": np.array(classes)[y],
        }
    )
    for k, c in enumerate(classes):
        frame[f"prob_{c}"] = probs[:, k].round(6)
    return frame


def write_run(repo: Path, frame: pd.DataFrame) -> None:
    from stages.lib import metrics

    y = frame["label"].map({"normal": 0, "bacterial": 1, "viral": 2}).to_numpy()
    probs = frame[[c for c in frame if c.startswith("prob_")]].to_numpy()
    (repo / "plots/evaluate").mkdir(parents=True, exist_ok=True)
    frame.to_csv(repo / "plots/evaluate/predictions.csv", index=False)
    summary = {k: round(v, 4) for k, v in metrics.summarize(y, probs).items()}
    (repo / "metrics/evaluate.json").write_text(json.dumps(summary))


def test_gate_passes_on_noise_and_fails_on_a_real_drop(repo: Path, subprocess_env: dict):
    """Base run; a harmless head (another seed: a few patients flip either way) passes
    "within noise" though its F1 may move by more than the tolerance; a broken model fails
    and the message names the metric and its paired interval."""
    rng = np.random.default_rng(0)
    base_right = rng.random(150) < 0.85
    write_run(repo, predictions(150, base_right, seed=1))
    for cmd in (("git", "add", "-A"), ("git", "commit", "-qm", "base run")):
        assert run(repo, subprocess_env, *cmd).returncode == 0
    harmless = base_right.copy()
    harmless[rng.choice(150, 12, replace=False)] ^= True  # seed noise: 12 patients flip
    write_run(repo, predictions(150, harmless, seed=1))
    done = run(repo, subprocess_env, "medpipe", "pr-summary", "--base", "main")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "within noise" in done.stdout and "| f1_macro |" in done.stdout
    assert (
        "Paired on the same 300 test images" in done.stdout and "resampling patients" in done.stdout
    )
    assert "McNemar exact" in done.stdout and "DeLong" in done.stdout

    broken = rng.random(150) < 0.45  # e.g. one epoch, or shuffled training labels
    write_run(repo, predictions(150, broken, seed=1))
    done = run(repo, subprocess_env, "medpipe", "pr-summary", "--base", "main")
    assert done.returncode == 1
    assert "gate failed: **f1_macro**" in done.stderr
    assert "95% paired interval [-" in done.stderr and "beyond noise" in done.stderr
    assert "| f1_macro |" in done.stdout and "| worse |" in done.stdout


def test_diff_resamples_even_when_evaluate_intervals_are_off():
    from stages.tools import diff

    rng = np.random.default_rng(3)
    base = predictions(60, rng.random(60) < 0.8, seed=1)
    head = predictions(60, rng.random(60) < 0.8, seed=1)
    result = diff.compare(base, head, n_resamples=0, seed=0)  # evaluate.bootstrap: 0
    lo, hi = result.rows["f1_macro"]["ci"]
    assert lo < hi  # a real interval, not one resample's single value
