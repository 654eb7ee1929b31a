"""The checkpoint `models/model.pt`: its meta as one typed object, and the one loader.

`model.pt` stores the meta as a plain dict (so `torch.load(..., weights_only=True)` reads
it); `ModelMeta.from_dict` / `to_dict` convert. This module is the one home of those keys:
the stages ask `meta.multilabel` or `meta.normalization(device)`, never the dict.

`load_checkpoint` is the one function that reads a model.pt (weights only, the file's
format recognised, a clear error for anything else) and returns a typed `Checkpoint`. Its
users only add what they need on top: `models.build_from_checkpoint` builds the network
with those weights on a device, and `inference.load_model` chooses the device and returns
the `LoadedModel` the stages score with.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

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
        positive_class: binary tasks: the class whose probability is thresholded and whose
            sensitivity is reported (`data.positive_class`); None for other tasks.
        members: models in the checkpoint (`train.ensemble`); more than one are scored
            as one model, the mean of their probabilities (`models.Ensemble`).
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
    positive_class: str | None = None
    head_hidden: int | None = None
    weights_source: str | None = None
    best_epoch: int | None = None
    monitor: str | None = None
    members: int = 1  # > 1: an ensemble of that many models of model_name (mean probability)
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"checkpoint meta: task {self.task!r} is not one of {TASKS}")
        if self.positive_class is not None and self.positive_class not in self.classes:
            raise ValueError(
                f"checkpoint meta: positive_class {self.positive_class!r} is not one of "
                f"the classes {self.classes}"
            )

    @property
    def multilabel(self) -> bool:
        return self.task == "multilabel"

    @property
    def positive_index(self) -> int | None:
        """Output index of the positive class (binary tasks; checkpoints from before
        `data.positive_class` existed: the second class, as they were evaluated)."""
        if self.task != "binary":
            return None
        return self.classes.index(self.positive_class) if self.positive_class else 1

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
    try:
        with open(path, "wb") as f:
            torch.save(obj, f)
    except RuntimeError as exc:  # torch's writer wraps the OS error (a full disk, a limit)
        cause = exc.__context__
        if isinstance(cause, OSError) and cause.errno is not None:
            raise OSError(cause.errno, cause.strerror) from None  # named by the caller
        raise


@dataclass(frozen=True)
class Checkpoint:
    """A loaded `model.pt`: the weights and what they are (`meta`)."""

    meta: ModelMeta
    state_dict: dict[str, torch.Tensor]


def load_checkpoint(path: Path | str) -> Checkpoint:
    """A `model.pt` (`format`, `state_dict`, `meta`), loaded with weights_only (no code from
    the file runs).

    Raises:
        FileNotFoundError: no such file.
        ValueError: saying what the file is instead (a TorchScript export, a pickle that
            wants to run code, a plain state dict, something else) and what medpipe expects;
            or naming the keys its meta lacks.
    """
    path = Path(path)
    expected = "medpipe expects the model.pt that `medpipe train` writes (weights + meta)"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model checkpoint not found (run `medpipe train`)")
    other = _other_format(path)
    if other:
        raise ValueError(f"{path}: {other}, not a checkpoint; {expected}.")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before failing
            warnings.simplefilter("ignore", UserWarning)
            blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        wanted = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if wanted:
            reason = f"it asks to import {wanted.group(1)}, which a weights file never needs"
        elif "Weights only load failed" in str(exc):
            reason = "it holds more than weights and plain data (loading it could run code)"
        else:
            reason = "it is not a readable PyTorch file (truncated, or another format)"
        raise ValueError(
            f"{path}: refused: {reason}. medpipe loads checkpoints as weights and plain data "
            f"only, never running code from the file; {expected}."
        ) from None
    if isinstance(blob, dict) and {"state_dict", "meta"} <= set(blob):
        return Checkpoint(ModelMeta.from_dict(blob["meta"], str(path)), blob["state_dict"])
    if isinstance(blob, dict) and blob and all(isinstance(v, torch.Tensor) for v in blob.values()):
        raise ValueError(
            f"{path}: a plain state dict (weights only, without the classes, input size and "
            f"normalisation medpipe needs); {expected}. To train from these weights, set "
            f"model.pretrained: true and model.weights: {path}"
        )
    raise ValueError(f"{path}: a {type(blob).__name__}, not a medpipe checkpoint; {expected}")


def _other_format(path: Path) -> str | None:
    """What the file is when it is not a PyTorch archive or pickle (None when it may be
    one): a TorchScript or ONNX export, an image, a text file, or another format."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            return (
                "a TorchScript file (what `medpipe export` writes as model.ts; load it with "
                "torch.jit.load)"
            )
        return None
    with open(path, "rb") as f:
        head = f.read(4096)
    if head[:1] == b"\x80":  # a pickle, protocol 2 or later: torch.load decides
        return None
    if _is_onnx(path):
        return (
            "an ONNX export (what `medpipe export` writes as model.onnx; run it with "
            "onnxruntime.InferenceSession: float32 pixels 0-255 in, probabilities out)"
        )
    try:
        with Image.open(path) as image:
            return f"a {image.format} image"
    except (OSError, ValueError):
        pass
    if not head:
        return "an empty file"
    text = head.decode("utf-8", errors="ignore")
    if b"\0" not in head and len(text.encode()) >= len(head) - 3:  # a cut last character
        return "a text file"
    return "a binary file of another format"


def _is_onnx(path: Path) -> bool:
    try:
        import onnx
        from google.protobuf.message import DecodeError
    except ImportError:
        return path.suffix.lower() == ".onnx"
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, OSError, RuntimeError):
        return False
    return len(model.graph.node) > 0
