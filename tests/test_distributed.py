"""`torchrun` on CPU (gloo): DistributedDataParallel training writes one set of outputs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch

from stages.lib.io import read_result
from tests.conftest import BIN, write_params
from tests.test_train import write_processed

OVERRIDE = {
    "train": {"epochs": 2, "batch_size": 16, "patience": 2, "sampler": "none"},
    "model": {"freeze_epochs": 1},  # exercises re-wrapping DDP when the backbone unfreezes
}


def project(root: Path, override: dict) -> Path:
    write_processed(root, ["a", "b"])
    write_params(root / "params.yaml", override)
    return root


def check_outputs(root: Path, out: str) -> None:
    assert sorted(p.name for p in (root / "models").iterdir()) == ["last.pt", "model.pt"]
    assert sorted(p.name for p in (root / "metrics").iterdir()) == ["detail", "train.json"]
    assert sorted(p.name for p in (root / "plots").iterdir()) == ["train"]  # no stray temp dirs
    summary = read_result(root / "metrics/train.json")
    assert summary["processes"] == 2 and summary["epochs_run"] == 2
    assert {"best_epoch", "best_val_f1_macro", "train_seconds", "images_per_second"} <= set(summary)
    history = pd.read_csv(root / "plots/train/history.csv")
    assert list(history["epoch"]) == [1, 2]
    meta = torch.load(root / "models/model.pt", weights_only=True)["meta"]
    assert meta["classes"] == ["a", "b"] and meta["params"]["train"]["epochs"] == 2
    assert out.count("train: resnet10t") == 1 and "train: rank 1 of 2 done" in out


def run(cmd: list[str], root: Path, env: dict) -> str:
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout + done.stderr


def test_torchrun_two_cpu_processes_write_one_model_and_one_metrics_file(tmp_path, subprocess_env):
    root = project(tmp_path, OVERRIDE)
    out = run([f"{BIN}/torchrun", "--nproc_per_node", "2", "-m", "stages", "train"], root,
              subprocess_env)  # fmt: skip
    check_outputs(root, out)


@pytest.mark.slow
def test_nproc_per_node_relaunches_medpipe_train_under_torchrun(tmp_path, subprocess_env):
    override = {**OVERRIDE, "train": {**OVERRIDE["train"], "nproc_per_node": 2}}
    root = project(tmp_path, override)
    out = run([f"{BIN}/medpipe", "train"], root, subprocess_env)
    check_outputs(root, out)
