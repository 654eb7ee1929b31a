"""The pull-request gate end to end with real training, real git and real DVC: a harmless
change passes within noise, a broken model fails and the message names the metric and its
paired interval. Easy synthetic data (difficulty 0), so that a small model trained in
seconds is good enough for a broken one to be told from noise on 64 test images."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, write_params

pytestmark = pytest.mark.slow
EASY = {  # one site, split by patient: the gate compares runs, not populations
    "data": {"synthetic": {"n_patients": 240, "difficulty": 0.0, "sites": [], "test_site": None}},
    "train": {"epochs": 6, "patience": 6},
}


def run(repo: Path, env: dict, *cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=900)


def ok(repo: Path, env: dict, *cmd: str) -> str:
    done = run(repo, env, *cmd)
    assert done.returncode == 0, f"{' '.join(cmd)}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> tuple[Path, dict]:
    import os
    import sys

    repo = tmp_path_factory.mktemp("gate")
    shutil.copytree(ROOT / "stages", repo / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore", ".dvcignore", "pyproject.toml"):
        shutil.copy(ROOT / name, repo / name)
    write_params(repo / "params.yaml", EASY)
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    for key in ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME"):
        env[key] = "medpipe-test"
    for key in ("GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL"):
        env[key] = "test@example.invalid"
    ok(repo, env, "git", "init", "-q", "-b", "main")
    ok(repo, env, "dvc", "init", "-q")
    ok(repo, env, "dvc", "repro")
    ok(repo, env, "git", "add", "-A")
    ok(repo, env, "git", "commit", "-qm", "baseline run")
    return repo, env


def test_a_harmless_change_passes_within_noise(baseline):
    repo, env = baseline
    ok(repo, env, "dvc", "exp", "run", "-S", "train.seed=1")
    out = ok(repo, env, "medpipe", "pr-summary", "--base", "main")
    assert "✅ **f1_macro**" in out and "Paired on the same 64 test images" in out
    ok(repo, env, "git", "checkout", "-q", "--", ".")
    ok(repo, env, "dvc", "checkout", "-q", "-f")


def test_a_broken_model_fails_naming_the_metric_and_interval(baseline):
    repo, env = baseline
    ok(repo, env, "dvc", "exp", "run", "-S", "train.epochs=1")
    done = run(repo, env, "medpipe", "pr-summary", "--base", "main")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "gate failed: **f1_macro**" in done.stderr
    assert "95% paired interval [-" in done.stderr and "beyond noise" in done.stderr
    assert "| f1_macro |" in done.stdout and "| worse |" in done.stdout
