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
