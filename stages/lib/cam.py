"""Class activation maps shared by the explain stage and `medpipe predict --cam`: the
target layer of a timm model, batched CAMs through pytorch-grad-cam, the pointing game and
heat-map overlays."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import torch
from pytorch_grad_cam import (
    EigenCAM,
    GradCAM,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    XGradCAM,
)
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from stages.lib.checkpoint import ModelMeta
from stages.lib.inference import iter_batches, normalize, to_tensor_batch
from stages.lib.models import Ensemble

CAMS = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "xgradcam": XGradCAM,
    "hirescam": HiResCAM,
    "layercam": LayerCAM,
    "eigencam": EigenCAM,
}
MIN_CAM_SIDE = 7  # cells per side of an automatically chosen CAM layer (ResNet at 224 px: 7)
TILE = 128  # px of an overlay


def find_target_layer(
    model: nn.Module, name: str = "auto", input_size: int | None = None
) -> tuple[str, nn.Module | list[nn.Module]]:
    """The module to explain; of an ensemble, that module in every member (Grad-CAM then
    averages the members' maps of the ensemble's output)."""
    if isinstance(model, Ensemble):
        found = [find_layer(m, name, input_size) for m in model.members]
        return f"members.*.{found[0][0]}", [layer for _, layer in found]
    return find_layer(model, name, input_size)


def find_layer(
    model: nn.Module, name: str = "auto", input_size: int | None = None
) -> tuple[str, nn.Module]:
    """The module to explain.

    `auto`: the deepest feature stage timm reports (e.g. layer4, blocks.6) whose map has at
    least MIN_CAM_SIDE cells per side at `input_size` — the 7 x 7 grid Grad-CAM is usually
    read on (ResNet layer4 at 224 px). At 64 px layer4 is 2 x 2: its peak can only name a
    quadrant and scored 0.00 in the pointing game on the synthetic data, so layer2 (8 x 8)
    is taken instead. Models without feature_info: the last top-level block with a conv.
    """
    if name == "auto":
        info = list(getattr(model, "feature_info", None) or [])
        if info:
            fine = [
                f
                for f in info
                if input_size is None or input_size // f["reduction"] >= MIN_CAM_SIDE
            ]
            name = (fine or info[:1])[-1]["module"]
        else:
            convs = [
                n
                for n, m in model.named_children()
                if any(isinstance(c, nn.Conv2d) for c in m.modules())
            ]
            if not convs:
                raise ValueError("explain.target_layer auto: the model has no convolution")
            name = convs[-1]
    try:
        return name, model.get_submodule(name)
    except AttributeError:
        stages = [f["module"] for f in getattr(model, "feature_info", [])]
        raise ValueError(
            f"explain.target_layer: no module {name!r} in this model; its feature stages are "
            f"{stages or [n for n, _ in model.named_children()]}"
        ) from None


def compute_cams(
    model: nn.Module,
    images: np.ndarray,
    meta: ModelMeta,
    targets: np.ndarray,
    method: str,
    layer: nn.Module | list[nn.Module],
    batch_size: int,
    device: torch.device,
) -> np.ndarray:
    """(N, S, S) float32 maps in [0, 1] (each scaled to its own maximum) for class `targets[i]`."""
    mean, std = meta.normalization(device)
    out = []
    layers = layer if isinstance(layer, list) else [layer]
    with CAMS[method](model=model, target_layers=layers) as cam:
        for start, chunk in zip(
            range(0, len(images), batch_size), iter_batches(images, batch_size), strict=True
        ):
            x = normalize(to_tensor_batch(chunk).to(device), mean, std)
            wanted = [ClassifierOutputTarget(int(t)) for t in targets[start : start + len(x)]]
            out.append(cam(input_tensor=x, targets=wanted).astype(np.float32))
    model.zero_grad(set_to_none=True)
    return np.concatenate(out) if out else np.zeros((0, *images.shape[1:3]), np.float32)


def cam_peak(cam: np.ndarray) -> tuple[int, int]:
    """(row, col) of the CAM maximum; on a plateau (a coarse map upsampled) the top pixel
    nearest the plateau's centroid, not its first corner."""
    rows, cols = np.nonzero(cam >= cam.max() - 1e-6)
    nearest = np.argmin((rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2)
    return int(rows[nearest]), int(cols[nearest])


def pointing_game(cams: np.ndarray, masks: np.ndarray) -> tuple[dict, pd.DataFrame]:
    """Hit = CAM peak inside the lesion mask. Chance = the mask's share of the image (what a
    uniformly random peak would score); energy = CAM mass inside the mask / total mass."""
    rows = []
    for cam, mask in zip(cams, masks > 0, strict=True):
        r, c = cam_peak(cam)
        total = float(cam.sum())
        rows.append(
            {
                "hit": bool(mask[r, c]) and total > 0,  # an empty CAM points nowhere: a miss
                "area_share": float(mask.mean()),
                "energy_in_mask": float(cam[mask].sum() / total) if total > 0 else float("nan"),
                "peak_row": r,
                "peak_col": c,
            }
        )
    table = pd.DataFrame(
        rows, columns=["hit", "area_share", "energy_in_mask", "peak_row", "peak_col"]
    )
    summary = {
        "n_abnormal": len(table),
        "pointing_game": round(float(table["hit"].mean()), 4),
        "pointing_chance": round(float(table["area_share"].mean()), 4),
        "cam_energy_in_mask": round(float(table["energy_in_mask"].mean()), 4),
        "n_empty_cam": int(table["energy_in_mask"].isna().sum()),
    }
    return summary, table


def overlay(image: np.ndarray, cam: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """(S, S, C) uint8 image + CAM -> (TILE, TILE, 3) uint8 heat-map overlay, lesion in green."""
    rgb = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image
    rgb = cv2.resize(rgb, (TILE, TILE), interpolation=cv2.INTER_LINEAR)
    heat = cv2.resize(cam, (TILE, TILE), interpolation=cv2.INTER_LINEAR)
    tile = show_cam_on_image(rgb.astype(np.float32) / 255, heat, use_rgb=True, image_weight=0.55)
    if mask is not None and mask.any():
        big = cv2.resize(mask.astype(np.uint8), (TILE, TILE), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(big, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(tile, contours, -1, (0, 255, 0), 1)
    return tile
