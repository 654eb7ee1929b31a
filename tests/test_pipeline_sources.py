"""End to end on a MedMNIST-format file: `dvc exp run -S data.source=npz -S data.path=...`."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.conftest import ROOT, write_params
from tests.datasets import medmnist_arrays, write_npz
from tests.test_pipeline import STAGES, ran, sh

pytestmark = pytest.mark.slow


@pytest.fixture
def repo(tmp_path) -> Path:
    path = tmp_path / "repo"
    path.mkdir()
    shutil.copytree(ROOT / "stages", path / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore", "pyproject.toml"):
        shutil.copy(ROOT / name, path / name)
    write_params(path / "params.yaml")
    return path


def test_exp_run_on_a_medmnist_file(repo, tmp_path, subprocess_env):
    npz = tmp_path / "pneumoniamnist.npz"  # outside the repo, as a user's download would be
    write_npz(npz, medmnist_arrays("gray", n=(120, 30, 40)))
    for cmd in (("git", "init", "-q", "-b", "main"), ("dvc", "init", "-q")):
        sh(repo, subprocess_env, *cmd)
    sh(repo, subprocess_env, "git", "add", "-A")
    sh(repo, subprocess_env, "git", "commit", "-qm", "init")
    out = sh(
        repo,
        subprocess_env,
        "dvc",
        "exp",
        "run",
        "-S",
        "data.source=npz",
        "-S",
        f"data.path={npz}",
    )
    assert ran(out) == set(STAGES)
    assert re.search(r"^download: 190 images .*\(normal 95, pneumonia 95\)", out, re.M), out
    assert re.search(r"^split: official: train 120 .* duplicate overlap 0", out, re.M), out
    card = json.loads((repo / "data/raw/dataset.json").read_text())
    assert card["source"] == "npz" and card["classes"] == ["normal", "pneumonia"]
    split = json.loads((repo / "metrics/split.json").read_text())
    assert split["test"]["n_images"] == 40 and split["duplicate_overlap"] == 0
    result = json.loads((repo / "metrics/evaluate.json").read_text())
    assert result["n_test"] == 40 and 0 <= result["accuracy"] <= 1
    assert (repo / "reports/report.html").stat().st_size > 10_000
    raw = sorted(p.name for p in (repo / "data/raw").iterdir())
    assert raw == ["dataset.json", "manifest.csv", "rejected.csv", "source.npz", "thumbnails.npy"]
