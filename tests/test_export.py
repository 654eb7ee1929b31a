"""TorchScript and ONNX exports give PyTorch's probabilities (within 1e-4) and carry the meta."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from stages import export
from stages.lib.inference import predict
from stages.lib.io import read_result
from stages.lib.params import ExportParams
from tests.conftest import tiny_processed


# multiclass is exported in tests/test_cli.py::test_export on the trained tiny project
@pytest.mark.parametrize(("task", "n_classes"), [("multilabel", 4)])
def test_exports_match_pytorch(tmp_path, task, n_classes):
    classes = [f"c{k}" for k in range(n_classes)]
    processed, checkpoint = tiny_processed(tmp_path, task, classes, n=12)
    ts, onnx_file, metrics = tmp_path / "m.ts", tmp_path / "m.onnx", tmp_path / "export.json"
    line = export.run(ExportParams(check_images=8), processed, checkpoint, ts, onnx_file, metrics)
    assert line.startswith("export: ")
    summary = read_result(metrics)
    assert summary["n_checked"] == 8
    assert summary["torchscript_max_abs_diff"] <= 1e-4 and summary["onnx_max_abs_diff"] <= 1e-4
    assert not list(tmp_path.glob("*.data")) and not list(tmp_path.glob(".*.tmp"))  # one file

    # independently: load both files and compare with the PyTorch path evaluate uses
    from stages.lib.inference import load_model

    loaded = load_model(checkpoint, "cpu")
    model, meta = loaded.net, loaded.meta
    images = np.load(processed / "test_images.npy")
    expected = predict(model, images, meta, 5, torch.device("cpu"))
    pixels = images.transpose(0, 3, 1, 2).astype(np.float32)
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    got_onnx = session.run(None, {"pixels": pixels})[0]  # batch 12: the batch axis is dynamic
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(str(ts))
    with torch.inference_mode():
        got_ts = scripted(torch.from_numpy(pixels)).numpy()
    assert np.abs(got_onnx - expected).max() < 1e-4
    assert np.abs(got_ts - expected).max() < 1e-4
    sums = expected.sum(axis=1)
    assert np.allclose(sums, 1.0, atol=1e-5) == (task != "multilabel")  # softmax vs sigmoid

    props = {p.key: p.value for p in onnx.load(str(onnx_file)).metadata_props}
    info = json.loads(props["medpipe"])
    assert info["classes"] == meta.classes and info["preprocess"]["size"] == 32


def test_exports_and_checkpoints_are_byte_stable(tmp_path):
    """Same content, same bytes: DVC sees an unchanged file and reruns nothing after it
    (temporary file names must not leak into the archives). One process per run, as DVC
    runs a stage: TorchScript numbers a class traced twice in one process."""
    processed, checkpoint = tiny_processed(tmp_path, "multiclass", ["a", "b", "c"], n=8)
    script = (
        "import sys; from pathlib import Path\n"
        "from stages import export\n"
        "from stages.lib.inference import load_model\n"
        "from stages.lib.models import save_checkpoint\n"
        "from stages.lib.params import ExportParams\n"
        "out, processed, checkpoint = (Path(a) for a in sys.argv[1:])\n"
        "loaded = load_model(checkpoint, 'cpu')\n"
        "save_checkpoint(out / 'model.pt', loaded.net, loaded.meta)\n"
        "export.run(ExportParams(check_images=4), processed, out / 'model.pt',\n"
        "           out / 'model.ts', out / 'model.onnx', out / 'export.json')\n"
    )
    runs = []
    for run in ("one", "two"):
        out = tmp_path / run
        args = [sys.executable, "-c", script, str(out), str(processed), str(checkpoint)]
        subprocess.run(args, check=True, capture_output=True, timeout=300)
        runs.append([(out / n).read_bytes() for n in ("model.pt", "model.ts", "model.onnx")])
    for name, first, second in zip(("pt", "ts", "onnx"), *runs, strict=True):
        assert first == second, name
