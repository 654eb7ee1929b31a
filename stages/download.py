"""download stage: bring a dataset into data/raw as images + manifest.csv + dataset.json."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from stages import synthetic
from stages.io import MANIFEST_COLUMNS, atomic_dir, npz_writer, write_csv, write_json
from stages.params import DataParams

RAW_DIR = Path("data/raw")


def build_synthetic(params: DataParams, out: Path) -> tuple[pd.DataFrame, dict]:
    """Generate the phantoms into `out`; return the manifest and dataset card."""
    syn = params.synthetic
    rows = []
    # streamed into two array files: memory stays flat whatever n_patients is
    with (
        npz_writer(out / "images.npz") as add_image,
        npz_writer(
            out / "masks.npz",
            compress=True,  # masks are mostly zeros
        ) as add_mask,
    ):
        for ph in synthetic.iter_phantoms(syn):
            add_image(ph.key, ph.image)
            if ph.mask is not None:
                add_mask(ph.key, ph.mask)
            mask_ref = "" if ph.mask is None else f"masks.npz#{ph.key}"
            rows.append((f"images.npz#{ph.key}", ph.label, ph.patient_id, "", mask_ref))
    manifest = pd.DataFrame(rows, columns=[*MANIFEST_COLUMNS, "mask"])
    card = {
        "name": "synthetic-cxr",
        "source": "synthetic",
        "task": "binary" if len(syn.classes) == 2 else "multiclass",
        "classes": list(syn.classes),
        "channels": 1,
        "description": "Procedural chest radiograph phantoms (medpipe), seed "
        f"{syn.seed}, difficulty {syn.difficulty}",
        "license": "CC0-1.0 (generated)",
    }
    return manifest, card


def _medmnist_info(stem: str) -> dict | None:
    """MedMNIST INFO entry for a file named like `pneumoniamnist[_64].npz`, if medmnist is here."""
    try:
        from medmnist import INFO
    except ImportError:
        return None
    return INFO.get(stem.split("_")[0].lower())


def build_npz(params: DataParams, out: Path) -> tuple[pd.DataFrame, dict]:
    """Copy a MedMNIST-format .npz into `out` and index its official splits."""
    src = Path(params.path or "")
    if not src.is_file():
        raise FileNotFoundError(f"data.path: {src} not found (expected a MedMNIST-format .npz)")
    with np.load(src, allow_pickle=False) as arrays:
        names = set(arrays.files)
        expected = {f"{s}_{k}" for s in ("train", "val", "test") for k in ("images", "labels")}
        if not expected <= names:
            raise ValueError(
                f"data.path: {src} lacks arrays {sorted(expected - names)}; a MedMNIST file "
                "holds {train,val,test}_{images,labels}"
            )
        labels = {s: np.asarray(arrays[f"{s}_labels"]) for s in ("train", "val", "test")}
        shape = arrays["train_images"].shape
    if any(lab.ndim == 2 and lab.shape[1] > 1 for lab in labels.values()):
        raise ValueError(f"data.path: {src} is multi-label; this version reads single-label only")
    n_classes = int(max(lab.max() for lab in labels.values())) + 1
    info = _medmnist_info(src.stem)
    if info and len(info["label"]) == n_classes:
        classes = [info["label"][str(i)] for i in range(n_classes)]
    else:
        classes = [f"class_{i}" for i in range(n_classes)]
    shutil.copyfile(src, out / "source.npz")
    rows = []
    for split, lab in labels.items():
        for i, y in enumerate(lab.reshape(len(lab), -1)[:, 0]):
            rows.append((f"source.npz#{split}/{i}", classes[int(y)], f"{split}-{i}", split))
    manifest = pd.DataFrame(rows, columns=["image", "label", "patient_id", "source_split"])
    card = {
        "name": src.stem,
        "source": "npz",
        "task": "binary" if n_classes == 2 else "multiclass",
        "classes": classes,
        "channels": 3 if len(shape) == 4 else 1,
        "description": info["description"] if info else f"MedMNIST-format file {src.name}",
        "license": info["license"] if info else "",
        "patients_known": False,
    }
    return manifest, card


BUILDERS = {"synthetic": build_synthetic, "npz": build_npz}


def run(params: DataParams, raw_dir: Path = RAW_DIR) -> str:
    """Build data/raw atomically; return the summary line."""
    start = time.perf_counter()
    with atomic_dir(raw_dir) as out:
        manifest, card = BUILDERS[params.source](params, out)
        counts = manifest["label"].value_counts()
        empty = [c for c in card["classes"] if counts.get(c, 0) == 0]
        if empty:
            raise ValueError(f"data: class(es) {empty} have no images; check the source")
        card["n_images"] = len(manifest)
        card["n_patients"] = int(manifest["patient_id"].nunique())
        card["class_counts"] = {c: int(counts.get(c, 0)) for c in card["classes"]}
        write_csv(out / "manifest.csv", manifest)
        write_json(out / "dataset.json", card)
    per_class = ", ".join(f"{c} {n:,}" for c, n in card["class_counts"].items())
    return (
        f"download: {card['n_images']:,} images of {card['n_patients']:,} patients "
        f"({per_class}) -> {raw_dir} in {time.perf_counter() - start:.1f} s"
    )
