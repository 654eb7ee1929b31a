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
    drop = check_gate(diff, params, {})  # no predictions, no spread: neither noise known
    assert drop.passed and drop.undecided and "cannot separate" in drop.describe(0.95)
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


@pytest.mark.parametrize(("new_f1", "undecided"), [(0.7, True), (0.79, False), (0.85, False)])
def test_pr_summary_without_predictions_or_spread_says_it_cannot_judge(
    repo: Path, subprocess_env: dict, new_f1: float, undecided: bool
):
    (repo / "metrics/evaluate.json").write_text(json.dumps({"f1_macro": new_f1, "accuracy": 0.9}))
    done = run(repo, subprocess_env, "medpipe", "pr-summary", "--base", "main")
    assert done.returncode == 0, done.stderr  # neither noise measured: never a failure
    assert "## medpipe: results against `main`" in done.stdout
    assert "| metrics/evaluate.json | f1_macro" in done.stdout  # dvc's Markdown table
    assert f"**f1_macro**: 0.8000 → {new_f1:.4f}" in done.stdout
    assert ("⚠️" in done.stdout and "cannot separate training noise" in done.stdout) == undecided


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


def write_spread(repo: Path, frames: list[pd.DataFrame]) -> None:
    """metrics/spread/ as `medpipe spread` writes it, for these trainings (seeds 0, 1, ...)."""
    import yaml

    from stages.lib import metrics, spread

    rows = []
    (repo / "metrics/spread").mkdir(parents=True, exist_ok=True)
    for seed, frame in enumerate(frames):
        y = frame["label"].map({"normal": 0, "bacterial": 1, "viral": 2}).to_numpy()
        probs = frame[[c for c in frame if c.startswith("prob_")]].to_numpy()
        rows.append({"seed": seed} | metrics.summarize(y, probs))
        frame.to_csv(repo / f"metrics/spread/seed-{seed}.csv", index=False)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    record = spread.summary(spread.recipe_of(params), rows, 0.0)
    (repo / "metrics/spread/summary.json").write_text(json.dumps(record))


def flipped(right: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    """Another training of the same recipe: `n` patients flip either way."""
    out = right.copy()
    out[rng.choice(len(right), n, replace=False)] ^= True
    return out


def test_gate_tells_training_noise_from_a_real_drop(repo: Path, subprocess_env: dict):
    """Base run without a spread: another seed that moves F1 beyond test noise passes with
    the plain statement that training noise is unknown. With the base's spread recorded,
    it passes "within training noise"; a broken model fails "worse beyond both", and the
    message names the metric and both intervals."""
    rng = np.random.default_rng(0)
    base_right = rng.random(150) < 0.8
    write_run(repo, predictions(150, base_right, seed=1))
    for cmd in (("git", "add", "-A"), ("git", "commit", "-qm", "base run")):
        assert run(repo, subprocess_env, *cmd).returncode == 0
    other_seed = flipped(base_right, rng, 30)
    other_seed[np.flatnonzero(other_seed)[:8]] = False  # this seed happens to be worse
    write_run(repo, predictions(150, other_seed, seed=1))
    done = run(repo, subprocess_env, "medpipe", "pr-summary", "--base", "main")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Training noise is not recorded" in done.stdout
    assert "McNemar exact" in done.stdout and "DeLong" in done.stdout

    seeds = [base_right, flipped(base_right, rng, 30), flipped(base_right, rng, 30)]
    write_spread(repo, [predictions(150, r, seed=1) for r in seeds])
    write_run(repo, predictions(150, base_right, seed=1))  # main's run is its seed 0
    for cmd in (("git", "add", "-A"), ("git", "commit", "-qm", "spread")):
        assert run(repo, subprocess_env, *cmd).returncode == 0
    write_run(repo, predictions(150, other_seed, seed=1))
    done = run(repo, subprocess_env, "medpipe", "pr-summary", "--base", "main")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| f1_macro |" in done.stdout and "main (3 seeds)" in done.stdout
    assert "within training noise" in done.stdout or "within test noise" in done.stdout
    assert "Training noise from the seed-to-seed spread (3 training(s) of the base" in done.stdout

    broken = rng.random(150) < 0.4  # e.g. one epoch, or shuffled training labels
    write_run(repo, predictions(150, broken, seed=1))
    done = run(repo, subprocess_env, "medpipe", "pr-summary", "--base", "main")
    assert done.returncode == 1
    assert "gate failed: **f1_macro**" in done.stderr and "worse beyond both" in done.stderr
    assert "one-sided 95% bounds: test noise [-" in done.stderr
    assert "with training noise" in done.stderr


def test_diff_resamples_even_when_evaluate_intervals_are_off():
    from stages.tools import diff

    rng = np.random.default_rng(3)
    base = predictions(60, rng.random(60) < 0.8, seed=1)
    head = predictions(60, rng.random(60) < 0.8, seed=1)
    result = diff.compare(base, head, n_resamples=0, seed=0)  # evaluate.bootstrap: 0
    lo, hi = result.rows["f1_macro"]["ci"]
    assert lo < hi  # a real interval, not one resample's single value
