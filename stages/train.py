"""train stage: fit a timm model on the processed arrays, keep the best epoch.

Outputs: models/model.pt (weights + metadata), metrics/train.json, plots/train/history.csv
(one row per epoch) and the DVCLive log in plots/train/live/.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from dvclive import Live
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from tqdm import tqdm

from stages import metrics
from stages.io import atomic_dir, read_processed, write_csv, write_json
from stages.models import build_model, normalize, predict, save_checkpoint, select_device
from stages.params import AugmentParams, ModelParams, TrainParams

PROCESSED_DIR = Path("data/processed")
MODEL_FILE = Path("models/model.pt")
METRICS_FILE = Path("metrics/train.json")
PLOTS_DIR = Path("plots/train")
POLICIES = {
    "trivialaugment": v2.TrivialAugmentWide,
    "randaugment": v2.RandAugment,
    "autoaugment": v2.AutoAugment,
}


def build_transform(aug: AugmentParams, size: int) -> nn.Module:
    """Per-image augmentation on (C, H, W) uint8 tensors."""
    steps: list[nn.Module] = []
    if aug.crop_scale < 1:
        steps.append(
            v2.RandomResizedCrop(
                size, scale=(aug.crop_scale, 1.0), ratio=(0.9, 1.1), antialias=True
            )
        )
    if aug.rotation > 0:
        steps.append(v2.RandomRotation(aug.rotation))
    if aug.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(aug.hflip))
    if aug.brightness > 0 or aug.contrast > 0:
        steps.append(v2.ColorJitter(brightness=aug.brightness, contrast=aug.contrast))
    if aug.autocontrast > 0:
        steps.append(v2.RandomAutocontrast(aug.autocontrast))
    if aug.sharpness > 0:
        steps.append(v2.RandomAdjustSharpness(2.0, aug.sharpness))
    if aug.policy != "none":
        steps.append(POLICIES[aug.policy]())
    return v2.Compose(steps) if steps else v2.Identity()


class ArrayDataset(Dataset):
    """Items of a (N, H, W, C) uint8 array as augmented (C, H, W) uint8 tensors."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: nn.Module):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = torch.from_numpy(np.array(self.images[i])).permute(2, 0, 1)
        return self.transform(img), int(self.labels[i])


def class_weights(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    """Inverse-frequency ('balanced') loss weights: n / (K * count_k)."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    return torch.tensor(len(labels) / (n_classes * np.maximum(counts, 1)), dtype=torch.float32)


def set_trainable(model: nn.Module, head_only: bool) -> None:
    """Freeze everything but the classifier (head_only) or unfreeze all."""
    head = {id(p) for p in model.get_classifier().parameters()}
    for p in model.parameters():
        p.requires_grad = not head_only or id(p) in head


def validate(
    model: nn.Module,
    images: np.ndarray,
    y: np.ndarray,
    meta: dict,
    device: torch.device,
    loss_fn: nn.Module,
) -> dict[str, float]:
    probs = predict(model, images, meta, 256, device)
    loss = loss_fn(torch.log(torch.from_numpy(probs).clamp_min(1e-7)), torch.tensor(y))
    return {"loss": float(loss), **metrics.summarize(y, probs)}


def fit(
    model: nn.Module,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    meta: dict,
    params: TrainParams,
    aug: AugmentParams,
    freeze_epochs: int,
    live: Live | None = None,
) -> tuple[dict, list[dict]]:
    """Train with early stopping; return the best state dict and the per-epoch history."""
    device = select_device(params.device)
    memory_format = torch.channels_last if device.type in ("cpu", "cuda") else torch.preserve_format
    model.to(device, memory_format=memory_format)  # channels_last: ~20% faster convs on CPU
    generator = torch.Generator().manual_seed(params.seed)
    dataset = ArrayDataset(train[0], train[1], build_transform(aug, train[0].shape[1]))
    loader = DataLoader(
        dataset,
        batch_size=params.batch_size,
        shuffle=True,
        drop_last=True,
        generator=generator,
        num_workers=params.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=params.num_workers > 0,
    )
    if len(loader) == 0:
        raise ValueError(
            f"train.batch_size {params.batch_size} exceeds the "
            f"{len(dataset)} training images; lower it"
        )
    n_classes = len(meta["classes"])
    weights = class_weights(train[1], n_classes) if params.class_weights == "balanced" else None
    loss_fn = nn.CrossEntropyLoss(
        weight=None if weights is None else weights.to(device),
        label_smoothing=params.label_smoothing,
    )
    val_loss_fn = nn.NLLLoss(weight=weights)
    opt = create_optimizer_v2(
        model,
        opt=params.optimizer,
        lr=params.lr,
        weight_decay=params.weight_decay,
        momentum=params.momentum,
    )
    sched_name = {"exponential": "step", "none": "step"}.get(params.scheduler, params.scheduler)
    sched, _ = create_scheduler_v2(
        opt,
        sched=sched_name,
        num_epochs=params.epochs,
        warmup_epochs=params.warmup_epochs,
        decay_epochs=1 if params.scheduler == "exponential" else params.step_size,
        decay_rate=1.0 if params.scheduler == "none" else params.gamma,
        warmup_lr=params.lr * 0.01,
        min_lr=params.lr * 0.001,
        step_on_epochs=False,
        updates_per_epoch=len(loader),
    )
    mean = torch.tensor(meta["mean"], device=device).view(1, -1, 1, 1)
    std = torch.tensor(meta["std"], device=device).view(1, -1, 1, 1)
    amp = params.amp and device.type == "cuda"
    higher_better = params.monitor != "val_loss"
    best, best_state, history, stale = -np.inf, None, [], 0
    for epoch in range(1, params.epochs + 1):
        set_trainable(model, head_only=epoch <= freeze_epochs)
        model.train()
        start, total, seen = time.perf_counter(), 0.0, 0
        bar = tqdm(loader, desc=f"epoch {epoch}/{params.epochs}", leave=False, mininterval=1)
        for step, (x, y) in enumerate(bar):
            x = normalize(x.to(device, non_blocking=True), mean, std)
            x = x.contiguous(memory_format=memory_format)
            y = y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step_update((epoch - 1) * len(loader) + step + 1)
            total, seen = total + loss.item() * len(y), seen + len(y)
            bar.set_postfix(loss=f"{total / seen:.3f}")
        seconds = time.perf_counter() - start
        scores = validate(model, val[0], val[1], meta, device, val_loss_fn)
        row = {
            "epoch": epoch,
            "train_loss": total / seen,
            "lr": opt.param_groups[0]["lr"],
            "images_per_second": seen / seconds,
            "epoch_seconds": seconds,
            **{f"val_{k}": v for k, v in scores.items()},
        }
        history.append(row)
        if live is not None:
            for key, value in row.items():
                if key != "epoch":
                    live.log_metric(key.replace("val_", "val/").replace("train_", "train/"), value)
            live.next_step()
        score = row[params.monitor] if higher_better else -row[params.monitor]
        if np.isnan(score):
            score = -np.inf
        if best_state is None or score > best:
            best, best_state, stale = score, copy.deepcopy(model.state_dict()), 0
            row["best"] = True
        else:
            stale += 1
        tqdm.write(
            f"epoch {epoch}: train_loss {row['train_loss']:.3f}  val_loss "
            f"{row['val_loss']:.3f}  {params.monitor} {row[params.monitor]:.3f}  "
            f"{row['images_per_second']:.0f} img/s"
        )
        if stale >= params.patience:
            break
    return best_state, history


def run(
    model_params: ModelParams,
    params: TrainParams,
    aug: AugmentParams,
    processed_dir: Path = PROCESSED_DIR,
    model_file: Path = MODEL_FILE,
    metrics_file: Path = METRICS_FILE,
    plots_dir: Path = PLOTS_DIR,
) -> str:
    start = time.perf_counter()
    torch.manual_seed(params.seed)
    torch.set_num_threads(
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )
    train_x, train_frame, meta = read_processed(processed_dir, "train")
    val_x, val_frame, _ = read_processed(processed_dir, "val")
    model = build_model(model_params, len(meta["classes"]), train_x.shape[3])
    with atomic_dir(plots_dir) as tmp:
        live = Live(dir=str(tmp / "live"), dvcyaml=False, save_dvc_exp=False)
        best_state, history = fit(
            model,
            (np.asarray(train_x), train_frame["y"].to_numpy()),
            (np.asarray(val_x), val_frame["y"].to_numpy()),
            meta,
            params,
            aug,
            model_params.freeze_epochs,
            live,
        )
        live.end()
        write_csv(tmp / "history.csv", pd.DataFrame(history).drop(columns="best", errors="ignore"))
    model.load_state_dict(best_state)
    best_row = next(r for r in reversed(history) if r.get("best"))
    train_seconds = time.perf_counter() - start
    checkpoint_meta = {
        "model_name": model_params.name,
        "classes": meta["classes"],
        "task": meta["task"],
        "channels": int(train_x.shape[3]),
        "input_size": int(train_x.shape[1]),
        "mean": meta["mean"],
        "std": meta["std"],
        "preprocess": meta["preprocess"],
        "dataset": meta["dataset"],
        "best_epoch": best_row["epoch"],
        "monitor": params.monitor,
        "params": {
            "model": model_params.model_dump(),
            "train": params.model_dump(),
            "augment": aug.model_dump(),
        },
    }
    save_checkpoint(model_file, model, checkpoint_meta)
    images = sum(r["images_per_second"] * r["epoch_seconds"] for r in history)
    summary = {
        "best_epoch": best_row["epoch"],
        "epochs_run": len(history),
        f"best_{params.monitor}": round(best_row[params.monitor], 4),
        "train_seconds": round(train_seconds, 1),
        "images_per_second": round(images / sum(r["epoch_seconds"] for r in history), 1),
        "device": select_device(params.device).type,
    }
    write_json(metrics_file, summary)
    return (
        f"train: {model_params.name}, {len(history)} epochs (best {best_row['epoch']}, "
        f"{params.monitor} {best_row[params.monitor]:.3f}), "
        f"{summary['images_per_second']:.0f} img/s -> {model_file} in {train_seconds:.1f} s"
    )
