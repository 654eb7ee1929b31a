"""Inference: a loaded model as one object, batched prediction (optionally with test-time
augmentation), the exported end-to-end module (pixels in, probabilities out) and latency.

`load_model` is `checkpoint.load_checkpoint` (the one reader of model.pt) plus a device
choice and `models.build_from_checkpoint`: what every stage and tool scores with."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from statistics import median

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from stages.lib import paths
from stages.lib.checkpoint import ModelMeta, load_checkpoint
from stages.lib.io import ArrayRows, check_model_matches_data, read_processed
from stages.lib.labels import targets
from stages.lib.models import build_from_checkpoint, memory_format, select_device

TTA_SHIFT = 1 / 32  # of the image side: 2 px at 64 px


TTA_ZOOM = 1.06


def normalize(batch: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> normalised float32."""
    return (batch.float() / 255 - mean) / std


def to_tensor_batch(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, C) uint8 array -> (B, C, H, W) uint8 tensor."""
    return torch.from_numpy(np.array(images)).permute(0, 3, 1, 2)  # copy: memmaps are read-only


def iter_batches(images: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Consecutive batches, each read into memory (a memory-mapped array's pages are not
    mapped into the process: see `ArrayRows`)."""
    rows = ArrayRows(images)
    for start in range(0, len(images), batch_size):
        yield rows.slice(start, start + batch_size)


def to_probabilities(logits: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Softmax over classes, or independent sigmoids for multi-label tasks."""
    logits = logits.float()
    return logits.sigmoid() if multilabel else logits.softmax(dim=1)


def tta_views(x: torch.Tensor) -> list[torch.Tensor]:
    """Identity, four small shifts (edge pixels repeated) and a slight zoom of (B, C, H, W).

    No flips: a chest radiograph mirrored is not the same anatomy (heart, side markers).
    """
    h, w = x.shape[-2:]
    d = max(1, round(TTA_SHIFT * min(h, w)))
    padded = F.pad(x, (d, d, d, d), mode="replicate")
    views = [x]
    for dy, dx in ((0, -d), (0, d), (-d, 0), (d, 0)):
        views.append(padded[..., d + dy : d + dy + h, d + dx : d + dx + w])
    ch, cw = round(h / TTA_ZOOM), round(w / TTA_ZOOM)
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = x[..., top : top + ch, left : left + cw]
    views.append(F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False))
    return views


@torch.inference_mode()
def predict(
    model: nn.Module,
    images: np.ndarray,
    meta: ModelMeta,
    batch_size: int,
    device: torch.device,
    features: bool = False,
    tta: bool = False,
) -> np.ndarray:
    """Class probabilities (N, K) (softmax; sigmoid for multi-label), or penultimate features
    (N, D) when `features`. `tta` averages the probabilities over `tta_views`."""
    mean, std = meta.normalization(device)
    model.eval()
    out = []
    for chunk in iter_batches(images, batch_size):
        x = normalize(to_tensor_batch(chunk).to(device), mean, std)
        x = x.contiguous(memory_format=memory_format(device))
        if features:
            y = model.forward_head(model.forward_features(x), pre_logits=True)
        elif tta:
            y = torch.stack(
                [to_probabilities(model(v), meta.multilabel) for v in tta_views(x)]
            ).mean(0)
        else:
            y = to_probabilities(model(x), meta.multilabel)
        out.append(y.float().cpu().numpy())
    return np.concatenate(out)


class ExportedClassifier(nn.Module):
    """The model as exported (model.ts, model.onnx): float pixel values 0..255 (B, C, S, S)
    in, probabilities out.

    Normalisation and the output activation are inside, so an exported graph needs only
    `stages.lib.images.prepare_image` in front of it.
    """

    def __init__(self, model: nn.Module, meta: ModelMeta) -> None:
        super().__init__()
        self.model = model
        self.multilabel = meta.multilabel
        mean, std = meta.normalization()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(normalize(x, self.mean, self.std)).float()
        return logits.sigmoid() if self.multilabel else logits.softmax(dim=1)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.inference_mode()
def measure_latency(
    model: nn.Module, meta: ModelMeta, device: torch.device, runs: int = 50, warmup: int = 10
) -> float:
    """Median milliseconds of one batch-1 forward pass (normalisation + model + activation)
    after `warmup` untimed runs, on `device`."""
    size, channels = meta.input_size, meta.channels
    module = ExportedClassifier(model, meta).to(device).eval()
    x = torch.rand(1, channels, size, size, device=device) * 255
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        module(x)
    sync()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        module(x)
        sync()
        times.append((time.perf_counter() - start) * 1000)
    return median(times)


@dataclass
class LoadedModel:
    """A checkpoint ready to score: the network (eval mode, on `device`) and its meta."""

    net: nn.Module
    meta: ModelMeta
    device: torch.device

    def predict(
        self,
        images: np.ndarray,
        batch_size: int = 256,
        *,
        features: bool = False,
        tta: bool = False,
    ) -> np.ndarray:
        """Probabilities (N, K), or penultimate features (N, D) when `features`."""
        return predict(self.net, images, self.meta, batch_size, self.device, features, tta)


@dataclass
class ScoredSplit:
    """One processed split as a model sees it: memory-mapped (N, S, S, C) images, the index
    frame, targets (class indices, or multi-hot rows) and, once scored, probabilities."""

    images: np.ndarray
    frame: pd.DataFrame
    y: np.ndarray
    probs: np.ndarray | None = None


def load_model(model_file: Path | str = paths.MODEL, device: str = "auto") -> LoadedModel:
    """The checkpoint on the chosen device (auto: CUDA, then MPS, then CPU)."""
    torch_device = select_device(device)
    checkpoint = load_checkpoint(model_file)
    return LoadedModel(
        build_from_checkpoint(checkpoint, torch_device), checkpoint.meta, torch_device
    )


def read_split(model: LoadedModel, processed_dir: Path | str, split: str = "test") -> ScoredSplit:
    """A processed split the model can be scored on (same classes, in order, and task)."""
    images, frame, data_meta = read_processed(processed_dir, split)
    check_model_matches_data(model.meta.to_dict(), data_meta, processed_dir)
    return ScoredSplit(images, frame, targets(frame, data_meta))


def score_split(
    model: LoadedModel,
    processed_dir: Path | str,
    split: str = "test",
    batch_size: int = 256,
    tta: bool = False,
) -> ScoredSplit:
    """`read_split` plus the model's probabilities for every image."""
    scored = read_split(model, processed_dir, split)
    scored.probs = model.predict(scored.images, batch_size, tta=tta)
    return scored
