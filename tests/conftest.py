"""Shared fixtures: a shrunken params set (tiny data, 1-2 epochs, CPU) and project dirs."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from stages.lib.params import Params, parse_params

# No test reaches the Hugging Face hub: pretrained weights come from files, caches, packages
# or the loopback stand-in of tests/test_hub.py (set before huggingface_hub reads it).
os.environ["HF_HUB_OFFLINE"] = "1"


def share_cores() -> None:
    """Under pytest-xdist (`make test` runs a worker per core), each worker and every process
    it starts keep to their own cores: two trainings with a thread per core each would slow
    each other many-fold (medpipe sizes its threads to the cores it may use)."""
    worker, count = (
        os.environ.get("PYTEST_XDIST_WORKER"),
        os.environ.get("PYTEST_XDIST_WORKER_COUNT"),
    )
    if not (worker and count) or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    per_worker = len(cores) // int(count)
    if per_worker >= 1:
        i = int(worker.removeprefix("gw")) % int(count)
        os.sched_setaffinity(0, cores[i * per_worker : (i + 1) * per_worker])


share_cores()
ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
BIN = str(Path(sys.executable).parent)  # where `medpipe` and `dvc` live

TINY = {
    "data": {"synthetic": {"n_patients": 60, "image_size": [64, 96], "seed": 1}},
    "preprocess": {"size": 32},
    "model": {"name": "resnet10t", "pretrained": False},
    "train": {"epochs": 2, "batch_size": 16, "patience": 2, "warmup_epochs": 0},
    "evaluate": {"batch_size": 64, "bootstrap": 50},
    "embed": {"max_points": 60, "perplexity": 5.0},
}


def merge(base: dict, override: dict) -> dict:
    """Deep-merge two params mappings (override wins)."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


@pytest.fixture
def tiny_params() -> Params:
    return parse_params(TINY)


def write_params(path: Path, override: dict | None = None) -> Path:
    """Full params.yaml (defaults + TINY + override), plain YAML as `dvc exp run -S` keeps it."""
    full = merge(Params().model_dump(mode="json"), merge(TINY, override or {}))
    path.write_text(yaml.safe_dump(full, sort_keys=False))
    return path


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run the test inside an empty directory (stages use relative paths)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def subprocess_env() -> dict[str, str]:
    return child_env()


def child_env() -> dict[str, str]:
    """Environment for child processes: this interpreter's bin first on PATH, quiet DVC."""
    env = dict(os.environ)
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
    env["DVC_NO_ANALYTICS"] = "1"
    env.setdefault("GIT_AUTHOR_NAME", "medpipe-test")
    env.setdefault("GIT_AUTHOR_EMAIL", "test@example.invalid")
    env.setdefault("GIT_COMMITTER_NAME", "medpipe-test")
    env.setdefault("GIT_COMMITTER_EMAIL", "test@example.invalid")
    return env


def tiny_processed(
    root: Path,
    task: str,
    classes: list[str],
    n: int = 24,
    groups: bool = False,
    positive: str | None = None,
) -> tuple[Path, Path]:
    """A data/processed-like folder (val and test splits of random 32 px images, labels
    cycling through the classes) and a random-weight resnet10t checkpoint for it
    (`positive`: the binary task's positive class, as download resolves it)."""
    import json

    import numpy as np
    import pandas as pd
    import timm

    from stages.lib.models import save_checkpoint
    from stages.lib.params import PreprocessParams

    processed = root / "processed"
    processed.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split in ("val", "test"):
        np.save(processed / f"{split}_images.npy", rng.integers(0, 255, (n, 32, 32, 1), np.uint8))
        if task == "multilabel":  # every label present and absent somewhere
            labels = ["|".join(c for k, c in enumerate(classes) if (i >> k) & 1) for i in range(n)]
        else:
            labels = [classes[i % len(classes)] for i in range(n)]
        frame = pd.DataFrame({"image": [f"{split}{i}.png" for i in range(n)], "label": labels})
        if groups:
            frame["group"] = np.where(np.arange(n) % 2, "hand", "wrist")
        frame.to_csv(processed / f"{split}.csv", index=False)
    meta = {
        "classes": classes,
        "task": task,
        "positive_class": positive,
        "dataset": "toy",
        "preprocess": PreprocessParams(size=32).model_dump(),
        "mean": [0.5],
        "std": [0.2],
    }
    (processed / "meta.json").write_text(json.dumps(meta))
    checkpoint = root / "model.pt"
    model = timm.create_model("resnet10t", num_classes=len(classes), in_chans=1)
    extra = {"input_size": 32, "preprocess": meta["preprocess"], "dataset": "toy"}
    extra["positive_class"] = positive
    save_checkpoint(checkpoint, model, model_meta(classes, task, [0.5], [0.2], **extra))
    return processed, checkpoint


def model_meta(classes=("a", "b"), task=None, mean=(0.3,), std=(0.3,), **fields):
    """A ModelMeta for tests: resnet10t on 1-channel 16 px inputs unless told otherwise."""
    from stages.lib.checkpoint import ModelMeta

    classes = list(classes)
    task = task or ("binary" if len(classes) == 2 else "multiclass")
    values = {"model_name": "resnet10t", "channels": 1, "input_size": 16, "preprocess": {}}
    values |= {"classes": classes, "task": task, "mean": list(mean), "std": list(std)}
    return ModelMeta(**(values | fields))


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium with no network (the pages must open offline)."""
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-sync",
        "--disable-component-update",
        "--window-size=1280,2000",
        # no network: every host resolves to nothing, and no proxy is reachable
        "--host-resolver-rules=MAP * ~NOTFOUND",
        "--proxy-server=127.0.0.1:9",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
