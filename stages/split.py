"""split stage: train/val/test by patient (no leakage), optional undersampling of train."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from stages.io import MANIFEST_COLUMNS, SPLITS, read_csv, read_json, write_csv, write_json
from stages.params import SplitParams

RAW_DIR = Path("data/raw")
SPLIT_DIR = Path("data/split")
METRICS_FILE = Path("metrics/split.json")


def split_by_patient(
    manifest: pd.DataFrame, val: float, test: float, seed: int, groups: pd.Series | None = None
) -> pd.Series:
    """Assign each image to train/val/test so that no group (patient) spans two splits.

    Groups are stratified by their most common label: within each class, a shuffled list of
    groups is cut into test, val and train shares (each share at least one group when the
    class has three or more).
    """
    groups = manifest["patient_id"] if groups is None else groups
    group_label = manifest.groupby(groups)["label"].agg(lambda s: s.value_counts().index[0])
    rng = np.random.default_rng(seed)
    assignment: dict[str, str] = {}
    for label in sorted(group_label.unique()):
        members = np.array(sorted(group_label.index[group_label == label]))
        rng.shuffle(members)
        n = len(members)
        n_test = max(round(n * test), int(test > 0 and n >= 3))
        n_val = max(round(n * val), int(val > 0 and n >= 3))
        for i, g in enumerate(members):
            assignment[g] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return groups.map(assignment)


def undersample(
    frame: pd.DataFrame, how: str, ratio: float, max_per_class: int | None, seed: int
) -> pd.DataFrame:
    """Randomly drop images of the larger classes (keeps row order)."""
    counts = frame["label"].value_counts()
    cap = {"none": np.inf, "majority": counts.min(), "ratio": ratio * counts.min()}[how]
    if max_per_class is not None:
        cap = min(cap, max_per_class)
    rng = np.random.default_rng(seed)
    keep = []
    for _label, rows in frame.groupby("label"):
        n = int(min(len(rows), cap))
        keep.extend(rng.choice(rows.index.to_numpy(), n, replace=False))
    return frame.loc[sorted(keep)]


def resolve_strategy(manifest: pd.DataFrame, strategy: str) -> str:
    """`auto` -> official when every row has a source split, else patient."""
    if strategy != "auto":
        return strategy
    return "official" if manifest["source_split"].isin(SPLITS).all() else "patient"


def assign_splits(manifest: pd.DataFrame, params: SplitParams) -> pd.Series:
    """Split column for the chosen strategy (`auto` already resolved)."""
    if params.strategy == "patient":
        return split_by_patient(manifest, params.val, params.test, params.seed)
    if params.strategy == "image":
        per_image = pd.Series(manifest.index.astype(str), index=manifest.index)
        return split_by_patient(manifest, params.val, params.test, params.seed, per_image)
    official = manifest["source_split"].astype(str)
    bad = sorted(set(official) - set(SPLITS))
    if bad:
        raise ValueError(
            f"split.strategy official: manifest source_split has {bad}; every row needs one "
            f"of {list(SPLITS)} (choose split.strategy patient for data without splits)"
        )
    if "val" not in set(official):  # carve validation out of train, by patient
        train = manifest[official == "train"]
        inner = split_by_patient(train, params.val, 0.0, params.seed)
        official = official.where(official != "train", inner)
    return official


def audit(
    splits: dict[str, pd.DataFrame], before: dict[str, pd.DataFrame], classes: list[str]
) -> dict:
    """Counts per split and the leakage check, for metrics/split.json."""
    patients = {s: set(f["patient_id"]) for s, f in splits.items()}
    overlap = set()
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1 :]:
            overlap |= patients[a] & patients[b]
    report: dict = {"patient_overlap": len(overlap)}
    for s in SPLITS:
        report[s] = {
            "n_images": len(splits[s]),
            "n_patients": len(patients[s]),
            "class_counts": {c: int((splits[s]["label"] == c).sum()) for c in classes},
            "class_counts_before": {c: int((before[s]["label"] == c).sum()) for c in classes},
        }
    return report


def run(
    params: SplitParams,
    raw_dir: Path = RAW_DIR,
    out_dir: Path = SPLIT_DIR,
    metrics_file: Path = METRICS_FILE,
) -> str:
    start = time.perf_counter()
    manifest = read_csv(raw_dir / "manifest.csv", required=MANIFEST_COLUMNS)
    classes = read_json(raw_dir / "dataset.json")["classes"]
    strategy = resolve_strategy(manifest, params.strategy)
    params = params.model_copy(update={"strategy": strategy})
    column = assign_splits(manifest, params)
    before = {s: manifest[column == s] for s in SPLITS}
    empty = [s for s in SPLITS if before[s].empty]
    if empty:
        raise ValueError(
            f"split: {empty} would be empty ({len(manifest)} images); use more "
            "data or larger split.val/split.test"
        )
    splits = dict(before)
    splits["train"] = undersample(
        before["train"], params.undersample, params.ratio, params.max_per_class, params.seed
    )
    report = audit(splits, before, classes)
    report["strategy"] = params.strategy
    if report["patient_overlap"] and params.strategy != "image":
        raise ValueError(f"split: {report['patient_overlap']} patient(s) appear in two splits")
    for s in SPLITS:
        write_csv(out_dir / f"{s}.csv", splits[s])
    write_json(metrics_file, report)
    sizes = ", ".join(
        f"{s} {report[s]['n_images']:,} ({report[s]['n_patients']:,} pts)" for s in SPLITS
    )
    warn = " WARNING: image-level split, patients leak" if report["patient_overlap"] else ""
    return (
        f"split: {params.strategy}: {sizes}; patient overlap "
        f"{report['patient_overlap']} in {time.perf_counter() - start:.1f} s{warn}"
    )
