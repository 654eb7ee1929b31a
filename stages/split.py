"""split stage: train/val/test by patient (no leakage), optional undersampling of train.

Near-duplicate images (same picture under two file names, re-encoded or resized) are
found from the download stage's 16x16 thumbnails: the patient and image strategies keep
them in one split, and any left across splits (official splits) fail the stage unless
`split.allow_duplicates` is set.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from stages.lib import paths
from stages.lib.io import (
    MANIFEST_COLUMNS,
    SPLITS,
    atomic_dir,
    read_csv,
    read_json,
    write_csv,
    write_json,
)
from stages.lib.labels import count_classes
from stages.lib.params import SplitParams
from stages.lib.splitting import (
    assign_splits,
    cluster_duplicates,
    copies_of_earlier,
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
        if multilabel:  # the images undersampling cuts: those with the empty label set
            for key, frame in (("n_no_finding", splits[s]), ("n_no_finding_before", before[s])):
                report[s][key] = int((frame["label"].astype(str).str.strip() == "").sum())
    return report


def missing_classes(report: dict, classes: list[str]) -> dict[str, list[str]]:
    """Per split, the classes it lacks that another split has."""
    present = {s: {c for c in classes if report[s]["class_counts"][c]} for s in SPLITS}
    anywhere = set().union(*present.values())
    return {s: [c for c in classes if c in anywhere - present[s]] for s in SPLITS}


def describe_gaps(report: dict, missing: list[str]) -> str:
    """`'normal' (12 in val, 14 in test)`: the missing classes with where they are."""
    parts = []
    for c in missing:
        where = [f"{report[s]['class_counts'][c]:,} in {s}" for s in SPLITS]
        where = [w for w in where if not w.startswith("0 ")]
        parts.append(f"{c!r} ({', '.join(where)})")
    return "class " + ", ".join(parts) if len(parts) == 1 else "classes " + ", ".join(parts)


def dropped_counts(
    manifest: pd.DataFrame,
    column: pd.Series,
    dropped: pd.Series,
    classes: list[str],
    multilabel: bool,
) -> dict:
    """metrics/split.json's dropped_duplicates: how many copies left val and test, by class."""
    report: dict = {"n_images": len(dropped)}
    for s in SPLITS[1:]:
        rows = manifest.loc[dropped.index[column[dropped.index] == s]]
        report[s] = {
            "n_images": len(rows),
            "class_counts": count_classes(rows["label"], classes, multilabel),
        }
    return report


def write_split_files(
    out: Path,
    splits: dict[str, pd.DataFrame],
    manifest: pd.DataFrame,
    dups: pd.DataFrame,
    dropped: pd.DataFrame,
) -> None:
    """{train,val,test}.csv and duplicates.csv: the copies dropped from val/test
    (split.drop_duplicates) and those allow_duplicates let through."""
    for s in SPLITS:
        write_csv(paths.split_table(out, s), splits[s])
    images = manifest["image"].to_numpy()
    allowed = pd.DataFrame(
        {
            "image": images[manifest.index.get_indexer(dups.index)],
            "split": dups["split"].to_numpy(),
            "same_as": images[dups["cluster"].to_numpy()],
            "action": "allowed",
        }
    )
    write_csv(out / paths.DUPLICATES_NAME, pd.concat([dropped, allowed], ignore_index=True))


def run(
    params: SplitParams,
    raw_dir: Path = paths.RAW,
    out_dir: Path = paths.SPLIT,
    metrics_file: Path = paths.SPLIT_METRICS,
) -> str:
    start = time.perf_counter()
    manifest = read_csv(raw_dir / paths.MANIFEST_NAME, required=MANIFEST_COLUMNS)
    card = read_json(raw_dir / paths.DATASET_CARD_NAME)
    classes, multilabel = card["classes"], card.get("task") == "multilabel"
    strategy = resolve_strategy(manifest, params.strategy)
    params = params.model_copy(update={"strategy": strategy})
    cluster = cluster_duplicates(load_thumbnails(raw_dir, manifest))
    strata = rarest_label(manifest["label"], classes) if multilabel else None
    column = assign_splits(manifest, params, cluster, strata)
    copies = copies_of_earlier(cluster, column) if params.drop_duplicates else pd.Series()
    dropped = pd.DataFrame(
        {
            "image": manifest.loc[copies.index, "image"].to_numpy(),
            "split": column[copies.index].to_numpy(),
            "same_as": manifest["image"].to_numpy()[copies.to_numpy(np.int64)],
            "action": "dropped",
        }
    )
    drop_report = dropped_counts(manifest, column, copies, classes, multilabel)
    column = column.where(~column.index.isin(copies.index), "")
    before = {s: manifest[column == s] for s in SPLITS}
    empty = [s for s in SPLITS if before[s].empty]
    if empty:
        advice = "smaller" if "train" in empty else "larger"
        raise ValueError(
            f"split: {empty} would be empty ({len(manifest)} images); use more data or "
            f"{advice} split.val/split.test (now {params.val}/{params.test})"
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
    if params.drop_duplicates:
        report["dropped_duplicates"] = drop_report
    if report["patient_overlap"] and params.strategy != "image":
        raise ValueError(f"split: {report['patient_overlap']} patient(s) appear in two splits")
    if len(dups) and not params.allow_duplicates:
        examples = ", ".join(manifest["image"].iloc[dups.index[:4]])
        raise ValueError(
            f"split: {len(dups)} image(s) have a near-duplicate in another split (e.g. "
            f"{examples}); they inflate test scores. Set split.drop_duplicates: true to keep "
            "the source's test set minus the copies of training images, use split.strategy "
            "patient to resplit, or set split.allow_duplicates: true to accept them"
        )
    gaps = missing_classes(report, classes)
    if gaps.get("train"):
        raise ValueError(
            f"split: the train split has no image of {describe_gaps(report, gaps['train'])}; "
            f"the model could never learn it ({len(manifest):,} images of "
            f"{manifest['patient_id'].nunique():,} patients in all). Give train more: smaller "
            f"split.val/split.test (now {params.val}/{params.test}), or more data"
        )
    with atomic_dir(out_dir) as tmp:  # all four files or none (a full disk keeps the old set)
        write_split_files(tmp, splits, manifest, dups, dropped)
    write_json(metrics_file, report)
    sizes = ", ".join(
        f"{s} {report[s]['n_images']:,} ({report[s]['n_patients']:,} pts)" for s in SPLITS
    )
    warn = " WARNING: image-level split, patients leak" if report["patient_overlap"] else ""
    if len(copies):
        warn += (
            f"; dropped {drop_report['val']['n_images']:,} val and "
            f"{drop_report['test']['n_images']:,} test image(s) that copy an earlier split "
            f"(see {out_dir / paths.DUPLICATES_NAME})"
        )
    for s in SPLITS[1:]:
        if gaps.get(s):
            warn += (
                f" WARNING: {s} has no image of {describe_gaps(report, gaps[s])}: its "
                f"per-class figures there are undefined"
            )
    if len(dups):
        warn += f" WARNING: {len(dups)} near-duplicate image(s) across splits (allowed)"
    return (
        f"split: {params.strategy}: {sizes}; patient overlap {report['patient_overlap']}, "
        f"duplicate overlap {len(dups)} in {time.perf_counter() - start:.1f} s{warn}"
    )
