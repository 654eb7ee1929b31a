"""Training ingredients: loss (class weights / pos_weight), sampler, optimiser, LR schedule.

Pure factories with their state in plain dicts, so that `train` can checkpoint and resume
them exactly.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn
from torch.utils.data import WeightedRandomSampler

from stages.lib.params import TrainParams


def class_weights(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    """Inverse-frequency ('balanced') loss weights: n / (K * count_k)."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    return torch.tensor(len(labels) / (n_classes * np.maximum(counts, 1)), dtype=torch.float32)


def pos_weights(targets: np.ndarray) -> torch.Tensor:
    """Multi-label positive weights: negatives / positives per label (1 for absent labels)."""
    pos = targets.sum(axis=0)
    neg = len(targets) - pos
    return torch.tensor(np.where(pos > 0, neg / np.maximum(pos, 1), 1.0), dtype=torch.float32)


def build_loss(params: TrainParams, targets: np.ndarray, n_classes: int) -> nn.Module:
    """Cross-entropy (weighted, smoothed) for single-label targets (N,); BCE-with-logits with
    pos_weight for multi-hot targets (N, K)."""
    balanced = params.class_weights == "balanced"
    if targets.ndim == 2:
        return nn.BCEWithLogitsLoss(pos_weight=pos_weights(targets) if balanced else None)
    return nn.CrossEntropyLoss(
        weight=class_weights(targets, n_classes) if balanced else None,
        label_smoothing=params.label_smoothing,
    )


def sample_weights(targets: np.ndarray) -> np.ndarray:
    """Per-image draw weights that make every class equally likely.

    Single label: 1 / count of the image's class. Multi-label: the weight of the image's
    rarest label (images without labels form one more group).
    """
    if targets.ndim == 1:
        return 1.0 / np.bincount(targets)[targets]
    groups = np.concatenate([targets, (targets.sum(axis=1) == 0)[:, None]], axis=1)
    inverse = 1.0 / np.maximum(groups.sum(axis=0), 1)
    return (groups * inverse).max(axis=1)


def build_sampler(
    targets: np.ndarray, generator: torch.Generator, num_samples: int | None = None
) -> WeightedRandomSampler:
    """Seeded sampler drawing `num_samples` images with replacement, classes balanced."""
    return WeightedRandomSampler(
        torch.as_tensor(sample_weights(targets), dtype=torch.float64),
        num_samples or len(targets),
        replacement=True,
        generator=generator,
    )


def param_groups(
    model: nn.Module, weight_decay: float, head: set[str], body_lr_scale: float
) -> list[dict[str, Any]]:
    """Head and body parameters, each split into decayed and not decayed (biases, norms).

    `lr_scale` multiplies the scheduled lr of a group (the body after unfreezing).
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        no_decay = p.ndim <= 1 or name.endswith(".bias") or name in skip
        groups.setdefault((name in head, no_decay), []).append(p)
    return [
        {
            "params": params,
            "weight_decay": 0.0 if no_decay else weight_decay,
            "lr_scale": 1.0 if is_head else body_lr_scale,
        }
        for (is_head, no_decay), params in sorted(groups.items())
    ]


def build_optimizer(
    model: nn.Module, params: TrainParams, head: set[str], body_lr_scale: float = 1.0
) -> torch.optim.Optimizer:
    """Adam/AdamW, or SGD with momentum (Nesterov optional) via timm's factory."""
    opt = params.optimizer
    if opt == "sgd":
        opt = "sgd" if params.nesterov else "momentum"  # timm: sgd = nesterov, momentum = plain
    kwargs = {"momentum": params.momentum} if params.optimizer == "sgd" else {}
    return create_optimizer_v2(
        param_groups(model, params.weight_decay, head, body_lr_scale),
        opt=opt,
        lr=params.lr,
        weight_decay=params.weight_decay,
        **kwargs,
    )


class LRSchedule:
    """Per-update learning rate: linear warm-up, then the chosen decay.

    cosine/step/exponential/none come from timm (pure functions of the update count);
    plateau multiplies that by gamma whenever the monitored metric stalls; onecycle is
    torch's OneCycleLR. `state_dict` holds all that a resumed run needs.
    """

    def __init__(self, opt: torch.optim.Optimizer, params: TrainParams, updates_per_epoch: int):
        self.params, self.updates = params, updates_per_epoch
        self.factor, self.best, self.stale = 1.0, -math.inf, 0
        self.onecycle: torch.optim.lr_scheduler.OneCycleLR | None = None
        self.timm = None
        total = params.epochs * updates_per_epoch
        if params.scheduler == "onecycle":
            rise = max(params.warmup_epochs * updates_per_epoch, 2) / max(total, 3)
            self.onecycle = torch.optim.lr_scheduler.OneCycleLR(
                opt,
                max_lr=[params.lr * g.get("lr_scale", 1.0) for g in opt.param_groups],
                total_steps=max(total, 3),
                pct_start=min(rise, 0.9),
                cycle_momentum=False,  # keep train.momentum / Adam betas as set
            )
            return
        decay_epochs = {"exponential": 1, "step": params.step_size}.get(params.scheduler, 1)
        decay_rate = params.gamma if params.scheduler in ("step", "exponential") else 1.0
        self.timm, _ = create_scheduler_v2(
            opt,
            sched="cosine" if params.scheduler == "cosine" else "step",
            num_epochs=params.epochs,
            warmup_epochs=params.warmup_epochs,
            decay_epochs=decay_epochs,
            decay_rate=decay_rate,
            warmup_lr=params.lr * 0.01,
            min_lr=params.lr * 0.001,
            step_on_epochs=False,
            updates_per_epoch=updates_per_epoch,
        )
        self.opt = opt

    def step_update(self, num_updates: int) -> None:
        """Call after optimiser step number `num_updates` (1-based, counted over all epochs)."""
        if self.onecycle is not None:
            if self.onecycle.last_epoch < self.onecycle.total_steps - 1:
                self.onecycle.step()
            return
        self.timm.step_update(num_updates)
        if self.factor != 1.0:
            for group in self.opt.param_groups:
                group["lr"] *= self.factor

    def step_epoch(self, score: float) -> None:
        """After validation: `score` is the monitored metric, higher = better (plateau only)."""
        if self.params.scheduler != "plateau":
            return
        if score > self.best + 1e-4 * abs(self.best) if math.isfinite(self.best) else True:
            self.best, self.stale = score, 0
        else:
            self.stale += 1
            if self.stale > self.params.plateau_patience:
                self.factor, self.stale = self.factor * self.params.gamma, 0

    def state_dict(self) -> dict[str, Any]:
        state = {"factor": self.factor, "best": self.best, "stale": self.stale}
        if self.onecycle is not None:
            state["onecycle"] = self.onecycle.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.factor, self.best, self.stale = state["factor"], state["best"], state["stale"]
        if self.onecycle is not None:
            self.onecycle.load_state_dict(state["onecycle"])
