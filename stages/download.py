"""download stage: bring a dataset into data/raw as images + manifest.csv + dataset.json.

Also written: `rejected.csv` (path, reason) for files that could not be read, and
`thumbnails.npy` ((N, 16, 16) uint8, one per manifest row) for the split stage's
near-duplicate check, computed here because every image is decoded here anyway.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from stages.lib import labels, paths
from stages.lib.images import thumbnail
from stages.lib.io import MANIFEST_COLUMNS, atomic_dir, npz_writer, write_csv, write_json
from stages.lib.labels import LABEL_SEPARATOR, count_classes
from stages.lib.parallel import available_cores
from stages.lib.params import DataParams
from stages.lib.sources import archives, csv_list, files, folders, medmnist, remote, synthetic

MEDMNIST_CITATION = (
    "Yang et al., MedMNIST v2, Scientific Data 2023 (https://medmnist.com); "
    "cite the source dataset too"
)


class RawData(NamedTuple):
    manifest: pd.DataFrame  # image, label, patient_id, source_split[, group, mask]
    card: dict  # dataset.json without the counts
    thumbnails: np.ndarray  # (N, 16, 16) uint8, row i <-> manifest row i
    rejected: pd.DataFrame  # path, reason, label
    notes: list[str]  # warnings for the summary line


NO_REJECTS = pd.DataFrame(columns=["path", "reason", "label"])


def build_synthetic(params: DataParams, out: Path) -> RawData:
    """Generate the phantoms into `out`."""
    syn = params.synthetic
    rows, thumbs = [], []
    # streamed into two array files: memory stays flat whatever n_patients is
    with (
        npz_writer(out / paths.PHANTOMS_NAME) as add_image,
        npz_writer(
            out / paths.PHANTOM_MASKS_NAME,
            compress=True,  # masks are mostly zeros
        ) as add_mask,
    ):
        for ph in synthetic.iter_phantoms(syn):
            add_image(ph.key, ph.image)
            thumbs.append(thumbnail(ph.image))
            if ph.mask is not None:
                add_mask(ph.key, ph.mask)
            mask_ref = "" if ph.mask is None else f"{paths.PHANTOM_MASKS_NAME}#{ph.key}"
            source = synthetic.source_split(syn, ph.site)
            rows.append(
                (
                    f"{paths.PHANTOMS_NAME}#{ph.key}",
                    ph.label,
                    ph.patient_id,
                    source,
                    ph.site,
                    mask_ref,
                )
            )
    manifest = pd.DataFrame(rows, columns=[*MANIFEST_COLUMNS, "group", "mask"])
    card = {
        "name": "synthetic-cxr",
        "source": "synthetic",
        "task": "binary" if len(syn.classes) == 2 else "multiclass",
        "classes": list(syn.classes),
        "channels": 1,
        "description": "Procedural chest radiograph phantoms (medpipe), seed "
        f"{syn.seed}, difficulty {syn.difficulty}"
        + (f"; sites {', '.join(s.name for s in syn.sites)}" if syn.sites else "")
        + (f"; test site {syn.test_site} (held out)" if syn.test_site else ""),
        "license": "CC0-1.0 (generated)",
    }
    return RawData(manifest, card, np.stack(thumbs), NO_REJECTS, [])


def build_npz(params: DataParams, out: Path) -> RawData:
    """A local MedMNIST-format .npz (`data.path`)."""
    src = Path(params.path or "").expanduser()
    if not src.is_file():
        raise FileNotFoundError(f"data.path: {src} not found (expected a MedMNIST-format .npz)")
    manifest, card, thumbs = medmnist.index_npz(src, out, medmnist.medmnist_entry(src.stem))
    card["source"] = "npz"
    return RawData(manifest, card, thumbs, NO_REJECTS, [])


def build_medmnist(params: DataParams, out: Path) -> RawData:
    """Download `data.flag` at `data.size` (URL and MD5 from medmnist's INFO) via the cache."""
    flag = params.flag or ""
    url, md5 = medmnist.medmnist_source(flag, params.size)
    fname = f"{flag}{'' if params.size == 28 else f'_{params.size}'}.npz"
    cache = remote.cache_dir(params.cache) / "medmnist"
    src = remote.fetch(remote.mirror_url(url, params.mirror), md5, fname, cache, params.retries)
    manifest, card, thumbs = medmnist.index_npz(src, out, medmnist.medmnist_info()[flag], link=True)
    card.update(
        name=Path(fname).stem, source="medmnist", url=url, md5=md5, citation=MEDMNIST_CITATION
    )
    return RawData(manifest, card, thumbs, NO_REJECTS, [])


def _workers() -> int:
    """Reader threads: decoding releases the GIL, so one per core (at most 8)."""
    return min(8, available_cores())


def from_files(frame: pd.DataFrame, out: Path, card: dict, hint: str) -> RawData:
    """Pack the files of `frame` (file, name, label, patient_id, patient_known,
    source_split[, group, problem]); `hint` says how to give patient ids."""
    kept, rejected, thumbs, colour = files.pack_images(frame, out / paths.ARCHIVE_NAME, _workers())
    columns = ["image", "label", "patient_id", "source_split"]
    if "group" in kept and (kept["group"] != "").any():
        columns.append("group")
    manifest = kept[columns].reset_index(drop=True)
    if card["task"] != "multilabel":
        card["task"] = "binary" if len(card["classes"]) == 2 else "multiclass"
    card["channels"] = 3 if colour else 1
    unknown = int((~kept["patient_known"]).sum())
    card["patients_known"] = unknown == 0
    notes = []
    if unknown and unknown == len(kept):
        notes.append(
            "WARNING: no patient ids, each image counts as its own patient: leakage between "
            f"splits cannot be checked ({hint})"
        )
    elif unknown:
        notes.append(
            f"WARNING: {unknown:,} image(s) without a patient id count as their own patient"
        )
    return RawData(manifest, card, thumbs, rejected, notes)


def build_folder(params: DataParams, out: Path, root: Path | None = None) -> RawData:
    """Class folders: `root/<class>/*` or `root/<split>/<class>/*`."""
    root = root or Path(params.path or "").expanduser()
    frame, empty = folders.scan_folder(root, params.follow_links)
    frame["patient_id"], frame["patient_known"] = folders.patients_from_paths(
        frame["below"], frame["name"], params.patient_regex
    )
    card = {
        "name": root.name,
        "source": "folder",
        "task": "",
        "classes": sorted(frame["label"].unique()),
        "description": f"Class folders under {root}",
        "license": "",
    }
    raw = from_files(frame, out, card, "set data.patient_regex")
    if empty:  # a class folder without files is no class: say so instead of dropping it
        raw.notes.append(f"NOTE: {len(empty)} empty folder(s) ignored: {', '.join(empty)}")
    return raw


MISSING_IDS = {"", "nan", "na", "n/a", "none", "null", "<na>", "#n/a", "-"}


def build_csv(
    params: DataParams, out: Path, path: Path | None = None, root: Path | None = None
) -> RawData:
    """A CSV of image paths and labels; columns mapped by `data.columns`.

    `path`/`root` default to data.path and data.root (image paths start from the CSV's
    folder when data.root is unset); the url source passes them inside the archive.
    """
    if path is None:
        path = Path(params.path or "").expanduser()
        root = Path(params.root).expanduser() if params.root else None
    frame = csv_list.rows_from_csv(path, root, params.columns.model_dump(), params.follow_links)
    frame["label"] = frame["label"].map(
        lambda s: LABEL_SEPARATOR.join(n.strip() for n in s.split(LABEL_SEPARATOR) if n.strip())
    )
    multilabel = frame["label"].str.contains(LABEL_SEPARATOR, regex=False).any()
    no_finding: list[str] = []
    if multilabel:  # "No Finding" is the empty label set, not a 15th class
        frame["label"], no_finding = labels.drop_no_finding(frame["label"], params.no_finding)
    else:
        if params.no_finding is not None:
            raise ValueError(
                f"data.no_finding: {path} has no `{LABEL_SEPARATOR}`-joined labels, so it is "
                "read as single-label (one class per image); unset data.no_finding"
            )
        frame.loc[(frame["label"] == "") & (frame["problem"] == ""), "problem"] = "no label"
    names = set(frame["label"].str.split(LABEL_SEPARATOR, regex=False).explode()) - {""}
    frame["patient_id"] = frame["patient_id"].str.strip()
    # spreadsheets write a missing id as NaN/NA/None: not one patient called "nan"
    missing = frame["patient_id"].str.lower().isin(MISSING_IDS)
    frame["patient_known"] = ~missing
    frame["patient_id"] = frame["patient_id"].where(
        frame["patient_known"], "image:" + frame["name"]
    )
    card = {
        "name": path.stem,
        "source": "csv",
        "task": "multilabel" if multilabel else "",
        "classes": sorted(names),
        "description": f"Images listed in {path.name}",
        "license": "",
    }
    if multilabel:
        card["no_finding"] = no_finding
    return from_files(frame, out, card, "map data.columns.patient_id")


def _inside(root: Path, relative: str | None, what: str) -> Path:
    """`root / relative`, refusing paths that leave `root`."""
    target = (root / (relative or "")).resolve()
    if not target.is_relative_to(root.resolve()) or not target.exists():
        raise FileNotFoundError(f"{what}: {relative!r} is not a path inside the archive")
    return target


def build_url(params: DataParams, out: Path) -> RawData:
    """A zip/tar archive with a known SHA-256, extracted once into the cache."""
    url, sha = params.url or "", params.sha256 or ""
    cache = remote.cache_dir(params.cache)
    name = archives.archive_name(url, sha)
    archive = remote.fetch(
        remote.mirror_url(url, params.mirror),
        f"sha256:{sha}",
        name,
        cache / "downloads",
        params.retries,
    )
    root = archives.extract_archive(
        archive, cache / "extracted" / sha[:16], params.max_extract_mb * 1e6
    )
    target = _inside(root, params.path, "data.path")
    while not params.path and len(entries := files.visible_entries(target)) == 1:
        if not entries[0].is_dir():
            break
        target = entries[0]  # archives often wrap everything in one top folder
    if target.is_file() and target.suffix.lower() == ".csv":
        base = _inside(root, params.root, "data.root") if params.root else target.parent
        raw = build_csv(params, out, target, base)
    else:
        raw = build_folder(params, out, target)
    raw.card.update(source="url", url=url, sha256=sha, name=name.split("-", 1)[1].split(".")[0])
    return raw


BUILDERS = {
    "synthetic": build_synthetic,
    "npz": build_npz,
    "medmnist": build_medmnist,
    "folder": build_folder,
    "csv": build_csv,
    "url": build_url,
}


def check_classes(raw: RawData) -> dict[str, int]:
    """Per-class counts; ValueError naming the cause when nothing or a class is left empty."""
    card, rejected = raw.card, raw.rejected
    multilabel = card["task"] == "multilabel"

    def why(rows: pd.DataFrame) -> str:
        if rows.empty:
            return ""
        first = rows.iloc[0]
        return f"; {len(rows):,} file(s) rejected, e.g. {first['path']}: {first['reason']}"

    if raw.manifest.empty:
        raise ValueError(f"data: no readable images in the {card['source']} source{why(rejected)}")
    if not card["classes"]:
        said = f" ({', '.join(card.get('no_finding') or [])})" if card.get("no_finding") else ""
        raise ValueError(
            f"data: no image of the {card['source']} source has a finding{said}: nothing to "
            "classify; check data.columns.label and data.no_finding"
        )
    counts = count_classes(raw.manifest["label"], card["classes"], multilabel)
    empty = [c for c, n in counts.items() if n == 0]
    if empty:
        labels = rejected["label"] if "label" in rejected else pd.Series("", index=rejected.index)
        hit = labels.str.split(LABEL_SEPARATOR, regex=False).map(
            lambda ls: bool(set(ls) & set(empty))
        )
        raise ValueError(f"data: class(es) {empty} have no images{why(rejected[hit.astype(bool)])}")
    return counts


def run(params: DataParams, raw_dir: Path = paths.RAW) -> str:
    """Build data/raw atomically; return the summary line."""
    start = time.perf_counter()
    with atomic_dir(raw_dir) as out:
        raw = BUILDERS[params.source](params, out)
        card = raw.card
        card["class_counts"] = check_classes(raw)
        card["positive_class"] = labels.positive_class(
            card["classes"], card["task"], params.positive_class
        )
        card["n_images"] = len(raw.manifest)
        card["n_patients"] = int(raw.manifest["patient_id"].nunique())
        if card["task"] == "multilabel":
            card["n_no_finding"] = int((raw.manifest["label"] == "").sum())
        write_csv(out / paths.MANIFEST_NAME, raw.manifest)
        write_csv(out / paths.REJECTED_NAME, raw.rejected)
        np.save(out / paths.THUMBNAILS_NAME, raw.thumbnails)
        write_json(out / paths.DATASET_CARD_NAME, card)
    per_class = ", ".join(f"{c} {n:,}" for c, n in card["class_counts"].items())
    extra = [f"positive class {card['positive_class']}"] if card["positive_class"] else []
    if "n_no_finding" in card:
        named = " / ".join(card.get("no_finding") or []) or "an empty label"
        extra.append(f"{card['n_no_finding']:,} image(s) with no finding ({named})")
    if len(raw.rejected):
        extra.append(f"{len(raw.rejected):,} rejected (see {raw_dir}/rejected.csv)")
    return "; ".join(
        [
            f"download: {card['n_images']:,} images of {card['n_patients']:,} patients "
            f"({per_class}) -> {raw_dir} in {time.perf_counter() - start:.1f} s",
            *extra,
            *raw.notes,
        ]
    )
