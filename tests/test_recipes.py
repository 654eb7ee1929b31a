"""`medpipe recipe`: the overlays load, `apply` refuses until the user's data keys are given
and writes a params.yaml the schema accepts; each recipe then runs end to end (real
`dvc repro` / `dvc exp run`) on a small fixture shaped like its study's data, checking the
outputs that study reads."""

from __future__ import annotations

import json
import re
import shutil
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from stages.cli import app
from stages.lib.checkpoint import load_checkpoint
from stages.lib.io import read_result
from stages.lib.params import Params, load_params
from stages.tools import recipe
from tests.conftest import ROOT
from tests.test_pipeline import STAGES, ran, sh

NAMES = ["000-ct", "001-mura", "002-brain-mri", "003-cxr-pneumonia", "004-lung-disease"]
# the study's settings stay; only sizes shrink (image size, epochs, resamples, latency runs)
SHRINK = [
    "preprocess.size=32",
    "train.epochs=2",
    "train.batch_size=16",
    "train.warmup_epochs=0",
    "train.patience=2",
    "evaluate.bootstrap=50",
    "evaluate.latency_runs=3",
    "export.check_images=8",
    "embed.perplexity=5.0",
    "explain.n_images=1",
]


def test_every_recipe_loads_and_documents_itself():
    assert recipe.available(ROOT / "recipes") == NAMES
    for name in NAMES:
        r = recipe.load_recipe(name, ROOT / "recipes")
        assert r.title and not r.title.startswith(name)
        for part in ("Data you bring:", "Run:", "Figures to read:", "medpipe recipe apply"):
            assert part in r.header, (name, part)
        assert r.requires and all(req.key.split(".")[0] in ("data", "model") for req in r.requires)
        for req in r.requires:  # the header names every key the user must give
            assert req.key in r.header, (name, req.key)


def test_apply_refuses_until_data_keys_are_given_and_keeps_params(in_tmp):
    shutil.copytree(ROOT / "recipes", in_tmp / "recipes")
    before = yaml.safe_dump(Params().model_dump(mode="json"), sort_keys=False)
    (in_tmp / "params.yaml").write_text(before)
    result = CliRunner().invoke(app, ["recipe", "apply", "001-mura"])
    assert result.exit_code == 1
    assert "data.path: not set" in result.output and "model.weights: not set" in result.output
    assert "medpipe recipe apply 001-mura --set data.path=... --set model.weights=..." in (
        result.output
    )
    missing = ["recipe", "apply", "001-mura", "--set", "data.path=nowhere.csv"]
    result = CliRunner().invoke(app, [*missing, "--set", "model.weights=w.pth"])
    assert result.exit_code == 1 and "nowhere.csv is not an existing file" in result.output
    assert (in_tmp / "params.yaml").read_text() == before  # untouched


def test_apply_writes_defaults_plus_overlay_plus_given_keys(in_tmp):
    shutil.copytree(ROOT / "recipes", in_tmp / "recipes")
    (in_tmp / "mura.csv").write_text("image,label\n")
    (in_tmp / "w.pth").write_bytes(b"")
    args = ["recipe", "apply", "001-mura", "-S", "data.path=mura.csv", "-S", "model.weights=w.pth"]
    result = CliRunner().invoke(app, [*args, "-S", "train.epochs=3"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("recipe: 001-mura (MURA-style")
    params = load_params(in_tmp / "params.yaml")
    assert params.model.name == "densenet121" and params.data.columns.group == "body_part"
    assert params.data.path == str(in_tmp / "mura.csv") and params.train.epochs == 3  # absolute
    assert params.evaluate == Params().evaluate  # what the recipe leaves alone is the default
    # another recipe keeps where the data is, resets the rest
    (in_tmp / "folder").mkdir()
    result = CliRunner().invoke(
        app, ["recipe", "apply", "003-cxr-pneumonia", "-S", "data.path=folder"]
    )
    assert result.exit_code == 0 and "kept" not in result.output
    params = load_params(in_tmp / "params.yaml")
    assert params.model.weights is None and params.train.sampler == "balanced"
    result = CliRunner().invoke(app, ["recipe", "apply", "003-cxr-pneumonia"])
    assert "kept data.path" in result.output


def test_apply_names_bad_keys_and_unknown_recipes(in_tmp):
    shutil.copytree(ROOT / "recipes", in_tmp / "recipes")
    (in_tmp / "f").mkdir()
    result = CliRunner().invoke(
        app, ["recipe", "apply", "003-cxr-pneumonia", "-S", "data.path=f", "-S", "train.epoch=3"]
    )
    assert result.exit_code == 1 and "train.epoch: unknown key (did you mean epochs?)" in (
        result.output
    )
    assert not (in_tmp / "params.yaml").exists()
    (in_tmp / "params.yaml").write_text("data: [unclosed\n")
    result = CliRunner().invoke(app, ["recipe", "apply", "003-cxr-pneumonia", "-S", "data.path=f"])
    assert result.exit_code == 1 and "params.yaml: not valid YAML" in result.output
    assert (in_tmp / "params.yaml").read_text() == "data: [unclosed\n"
    result = CliRunner().invoke(app, ["recipe", "apply", "005-nothing"])
    assert "recipe '005-nothing' not found" in result.output and "001-mura" in result.output
    result = CliRunner().invoke(app, ["recipe", "show", "002-brain-mri"])
    assert "efficientnet_b0" in result.output and "Figures to read:" in result.output


# --- end to end, one study each -----------------------------------------------------------


def picture(path: Path, seed: int, shade: int = 0, size: tuple[int, int] = (48, 44)) -> None:
    """A distinct noisy picture (no near-duplicates), brighter by `shade` for some classes."""
    rng = np.random.default_rng(seed)
    img = np.clip(rng.normal(110 + shade, 40, size), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)


def seed(*parts: object) -> int:
    """A stable seed per file (Python's hash() changes between runs)."""
    return zlib.crc32(repr(parts).encode())


def weights_file(path: Path, name: str) -> Path:
    """A state dict of the architecture, standing in for downloaded ImageNet weights."""
    import timm

    torch.manual_seed(0)
    torch.save(timm.create_model(name).state_dict(), path)
    return path


@pytest.fixture
def project(tmp_path, subprocess_env) -> Path:
    """A fresh clone-like project: code, dvc.yaml, recipes, git + DVC initialised."""
    path = tmp_path / "project"
    path.mkdir()
    shutil.copytree(ROOT / "stages", path / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "recipes", path / "recipes")
    for name in ("dvc.yaml", ".gitignore", ".dvcignore", "pyproject.toml", "params.yaml"):
        shutil.copy(ROOT / name, path / name)
    for cmd in (("git", "init", "-q", "-b", "main"), ("dvc", "init", "-q")):
        sh(path, subprocess_env, *cmd)
    return path


def apply_recipe(project: Path, env: dict, name: str, *sets: str) -> str:
    args = [a for s in (*sets, *SHRINK) for a in ("--set", s)]
    out = sh(project, env, "medpipe", "recipe", "apply", name, *args)
    sh(project, env, "git", "add", "-A")
    sh(project, env, "git", "commit", "-qm", f"recipe {name}")
    return out


def history(project: Path) -> pd.DataFrame:
    return pd.read_csv(project / "plots/train/history.csv")


@pytest.mark.slow
def test_000_ct_transfer_with_freeze_then_unfreeze(project, tmp_path, subprocess_env):
    root = tmp_path / "ct"
    for k, name in enumerate(("normal", "covid", "cap")):
        for p in range(8):
            for s in range(3):
                picture(root / name / f"pt{k}{p:02d}_slice{s}.png", k * 100 + p * 3 + s, 25 * k)
    weights = weights_file(tmp_path / "resnet34.pth", "resnet34")
    apply_recipe(
        project,
        subprocess_env,
        "000-ct",
        f"data.path={root}",
        f"model.weights={weights}",
        "model.freeze_epochs=1",
    )
    out = sh(project, subprocess_env, "dvc", "repro")
    assert ran(out) == set(STAGES)
    assert re.search(r"^download: 72 images of 24 patients", out, re.M), out
    assert "no patient ids" not in out
    meta = load_checkpoint(project / "models/model.pt").meta.to_dict()
    assert meta["model_name"] == "resnet34" and "resnet34.pth" in meta["weights_source"]
    trainable = history(project)["trainable_params"].tolist()
    assert trainable[0] < trainable[1] / 100  # the head alone, then the whole network
    result = read_result(project / "metrics/evaluate.json")
    assert result["ci_unit"] == "patient" and set(result["per_class"]) == {"normal", "covid", "cap"}
    assert all("ci" in row for row in result["per_class"].values())


@pytest.mark.slow
def test_001_mura_abnormal_is_positive_with_kappa_per_body_part(project, tmp_path, subprocess_env):
    rows = []
    for part in ("elbow", "hand", "wrist"):
        for p in range(16):
            label = ("abnormal", "normal")[p % 2]
            for s in range(2):
                image = f"MURA/{part}/patient{p:03d}/image{s}.png"
                picture(tmp_path / image, seed(part, p, s), 30 * (label == "abnormal"))
                split = "test" if p >= 12 else "train"
                rows.append((image, label, f"{part}{p}", part, split))
    csv = tmp_path / "mura.csv"
    columns = ["image", "label", "patient", "body_part", "split"]
    pd.DataFrame(rows, columns=columns).to_csv(csv, index=False)
    weights = weights_file(tmp_path / "densenet121.pth", "densenet121")
    apply_recipe(
        project, subprocess_env, "001-mura", f"data.path={csv}", f"model.weights={weights}"
    )
    out = sh(project, subprocess_env, "dvc", "repro")
    print(re.search(r"^evaluate: .*$", out, re.M).group(0))  # shown in the issue note
    assert re.search(r"^download: 96 images .*; positive class abnormal", out, re.M), out
    assert re.search(r"^evaluate: .*positive abnormal: threshold", out, re.M), out
    card = json.loads((project / "data/raw/dataset.json").read_text())
    assert card["classes"] == ["abnormal", "normal"] and card["positive_class"] == "abnormal"
    assert load_checkpoint(project / "models/model.pt").meta.positive_class == "abnormal"
    headline = json.loads((project / "metrics/evaluate.json").read_text())
    assert headline["positive_class"] == "abnormal" and "kappa" in headline
    assert 0 <= headline["sensitivity"] <= 1 and 0 <= headline["specificity"] <= 1
    result = read_result(project / "metrics/evaluate.json")
    assert set(result["per_group"]) == {"elbow", "hand", "wrist"}
    for group in result["per_group"].values():
        assert group["n"] == 8 and "kappa" in group and len(group["ci"]["kappa"]) == 2
    assert result["threshold"]["positive_class"] == "abnormal"
    trainable = history(project)["trainable_params"]
    total = sum(v.numel() for v in load_checkpoint(project / "models/model.pt").state_dict.values())
    assert (trainable < total / 2).all()  # only the last dense block and the head
    report = (project / "reports/report.html").read_text()
    assert (
        "positive class <b>abnormal</b>" in report and "Positive class: <b>abnormal</b>" in report
    )


@pytest.mark.slow
def test_002_brain_mri_latency_and_both_exports(project, tmp_path, subprocess_env):
    root = tmp_path / "brain-tumor-mri"
    classes = ("glioma", "meningioma", "notumor", "pituitary")
    for split, n in (("Training", 10), ("Testing", 4)):
        for k, name in enumerate(classes):
            for i in range(n):
                picture(root / split / name / f"{split[:2]}_{i:03d}.jpg", seed(split, k, i), 20 * k)
    apply_recipe(project, subprocess_env, "002-brain-mri", f"data.path={root}")
    out = sh(project, subprocess_env, "dvc", "repro")
    assert "no patient ids" in out  # this dataset has none: said, not hidden
    assert re.search(r"^split: official: train \d+ .* test 16 ", out, re.M), out
    result = read_result(project / "metrics/evaluate.json")
    assert result["latency_ms"] > 0 and result["params_millions"] > 3
    assert len(result["per_class"]) == 4 and "positive_class" not in result
    exported = read_result(project / "metrics/export.json")
    assert (project / "models/model.ts").stat().st_size > 1e6
    assert (project / "models/model.onnx").stat().st_size > 1e6
    assert json.dumps(exported).count("max_abs_diff") >= 2
    meta = load_checkpoint(project / "models/model.pt").meta.to_dict()
    assert meta["params"]["augment"]["policy"] == "autoaugment"


@pytest.mark.slow
def test_003_kaggle_pneumonia_folders_resplit_by_patient(project, tmp_path, subprocess_env):
    root = tmp_path / "chest_xray"
    patients = 0
    for k, (split, n) in enumerate((("train", 10), ("val", 1), ("test", 3))):
        for i in range(n):
            number = 100 * k + i
            for j, kind in enumerate(("bacteria", "virus")):  # one patient, two files
                name = f"person{number}_{kind}_{j}.jpeg"
                picture(root / split / "PNEUMONIA" / name, seed(name), 30)
            stem = "NORMAL2-IM" if i % 2 else "IM"
            for j in range(2):
                name = f"{stem}-{number:04d}-000{j}.jpeg"
                picture(root / split / "NORMAL" / name, seed(name))
            patients += 2
    apply_recipe(project, subprocess_env, "003-cxr-pneumonia", f"data.path={root}")
    out = sh(project, subprocess_env, "dvc", "repro")
    assert re.search(
        rf"^download: 56 images of {patients} patients .*positive class PNEUMONIA", out, re.M
    ), out
    assert "no patient ids" not in out
    split = json.loads((project / "metrics/split.json").read_text())
    assert split["strategy"] == "patient" and split["patient_overlap"] == 0
    for part in ("train", "val", "test"):  # a patient's two files travel together
        frame = pd.read_csv(project / f"data/split/{part}.csv")
        assert (frame.groupby("patient_id").size() == 2).all()
    result = json.loads((project / "metrics/evaluate.json").read_text())
    assert result["positive_class"] == "PNEUMONIA" and result["ci_unit"] == "patient"
    meta = load_checkpoint(project / "models/model.pt").meta.to_dict()
    assert meta["params"]["train"]["sampler"] == "balanced"
    assert meta["preprocess"]["equalize"] == "global" and meta["preprocess"]["crop_borders"]


@pytest.mark.slow
def test_004_lung_disease_grid_embedding_and_cams(project, tmp_path, subprocess_env):
    findings = ("",) * 8 + ("Effusion", "Nodule", "Effusion|Pneumonia", "Pneumonia|Nodule")
    rows = []
    for p in range(60):
        for s in range(2):
            name = f"{p:05d}_{s:03d}.png"
            picture(tmp_path / "nih" / name, p * 7 + s, 10 * (p % len(findings)))
            rows.append((name, findings[p % len(findings)], p))
    csv = tmp_path / "nih" / "labels.csv"
    pd.DataFrame(rows, columns=["Image Index", "Finding Labels", "Patient ID"]).to_csv(
        csv, index=False
    )
    apply_recipe(project, subprocess_env, "004-lung-disease", f"data.path={csv}")
    grid = ["-S", "model.name=resnet18,efficientnet_b0,densenet121"]
    # a 2-epoch EfficientNet on 120 toy images has BatchNorm statistics from a few batches;
    # its ONNX graph then differs by up to 8e-4 in probability (1e-6 for the default run)
    grid += ["-S", "export.tolerance=0.002"]
    sh(project, subprocess_env, "dvc", "exp", "run", "--queue", *grid)
    sh(project, subprocess_env, "dvc", "exp", "run", "--run-all", "-j", "1")
    status = sh(project, subprocess_env, "dvc", "queue", "status")
    assert status.count("Success") == 3, status
    out = sh(
        project,
        subprocess_env,
        "medpipe",
        "compare",
        "--out",
        "reports/compare.html",
        "--param",
        "model.name",
        "--metric",
        "roc_auc",
    )
    assert re.search(r"^compare: 3 runs", out, re.M), out
    page = (project / "reports/compare.html").read_text()
    for name in ("resnet18", "efficientnet_b0", "densenet121"):
        assert page.count(f"<td>{name}</td>") == 1, name
    # one run's outputs into the workspace: the study's t-SNE and Grad-CAM files
    shown = json.loads(sh(project, subprocess_env, "dvc", "exp", "show", "--json"))
    runs = [e["revs"][0] for c in shown for e in c.get("experiments") or []]
    dense = [
        r
        for r in runs
        if r["data"]["params"]["params.yaml"]["data"]["model"]["name"] == "densenet121"
    ]
    assert len(dense) == 1
    sh(project, subprocess_env, "dvc", "exp", "apply", dense[0].get("name") or dense[0]["rev"])
    split = json.loads((project / "metrics/split.json").read_text())
    assert split["train"]["n_images"] < split["train"]["n_images_before"]  # undersampled
    embedding = pd.read_csv(project / "plots/embed/embedding.csv")
    assert {"x", "y"} <= set(embedding.columns) and len(embedding) > 0
    cams = sorted(p.name for p in (project / "plots/explain").glob("*.png"))
    assert cams == ["Effusion.png", "Nodule.png", "Pneumonia.png"]
    result = json.loads((project / "metrics/evaluate.json").read_text())
    assert {"roc_auc", "f1_micro", "hamming_loss"} <= set(result)
