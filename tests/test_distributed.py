"""`torchrun` on CPU (gloo): DistributedDataParallel training writes one set of outputs."""

from __future__ import annotations

import subprocess
import sys
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


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="127.0.0.2 is a loopback address on Linux")
def test_two_torchrun_nodes_on_loopback_write_one_model_on_the_head_node(tmp_path, subprocess_env):
    """Two "machines" (two folders with the same data, as two checkouts would have), one
    torchrun agent each, meeting through c10d rendezvous on loopback, one process per node
    (gloo). c10d orders the nodes by address, so the head node (127.0.0.1, which also hosts
    the rendezvous) becomes group rank 0, and rank 0 alone writes the outputs."""
    override = {"train": {"epochs": 2, "batch_size": 16, "patience": 2}}
    head, worker = project(tmp_path / "head", override), project(tmp_path / "worker", override)
    endpoint = f"127.0.0.1:{free_port()}"

    def node(root: Path, address: str) -> subprocess.Popen:
        cmd = [
            f"{BIN}/torchrun", "--nnodes", "2", "--nproc_per_node", "1",
            "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", "medpipe-test",
            "--local_addr", address, "-m", "stages", "train",
        ]  # fmt: skip
        return subprocess.Popen(
            cmd, cwd=root, env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip

    first = node(head, "127.0.0.1")  # the head node starts first and hosts the rendezvous
    second = node(worker, "127.0.0.2")
    try:
        outputs = [p.communicate(timeout=600)[0] for p in (first, second)]
    finally:  # a hung node must not outlive the test
        for p in (first, second):
            p.kill()
    assert first.returncode == 0 and second.returncode == 0, outputs[0][-3000:] + outputs[1][-3000:]
    assert "train: rank 1 of 2 done" in outputs[1]
    assert not (worker / "models").exists() and not (worker / "metrics").exists()
    summary = read_result(head / "metrics/train.json")
    assert summary["processes"] == 2 and summary["epochs_run"] == 2
    checkpoint = torch.load(head / "models/model.pt", weights_only=True)
    assert checkpoint["meta"]["classes"] == ["a", "b"] and checkpoint["state_dict"]
