"""What the outside world offers, looked up without importing a stage: timm's model names,
MedMNIST's flags (from the medmnist package's INFO), a model's block names, and medpipe's
cache folder. The params schema validates against these, so this module sits at the bottom
of the house with the schema: it imports nothing from the package.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn


def cache_dir() -> Path:
    """medpipe's cache: $MEDPIPE_CACHE, else $XDG_CACHE_HOME/medpipe, else ~/.cache/medpipe."""
    if os.environ.get("MEDPIPE_CACHE"):
        return Path(os.environ["MEDPIPE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "medpipe"


@functools.lru_cache(maxsize=1)
def timm_model_names() -> frozenset[str]:
    """timm's registry, cached on disk per timm version: every stage validates the whole
    params file, and importing timm (and torch) just for that would cost seconds and ~1 GB."""
    version = importlib.metadata.version("timm")
    cached = cache_dir() / f"timm-{version}-models.txt"
    with contextlib.suppress(OSError):
        return frozenset(cached.read_text().split())
    import timm

    names = timm.list_models()
    with contextlib.suppress(OSError):  # a read-only home only loses the speed-up
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text("\n".join(names))
        os.replace(tmp, cached)
    return frozenset(names)


@functools.lru_cache(maxsize=1)
def medmnist_info() -> dict[str, dict[str, Any]]:
    """The `medmnist` package's INFO table (labels, task, url/MD5 per size, per flag).

    `import medmnist` also imports torch and its dataset classes (about 3 s, and every
    command validates params); INFO lives in the plain module medmnist/info.py, so that
    file is loaded on its own unless medmnist is imported already.
    """
    if "medmnist.info" in sys.modules:
        return sys.modules["medmnist.info"].INFO
    spec = importlib.util.find_spec("medmnist")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("data.source medmnist needs the medmnist package (pip install medmnist)")
    path = Path(next(iter(spec.submodule_search_locations))) / "info.py"
    info_spec = importlib.util.spec_from_file_location("_medpipe_medmnist_info", path)
    assert info_spec is not None and info_spec.loader is not None
    module = importlib.util.module_from_spec(info_spec)
    info_spec.loader.exec_module(module)
    return module.INFO


def medmnist_flags() -> list[str]:
    """Every 2D MedMNIST flag this medmnist version knows (3D volumes are not images)."""
    return [flag for flag in medmnist_info() if not flag.endswith("3d")]


def block_names(model: nn.Module) -> list[str]:
    """Names usable as model.trainable_from: top-level children and their numbered blocks."""

    from torch import nn

    def has_params(module: nn.Module) -> bool:
        return next(module.parameters(), None) is not None

    names = []
    for name, child in model.named_children():
        if not has_params(child):
            continue
        names.append(name)
        if isinstance(child, (nn.Sequential, nn.ModuleList)):
            names += [f"{name}.{n}" for n, m in child.named_children() if has_params(m)]
    return names


def check_block_name(model_name: str, block: str) -> None:
    """Raise ValueError listing the valid names when `block` is not a block of the model."""
    import timm  # deferred: building the model is only needed for this check

    names = block_names(timm.create_model(model_name, pretrained=False))
    if block not in names:
        raise ValueError(
            f"trainable_from: {block!r} is not a block of {model_name}; valid: {', '.join(names)}"
        )


# Published MedMNIST v2 baselines (test split): flag -> model (input px) -> (AUC, ACC).
# Source: Yang et al., "MedMNIST v2", Scientific Data 10:41 (2023), Table 3 (2D datasets),
# ResNet-18/50 trained from scratch on the official splits.
MEDMNIST_V2_SOURCE = "MedMNIST v2 (Yang et al., Sci Data 2023, Table 3)"
MEDMNIST_V2_BASELINES: dict[str, dict[str, tuple[float, float]]] = {
    "pathmnist": {"ResNet-18 (28)": (0.983, 0.907), "ResNet-18 (224)": (0.989, 0.909),
                  "ResNet-50 (28)": (0.990, 0.911), "ResNet-50 (224)": (0.989, 0.892)},
    "chestmnist": {"ResNet-18 (28)": (0.768, 0.947), "ResNet-18 (224)": (0.773, 0.947),
                   "ResNet-50 (28)": (0.769, 0.947), "ResNet-50 (224)": (0.773, 0.948)},
    "dermamnist": {"ResNet-18 (28)": (0.917, 0.735), "ResNet-18 (224)": (0.920, 0.754),
                   "ResNet-50 (28)": (0.913, 0.735), "ResNet-50 (224)": (0.912, 0.731)},
    "octmnist": {"ResNet-18 (28)": (0.943, 0.743), "ResNet-18 (224)": (0.958, 0.763),
                 "ResNet-50 (28)": (0.952, 0.762), "ResNet-50 (224)": (0.958, 0.776)},
    "pneumoniamnist": {"ResNet-18 (28)": (0.944, 0.854), "ResNet-18 (224)": (0.956, 0.864),
                       "ResNet-50 (28)": (0.948, 0.854), "ResNet-50 (224)": (0.962, 0.884)},
    "retinamnist": {"ResNet-18 (28)": (0.717, 0.524), "ResNet-18 (224)": (0.710, 0.493),
                    "ResNet-50 (28)": (0.726, 0.528), "ResNet-50 (224)": (0.716, 0.511)},
    "breastmnist": {"ResNet-18 (28)": (0.901, 0.863), "ResNet-18 (224)": (0.891, 0.833),
                    "ResNet-50 (28)": (0.857, 0.812), "ResNet-50 (224)": (0.866, 0.842)},
    "bloodmnist": {"ResNet-18 (28)": (0.998, 0.958), "ResNet-18 (224)": (0.998, 0.963),
                   "ResNet-50 (28)": (0.997, 0.956), "ResNet-50 (224)": (0.997, 0.950)},
    "tissuemnist": {"ResNet-18 (28)": (0.930, 0.676), "ResNet-18 (224)": (0.933, 0.681),
                    "ResNet-50 (28)": (0.931, 0.680), "ResNet-50 (224)": (0.932, 0.680)},
    "organamnist": {"ResNet-18 (28)": (0.997, 0.935), "ResNet-18 (224)": (0.998, 0.951),
                    "ResNet-50 (28)": (0.997, 0.935), "ResNet-50 (224)": (0.998, 0.950)},
    "organcmnist": {"ResNet-18 (28)": (0.992, 0.900), "ResNet-18 (224)": (0.994, 0.920),
                    "ResNet-50 (28)": (0.992, 0.905), "ResNet-50 (224)": (0.993, 0.911)},
    "organsmnist": {"ResNet-18 (28)": (0.972, 0.782), "ResNet-18 (224)": (0.974, 0.778),
                    "ResNet-50 (28)": (0.972, 0.770), "ResNet-50 (224)": (0.975, 0.785)},
}  # fmt: skip


def medmnist_baselines(name: str) -> dict[str, tuple[float, float]]:
    """The published (AUC, ACC) per baseline for a MedMNIST file or flag name
    (`breastmnist`, `breastmnist_64.npz`, ...); empty when the flag is not in the table."""
    flag = Path(name).name.removesuffix(".npz").split("_")[0].lower()
    return MEDMNIST_V2_BASELINES.get(flag, {})
