"""Splitting: train/val/test by patient (stratified, no leakage), near-duplicate clusters from
thumbnails, undersampling. The split stage runs these; embed uses `rarest_label`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from stages.lib import paths
from stages.lib.images import read_image, thumbnail
from stages.lib.io import SPLITS
from stages.lib.labels import LABEL_SEPARATOR, count_classes
from stages.lib.params import SplitParams

# RMS difference (0-255) of 16x16 thumbnails: the same picture at or below this. Tuned on the
# Kaggle brain-tumour MRI set (96 px; benchmarks/duplicates.py): at 6 every Testing image
# joined to a Training one is a copy (470 of 470: correlation >= 0.997 after intensity
# normalisation, a sample checked by eye); 8 starts joining neighbouring slices (3 of 474).
DUPLICATE_RMS = 6.0


CHUNK = 2048  # rows per block of the pairwise distance computation


def split_by_patient(
    manifest: pd.DataFrame,
    val: float,
    test: float,
    seed: int,
    groups: pd.Series | None = None,
    strata: pd.Series | None = None,
) -> pd.Series:
    """Assign each image to train/val/test so that no group (patient) spans two splits.

    Groups are stratified by their most common stratum (default: the label): within each
    stratum, a shuffled list of groups is cut into test, val and train shares (each share
    at least one group when the stratum has three or more).
    """
    groups = manifest["patient_id"] if groups is None else groups
    strata = manifest["label"] if strata is None else strata
    group_label = strata.groupby(groups).agg(lambda s: s.value_counts().index[0])
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


def rarest_label(labels: pd.Series, classes: list[str]) -> pd.Series:
    """Multi-label stratum: the rarest positive label of each row ("" for none).

    Stratifying on full label sets splinters into many tiny strata; the rarest label keeps
    every label present in every split as far as the data allow.
    """
    counts = count_classes(labels, classes, multilabel=True)
    rank = {c: i for i, c in enumerate(sorted(classes, key=lambda c: (counts[c], c)))}
    return labels.map(
        lambda s: min(filter(None, s.split(LABEL_SEPARATOR)), key=rank.__getitem__, default="")
    )


def cluster_duplicates(thumbs: np.ndarray, rms: float = DUPLICATE_RMS) -> np.ndarray:
    """Cluster id per image (the index of one member): near-identical images share one.

    Identical thumbnails are merged first; the rest are compared only within buckets of a
    coarse key (4x4 block means in 8 levels, at two offsets so that values near a level
    boundary still meet), and joined when their thumbnails' RMS difference is <= `rms`.
    """
    n = len(thumbs)
    flat = thumbs.reshape(n, -1)
    if n == 0:
        return np.zeros(0, np.int64)
    _, first, inverse = np.unique(flat, axis=0, return_index=True, return_inverse=True)
    parent = first[inverse.ravel()].astype(np.int64)  # exact copies -> first occurrence

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    reps = np.sort(first)
    values = flat[reps].astype(np.float32)
    coarse = values.reshape(len(reps), 4, 4, 4, 4).mean(axis=(2, 4)).reshape(len(reps), -1)
    for offset in (0.0, 16.0):
        _, bucket = np.unique((coarse + offset) // 32, axis=0, return_inverse=True)
        bucket = bucket.ravel()
        order = np.argsort(bucket, kind="stable")
        starts = np.flatnonzero(np.diff(bucket[order], prepend=-1))
        for members in np.split(order, starts[1:]):
            for a, b in _close_pairs(values[members], rms):
                ra, rb = find(int(reps[members[a]])), find(int(reps[members[b]]))
                parent[max(ra, rb)] = min(ra, rb)
    return np.array([find(i) for i in range(n)])


def _close_pairs(x: np.ndarray, rms: float) -> list[tuple[int, int]]:
    """Index pairs (a < b) of rows of `x` whose RMS difference is <= rms (blockwise)."""
    if len(x) < 2:
        return []
    limit = rms**2 * x.shape[1]
    norms = (x**2).sum(axis=1)
    pairs = []
    for start in range(0, len(x), CHUNK):
        block = x[start : start + CHUNK]
        d2 = norms[start : start + CHUNK, None] + norms[None, :] - 2 * block @ x.T
        a, b = np.nonzero(d2 <= limit)
        a += start
        pairs += [(int(i), int(j)) for i, j in zip(a, b, strict=True) if i < j]
    return pairs


def merge_groups(groups: pd.Series, cluster: np.ndarray) -> pd.Series:
    """Groups (patients) joined wherever near-duplicate images link them."""
    linked = pd.Series(cluster, index=groups.index)
    multi = linked[linked.duplicated(keep=False)]
    if multi.empty:
        return groups
    parent: dict[str, str] = {}

    def find(g: str) -> str:
        while parent.get(g, g) != g:
            g = parent[g]
        return g

    for _, members in groups[multi.index].groupby(multi):
        names = sorted({find(g) for g in members})
        for g in names[1:]:
            parent[g] = names[0]
    return groups.map(find)


def duplicates_across(cluster: np.ndarray, column: pd.Series) -> pd.DataFrame:
    """Rows whose near-duplicate lies in another split: position, split, cluster id."""
    frame = pd.DataFrame({"cluster": cluster, "split": column.to_numpy()})
    frame = frame[frame["split"].isin(SPLITS)]
    spread = frame.groupby("cluster")["split"].nunique()
    return frame[frame["cluster"].isin(spread.index[spread > 1])]


def copies_of_earlier(cluster: np.ndarray, column: pd.Series) -> pd.Series:
    """Rows that repeat an image of an earlier split (train < val < test): the position of
    the kept copy, indexed like `column`; rows with no copy in an earlier split are absent.

    Dropping these keeps every split (the source's test set above all) and removes only
    what would let a model be scored on an image it was trained or selected on.
    """
    rank = column.map({s: i for i, s in enumerate(SPLITS)})
    frame = pd.DataFrame(
        {"cluster": cluster, "rank": rank.to_numpy(), "pos": np.arange(len(column))},
        index=column.index,
    ).dropna(subset=["rank"])
    first = frame.sort_values(["rank", "pos"]).groupby("cluster")[["rank", "pos"]].first()
    keeper = first.loc[frame["cluster"]].set_axis(frame.index)
    later = frame["rank"] > keeper["rank"]
    return keeper.loc[later, "pos"].astype(np.int64)


def load_thumbnails(raw_dir: Path, manifest: pd.DataFrame) -> np.ndarray:
    """(N, 16, 16) thumbnails from the download stage, or computed from the images."""
    path = raw_dir / paths.THUMBNAILS_NAME
    if not path.is_file():  # a manifest written by hand or by an older download stage
        return np.stack([thumbnail(read_image(raw_dir, ref)) for ref in manifest["image"]])
    thumbs = np.load(path)
    if len(thumbs) != len(manifest):
        raise ValueError(
            f"{path}: {len(thumbs)} thumbnails for {len(manifest)} manifest rows; "
            "rerun `medpipe download`"
        )
    return thumbs


def undersample(
    frame: pd.DataFrame,
    how: str,
    ratio: float,
    max_per_class: int | None,
    seed: int,
    multilabel: bool = False,
) -> pd.DataFrame:
    """Randomly drop images of the larger classes (keeps row order).

    Multi-label data: only the images without any finding are cut (the "no finding"
    majority that lung-disease studies undersample), to as many as the images with a
    finding (majority), `ratio` times as many (ratio), at most `max_per_class`; images
    with findings are all kept, so no finding loses positives.
    """
    rng = np.random.default_rng(seed)
    if multilabel:
        empty = frame["label"].astype(str).str.strip() == ""
        found = int((~empty).sum())
        cap = {"none": np.inf, "majority": found, "ratio": ratio * found}[how]
        if max_per_class is not None:
            cap = min(cap, max_per_class)
        rows = frame.index[empty].to_numpy()
        n = int(min(len(rows), cap))
        keep = [*frame.index[~empty], *rng.choice(rows, n, replace=False)]
        return frame.loc[sorted(keep)]
    counts = frame["label"].value_counts()
    cap = {"none": np.inf, "majority": counts.min(), "ratio": ratio * counts.min()}[how]
    if max_per_class is not None:
        cap = min(cap, max_per_class)
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


def assign_splits(
    manifest: pd.DataFrame,
    params: SplitParams,
    cluster: np.ndarray | None = None,
    strata: pd.Series | None = None,
) -> pd.Series:
    """Split column for the chosen strategy (`auto` already resolved).

    `cluster` (from `cluster_duplicates`) keeps near-duplicates together where the
    strategy chooses; `strata` replaces the label for stratification (multi-label).
    """
    cluster = np.arange(len(manifest)) if cluster is None else cluster
    if params.strategy in ("patient", "image"):
        groups = (
            manifest["patient_id"]
            if params.strategy == "patient"
            else pd.Series(manifest.index.astype(str), index=manifest.index)
        )
        groups = merge_groups(groups, cluster)
        return split_by_patient(manifest, params.val, params.test, params.seed, groups, strata)
    official = manifest["source_split"].astype(str)
    bad = sorted(set(official) - set(SPLITS))
    if bad:
        raise ValueError(
            f"split.strategy official: manifest source_split has {bad}; every row needs one "
            f"of {list(SPLITS)} (choose split.strategy patient for data without splits)"
        )
    if "val" not in set(official):  # carve validation out of train, by patient
        train = official == "train"
        groups = merge_groups(manifest["patient_id"], cluster)[train]
        inner = split_by_patient(
            manifest[train],
            params.val,
            0.0,
            params.seed,
            groups,
            None if strata is None else strata[train],
        )
        official = official.where(official != "train", inner)
    return official
