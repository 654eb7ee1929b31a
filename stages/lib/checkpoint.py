"""The checkpoint's meta: what `models/model.pt` says about its weights, as one typed object.

`model.pt` stores it as a plain dict (so `torch.load(..., weights_only=True)` reads it);
`ModelMeta.from_dict` / `to_dict` convert. This module is the one home of those keys: the
stages ask `meta.multilabel` or `meta.normalization(device)`, never the dict.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_FORMAT = 1
TASKS = ("binary", "multiclass", "multilabel")


@dataclass(frozen=True)
class ModelMeta:
    """Everything needed to use the weights alone.

    Attributes:
        model_name: timm architecture name.
        classes: class (or label) names, in output order.
        task: binary, multiclass or multilabel (sigmoid outputs).
        channels: input channels (1 gray, 3 RGB).
        input_size: side of the square input in pixels.
        mean, std: per-channel normalisation of 0..1 pixel values.
        preprocess: the preprocess params the inputs were prepared with.
    """

    model_name: str
    classes: list[str]
    task: str
    channels: int
    input_size: int
    mean: list[float]
    std: list[float]
    preprocess: dict[str, Any]
    dataset: str = ""
    head_hidden: int | None = None
    weights_source: str | None = None
    best_epoch: int | None = None
    monitor: str | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"checkpoint meta: task {self.task!r} is not one of {TASKS}")

    @property
    def multilabel(self) -> bool:
        return self.task == "multilabel"

    def normalization(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
        """(mean, std) as (1, C, 1, 1) tensors on `device`."""
        return tuple(
            torch.tensor(v, dtype=torch.float32, device=device).view(1, -1, 1, 1)
            for v in (self.mean, self.std)
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "checkpoint") -> ModelMeta:
        """Build from a stored dict; missing required keys are named in the error."""
        names = {f.name for f in dataclasses.fields(cls)}
        required = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [k for k in required if k not in values]
        if missing:
            raise ValueError(f"{source}: meta lacks {missing}; retrain with `medpipe train`")
        return cls(**{k: v for k, v in values.items() if k in names})


def save_torch(path: Path, obj: Any) -> None:
    """torch.save into an open file: the archive's inner folder is then always "archive"
    (given a path, torch names it after the file, and atomic writes use random temporary
    names), so the same content gives the same bytes and the same DVC hash."""
    with open(path, "wb") as f:
        torch.save(obj, f)
