"""split stage: train/val/test by patient (no leakage), optional undersampling of train.

Near-duplicate images (same picture under two file names, re-encoded or resized) are
found from the download stage's 16x16 thumbnails: the patient and image strategies keep
them in one split, and any left across splits (official splits) fail the stage unless
`split.allow_duplicates` is set.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from stages.lib import paths
from stages.lib.io import (
    MANIFEST_COLUMNS,
    SPLITS,
    atomic_dir,
    count_classes,
    read_csv,
    read_json,
    write_csv,
    write_json,
)
from stages.lib.params import SplitParams
from stages.lib.splitting import (
    assign_splits,
    cluster_duplicates,
    duplicates_across,
    load_thumbnails,
    rarest_label,
    resolve_strategy,
    undersample,
)


def audit(
    splits: dict[str, pd.DataFrame],
    before: dict[str, pd.DataFrame],
    classes: list[str],
    multilabel: bool = False,
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
            "n_images_before": len(before[s]),  # differs from n_images after undersampling
            "n_patients": len(patients[s]),
            "class_counts": count_classes(splits[s]["label"], classes, multilabel),
            "class_counts_before": count_classes(before[s]["label"], classes, multilabel),
        }
    return report


def write_split_files(
    out: Path, splits: dict[str, pd.DataFrame], manifest: pd.DataFrame, dups: pd.DataFrame
) -> None:
    """{train,val,test}.csv and duplicates.csv (what allow_duplicates let through)."""
    for s in SPLITS:
        write_csv(out / f"{s}.csv", splits[s])
    frame = pd.DataFrame(
        {
            "image": manifest["image"].iloc[dups.index].to_numpy(),
            "split": dups["split"].to_numpy(),
            "same_as": manifest["image"].iloc[dups["cluster"]].to_numpy(),
        }
    )
    write_csv(out / "duplicates.csv", frame)


def run(
    params: SplitParams,
    raw_dir: Path = paths.RAW,
    out_dir: Path = paths.SPLIT,
    metrics_file: Path = paths.SPLIT_METRICS,
) -> str:
    start = time.perf_counter()
    manifest = read_csv(raw_dir / "manifest.csv", required=MANIFEST_COLUMNS)
    card = read_json(raw_dir / "dataset.json")
    classes, multilabel = card["classes"], card.get("task") == "multilabel"
    strategy = resolve_strategy(manifest, params.strategy)
    params = params.model_copy(update={"strategy": strategy})
    cluster = cluster_duplicates(load_thumbnails(raw_dir, manifest))
    strata = rarest_label(manifest["label"], classes) if multilabel else None
    column = assign_splits(manifest, params, cluster, strata)
    before = {s: manifest[column == s] for s in SPLITS}
    empty = [s for s in SPLITS if before[s].empty]
    if empty:
        raise ValueError(
            f"split: {empty} would be empty ({len(manifest)} images); use more "
            "data or larger split.val/split.test"
        )
    splits = dict(before)
    splits["train"] = undersample(
        before["train"],
        params.undersample,
        params.ratio,
        params.max_per_class,
        params.seed,
        multilabel,
    )
    kept = pd.Series("", index=manifest.index)
    for s in SPLITS:
        kept[splits[s].index] = s
    dups = duplicates_across(cluster, kept)
    report = audit(splits, before, classes, multilabel)
    report["strategy"] = params.strategy
    report["duplicate_overlap"] = len(dups)
    if report["patient_overlap"] and params.strategy != "image":
        raise ValueError(f"split: {report['patient_overlap']} patient(s) appear in two splits")
    if len(dups) and not params.allow_duplicates:
        examples = ", ".join(manifest["image"].iloc[dups.index[:4]])
        raise ValueError(
            f"split: {len(dups)} image(s) have a near-duplicate in another split (e.g. "
            f"{examples}); they inflate test scores. Remove them from the source, use "
            "split.strategy patient, or set split.allow_duplicates: true to accept them"
        )
    with atomic_dir(out_dir) as tmp:  # all four files or none (a full disk keeps the old set)
        write_split_files(tmp, splits, manifest, dups)
    write_json(metrics_file, report)
    sizes = ", ".join(
        f"{s} {report[s]['n_images']:,} ({report[s]['n_patients']:,} pts)" for s in SPLITS
    )
    warn = " WARNING: image-level split, patients leak" if report["patient_overlap"] else ""
    if len(dups):
        warn += f" WARNING: {len(dups)} near-duplicate image(s) across splits (allowed)"
    return (
        f"split: {params.strategy}: {sizes}; patient overlap {report['patient_overlap']}, "
        f"duplicate overlap {len(dups)} in {time.perf_counter() - start:.1f} s{warn}"
    )
