"""Models: timm factory, device choice, checkpoint format and batched inference."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from torch import nn

from stages.io import atomic_path
from stages.params import ModelParams

CHECKPOINT_FORMAT = 1


def select_device(name: str = "auto") -> torch.device:
    """auto picks CUDA, then Apple MPS, then CPU; an explicit name must be available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device: cuda requested but no CUDA device is visible; use auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("train.device: mps requested but MPS is not available; use auto")
    return torch.device(name)


def build_model(params: ModelParams, num_classes: int, in_chans: int) -> nn.Module:
    """A timm model with a fresh `num_classes` head for `in_chans` input channels.

    Pretrained weights come from `model.weights` (a local file; timm adapts the first conv
    to `in_chans` and drops a mismatched head) or timm's own cache/hub.
    """
    kwargs: dict[str, Any] = {
        "num_classes": num_classes,
        "in_chans": in_chans,
        "drop_rate": params.dropout,
    }
    if not params.pretrained:
        return timm.create_model(params.name, pretrained=False, **kwargs)
    if params.weights:
        path = Path(params.weights)
        if not path.is_file():
            raise FileNotFoundError(f"model.weights: {path} not found")
        kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
    try:
        return timm.create_model(params.name, pretrained=True, **kwargs)
    except Exception as exc:  # hub unreachable, no cache: say how to provide weights
        raise RuntimeError(
            f"model.pretrained: no weights for {params.name!r} could be loaded ({exc}). "
            "Set model.weights to a local state-dict file, pre-populate the timm/Hugging Face "
            "cache (HF_HOME), or set model.pretrained false to train from scratch."
        ) from exc


def normalize(batch: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> normalised float32."""
    return (batch.float() / 255 - mean) / std


def to_tensor_batch(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, C) uint8 array -> (B, C, H, W) uint8 tensor."""
    return torch.from_numpy(np.array(images)).permute(0, 3, 1, 2)  # copy: memmaps are read-only


def save_checkpoint(path: Path | str, model: nn.Module, meta: dict[str, Any]) -> None:
    """Weights plus everything needed to use them alone (timm name, classes, preprocessing)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"format": CHECKPOINT_FORMAT, "state_dict": state, "meta": meta}, tmp)


def load_checkpoint(path: Path | str, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model from `model.pt` (weights_only: no code runs on load)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model checkpoint not found (run `medpipe train`)")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    meta = blob["meta"]
    model = timm.create_model(
        meta["model_name"],
        pretrained=False,
        num_classes=len(meta["classes"]),
        in_chans=meta["channels"],
    )
    model.load_state_dict(blob["state_dict"])
    return model.to(device).eval(), meta


def iter_batches(images: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(images), batch_size):
        yield images[start : start + batch_size]


@torch.inference_mode()
def predict(
    model: nn.Module,
    images: np.ndarray,
    meta: dict,
    batch_size: int,
    device: torch.device,
    features: bool = False,
) -> np.ndarray:
    """Softmax probabilities (N, K), or penultimate features (N, D) when `features`."""
    mean = torch.tensor(meta["mean"], device=device).view(1, -1, 1, 1)
    std = torch.tensor(meta["std"], device=device).view(1, -1, 1, 1)
    model.eval()
    out = []
    for chunk in iter_batches(images, batch_size):
        x = normalize(to_tensor_batch(chunk).to(device), mean, std)
        if features:
            y = model.forward_head(model.forward_features(x), pre_logits=True)
        else:
            y = model(x).float().softmax(dim=1)
        out.append(y.float().cpu().numpy())
    return np.concatenate(out)
