"""`medpipe pr-summary` in a real git + DVC repo: the gate fails on a drop, else passes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

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
        assert "dropped from 0.8 to 0.7" in done.stderr
