"""export stage: TorchScript and ONNX copies of the model, each checked against PyTorch.

Both take float32 pixel values 0..255 of shape (B, C, S, S) — the output of
`stages.lib.images.prepare_image`, channels first — and return class probabilities:
normalisation and softmax/sigmoid are inside the graph (`inference.ExportedClassifier`). The model's
meta (classes, preprocessing, input size) is stored in each file.

A separate stage rather than part of evaluate: changing evaluate params (bootstrap, TTA)
does not re-export, an exporter failure does not hide the test metrics, and the two run
independently after train.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from statistics import median

import numpy as np
import torch

from stages.lib import paths
from stages.lib.checkpoint import ModelMeta
from stages.lib.errors import CheckFailed
from stages.lib.inference import ExportedClassifier, load_model, read_split
from stages.lib.io import atomic_path, write_result
from stages.lib.params import ExportParams

# metrics/export.json; the checks' differences and the latency go to metrics/detail/export.json
HEADLINE = ("n_checked", "opset", "torchscript_size_mb", "onnx_size_mb")
META_KEYS = (
    "model_name",
    "classes",
    "task",
    "positive_class",
    "channels",
    "input_size",
    "mean",
    "std",
    "preprocess",
)


def deploy_meta(meta: ModelMeta) -> dict[str, str]:
    """What a consumer of the exported file needs, as strings (ONNX metadata is str -> str)."""
    info = {k: v for k, v in meta.to_dict().items() if k in META_KEYS}
    info["input"] = "float32 (B, C, S, S) pixel values 0..255 after prepare_image"
    info["output"] = "sigmoid" if meta.multilabel else "softmax"
    return {"medpipe": json.dumps(info, sort_keys=True)}


def export_torchscript(
    module: ExportedClassifier, example: torch.Tensor, path: Path, meta: ModelMeta
) -> None:
    with warnings.catch_warnings():  # torch.jit is deprecated upstream but still the format
        warnings.simplefilter("ignore", FutureWarning)  # many serving stacks load
        traced = torch.jit.trace(module, example)
        with open(path, "wb") as f:  # a file object: the archive is not named after tmp
            torch.jit.save(traced, f, _extra_files=deploy_meta(meta))


def load_torchscript(path: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location="cpu")


def export_onnx(
    module: ExportedClassifier, example: torch.Tensor, path: Path, meta: ModelMeta, opset: int
) -> None:
    """ONNX with a dynamic batch axis, weights inside the one file, meta as metadata_props."""
    import onnx

    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.onnx.export(
        module,
        (example,),
        str(path),
        input_names=["pixels"],
        output_names=["probabilities"],
        dynamic_shapes={"x": {0: batch}},
        opset_version=opset,
        external_data=False,
        verbose=False,
    )
    graph = onnx.load(str(path))
    onnx.helper.set_model_props(graph, deploy_meta(meta))
    onnx.save(graph, str(path))


def onnx_session(path: Path):  # -> onnxruntime.InferenceSession
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def onnx_latency(session, example: np.ndarray, runs: int = 50, warmup: int = 10) -> float:
    """Median ms of a batch-1 onnxruntime call on CPU after warm-up."""
    feed = {session.get_inputs()[0].name: example[:1]}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1000)
    return median(times)


def run(
    params: ExportParams,
    processed_dir: Path = paths.PROCESSED,
    model_file: Path = paths.MODEL,
    torchscript_file: Path = paths.TORCHSCRIPT,
    onnx_file: Path = paths.ONNX,
    metrics_file: Path = paths.EXPORT_METRICS,
) -> str:
    start = time.perf_counter()
    model = load_model(model_file, "cpu")  # exports are made and checked in float32 on CPU
    meta = model.meta
    check = np.array(read_split(model, processed_dir).images[: params.check_images])  # writable
    reference = model.predict(check)  # the path evaluate uses
    pixels = torch.from_numpy(check).permute(0, 3, 1, 2).float().contiguous()  # (B, C, S, S)
    module = ExportedClassifier(model.net, meta).eval()
    # both files are checked before either is renamed into place: no unchecked export ships
    with atomic_path(torchscript_file) as ts_tmp, atomic_path(onnx_file) as onnx_tmp:
        export_torchscript(module, pixels[:1], ts_tmp, meta)
        export_onnx(module, pixels[:1], onnx_tmp, meta, params.opset)
        with torch.inference_mode():
            ts_probs = load_torchscript(ts_tmp)(pixels).numpy()
        session = onnx_session(onnx_tmp)
        onnx_probs = session.run(None, {"pixels": pixels.numpy()})[0]
        diffs = {
            "torchscript": float(np.abs(ts_probs - reference).max()),
            "onnx": float(np.abs(onnx_probs - reference).max()),
        }
        worst = max(diffs, key=lambda k: diffs[k])
        if diffs[worst] > params.tolerance:
            raise CheckFailed(
                f"{worst} output differs from PyTorch by {diffs[worst]:.2e} (> export.tolerance "
                f"{params.tolerance:g}) on test images; nothing was exported"
            )
        sizes = {
            k: round(p.stat().st_size / 1e6, 2) for k, p in (("ts", ts_tmp), ("onnx", onnx_tmp))
        }
    summary = {
        "torchscript_max_abs_diff": float(f"{diffs['torchscript']:.3g}"),
        "onnx_max_abs_diff": float(f"{diffs['onnx']:.3g}"),
        "n_checked": len(check),
        "opset": params.opset,
        "torchscript_size_mb": sizes["ts"],
        "onnx_size_mb": sizes["onnx"],
        "onnx_latency_ms": round(onnx_latency(session, pixels.numpy()), 3),
    }
    write_result(metrics_file, summary, HEADLINE)
    return (
        f"export: {torchscript_file} ({summary['torchscript_size_mb']} MB), {onnx_file} "
        f"({summary['onnx_size_mb']} MB); max |diff| to PyTorch on {len(check)} test images: "
        f"TorchScript {diffs['torchscript']:.1e}, ONNX {diffs['onnx']:.1e}"
        f"; ONNX Runtime {summary['onnx_latency_ms']:.2f} ms/image "
        f"in {time.perf_counter() - start:.1f} s"
    )
