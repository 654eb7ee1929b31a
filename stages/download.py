"""download stage: bring a dataset into data/raw as images + manifest.csv + dataset.json.

Also written: `rejected.csv` (path, reason) for files that could not be read, and
`thumbnails.npy` ((N, 16, 16) uint8, one per manifest row) for the split stage's
near-duplicate check, computed here because every image is decoded here anyway.
"""

from __future__ import annotations

import os
import shutil
import time
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from tqdm import tqdm

from stages import collect, fetch, synthetic
from stages.io import (
    LABEL_SEPARATOR,
    SPLITS,
    atomic_dir,
    count_classes,
    npz_array,
    save_npz,
    thumbnail,
    write_csv,
    write_json,
)
from stages.params import DataParams

RAW_DIR = Path("data/raw")
MEDMNIST_CITATION = (
    "Yang et al., MedMNIST v2, Scientific Data 2023 (https://medmnist.com); "
    "cite the source dataset too"
)


class RawData(NamedTuple):
    manifest: pd.DataFrame  # image, label, patient_id, source_split[, group, mask]
    card: dict  # dataset.json without the counts
    thumbnails: np.ndarray  # (N, 16, 16) uint8, row i <-> manifest row i
    rejected: pd.DataFrame  # path, reason
    notes: list[str]  # warnings for the summary line


NO_REJECTS = pd.DataFrame(columns=["path", "reason"])


def build_synthetic(params: DataParams, out: Path) -> RawData:
    """Generate the phantoms into `out`."""
    syn = params.synthetic
    images, masks, frame = synthetic.generate(syn)
    save_npz(out / "images.npz", images)
    save_npz(out / "masks.npz", masks, compress=True)  # mostly zeros
    manifest = pd.DataFrame(
        {
            "image": "images.npz#" + frame["key"],
            "label": frame["label"],
            "patient_id": frame["patient_id"],
            "source_split": "",
            "mask": np.where(frame["has_mask"], "masks.npz#" + frame["key"], ""),
        }
    )
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
    thumbs = np.stack([thumbnail(images[k]) for k in frame["key"]])
    return RawData(manifest, card, thumbs, NO_REJECTS, [])


def _medmnist_entry(stem: str) -> dict | None:
    """medmnist INFO entry for a file named like `pneumoniamnist[_64].npz`, if any."""
    try:
        return fetch.medmnist_info().get(stem.split("_")[0].lower())
    except ValueError:  # medmnist not installed
        return None


def read_npz_labels(src: Path) -> tuple[dict[str, np.ndarray], tuple[int, ...]]:
    """Labels per split ((N, 1) or (N, L)) and the train image shape of a MedMNIST file."""
    with np.load(src, allow_pickle=False) as arrays:
        expected = {f"{s}_{k}" for s in SPLITS for k in ("images", "labels")}
        if not expected <= set(arrays.files):
            raise ValueError(
                f"{src} lacks arrays {sorted(expected - set(arrays.files))}; a MedMNIST "
                "file holds {train,val,test}_{images,labels}"
            )
        labels = {s: np.asarray(arrays[f"{s}_labels"]) for s in SPLITS}
    shapes = {s: npz_array(src, f"{s}_images").shape for s in SPLITS}
    for s in SPLITS:
        lab, shape = labels[s], shapes[s]
        if lab.ndim == 1:
            labels[s] = lab = lab[:, None]
        if len(lab) != shape[0] or lab.ndim != 2 or lab.dtype.kind not in "iub" or lab.min() < 0:
            raise ValueError(
                f"{src}: {s}_labels must be N x 1 class indices or N x L 0/1 flags for the "
                f"{shape[0]} images of {s}_images (got {lab.dtype} {lab.shape})"
            )
        if lab.shape[1] > 1 and lab.max() > 1:
            raise ValueError(f"{src}: multi-label {s}_labels must hold 0/1 flags")
        if len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] not in (1, 3)):
            raise ValueError(f"{src}: {s}_images must be N x H x W or N x H x W x 3; got {shape}")
    return labels, shapes["train"]


def place_npz(src: Path, dest: Path, link: bool) -> None:
    """Put an .npz in data/raw uncompressed (so readers memory-map single images).

    A compressed file is rewritten member by member; an uncompressed one is hard-linked
    (`link`, for files in our own cache) or copied.
    """
    with zipfile.ZipFile(src) as zf:
        if any(i.compress_type != zipfile.ZIP_STORED for i in zf.infolist()):
            with zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED, allowZip64=True) as out:
                for info in zf.infolist():
                    member = zipfile.ZipInfo(info.filename, date_time=collect.ZIP_DATE)
                    with zf.open(info) as s, out.open(member, "w", force_zip64=True) as d:
                        shutil.copyfileobj(s, d, fetch.CHUNK)
            return
    if link:
        try:
            os.link(src, dest)
            return
        except OSError:  # another file system, or links not allowed
            pass
    shutil.copyfile(src, dest)


def index_npz(src: Path, out: Path, entry: dict | None, link: bool = False) -> RawData:
    """Put a MedMNIST-format file in `out` as source.npz and index its official splits."""
    labels, shape = read_npz_labels(src)
    multilabel = any(lab.shape[1] > 1 for lab in labels.values())
    width = (
        labels["train"].shape[1] if multilabel else max(int(v.max()) for v in labels.values()) + 1
    )
    names = [entry["label"][str(i)] for i in range(len(entry["label"]))] if entry else []
    if multilabel:
        classes = names if len(names) == width else [f"label_{i}" for i in range(width)]
    else:
        classes = names if len(names) >= width else [f"class_{i}" for i in range(width)]
    place_npz(src, out / "source.npz", link)
    rows, thumbs = [], []
    for split, lab in labels.items():
        if multilabel:
            text = [
                LABEL_SEPARATOR.join(c for c, on in zip(classes, r, strict=True) if on) for r in lab
            ]
        else:
            text = [classes[int(y)] for y in lab[:, 0]]
        rows += [(f"source.npz#{split}/{i}", t, f"{split}-{i}", split) for i, t in enumerate(text)]
        images = npz_array(out / "source.npz", f"{split}_images")
        thumbs += [thumbnail(img) for img in tqdm(images, desc=f"{split} thumbnails", leave=False)]
    manifest = pd.DataFrame(rows, columns=["image", "label", "patient_id", "source_split"])
    task = "multilabel" if multilabel else "binary" if len(classes) == 2 else "multiclass"
    card = {
        "name": src.stem,
        "task": task,
        "classes": classes,
        "channels": 3 if len(shape) == 4 and shape[3] == 3 else 1,
        "description": entry["description"] if entry else f"MedMNIST-format file {src.name}",
        "license": entry["license"] if entry else "",
        "patients_known": False,
    }
    return RawData(manifest, card, np.stack(thumbs), NO_REJECTS, [])


def build_npz(params: DataParams, out: Path) -> RawData:
    """A local MedMNIST-format .npz (`data.path`)."""
    src = Path(params.path or "").expanduser()
    if not src.is_file():
        raise FileNotFoundError(f"data.path: {src} not found (expected a MedMNIST-format .npz)")
    raw = index_npz(src, out, _medmnist_entry(src.stem))
    raw.card["source"] = "npz"
    return raw


def build_medmnist(params: DataParams, out: Path) -> RawData:
    """Download `data.flag` at `data.size` (URL and MD5 from medmnist's INFO) via the cache."""
    flag = params.flag or ""
    url, md5 = fetch.medmnist_source(flag, params.size)
    fname = f"{flag}{'' if params.size == 28 else f'_{params.size}'}.npz"
    cache = fetch.cache_dir(params.cache) / "medmnist"
    src = fetch.fetch(fetch.mirror_url(url, params.mirror), md5, fname, cache, params.retries)
    raw = index_npz(src, out, fetch.medmnist_info()[flag], link=True)
    raw.card.update(
        name=Path(fname).stem, source="medmnist", url=url, md5=md5, citation=MEDMNIST_CITATION
    )
    return raw


def _workers() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(8, cores or 1))


def from_files(frame: pd.DataFrame, out: Path, card: dict, hint: str) -> RawData:
    """Pack the files of `frame` (file, name, label, patient_id, patient_known,
    source_split[, group, problem]); `hint` says how to give patient ids."""
    kept, rejected, thumbs, colour = collect.pack_images(frame, out / "images.zip", _workers())
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
    frame = collect.scan_folder(root)
    frame["patient_id"], frame["patient_known"] = collect.patients_from_paths(
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
    return from_files(frame, out, card, "set data.patient_regex")


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
    frame = collect.rows_from_csv(path, root, params.columns.model_dump())
    frame["label"] = frame["label"].map(
        lambda s: LABEL_SEPARATOR.join(n.strip() for n in s.split(LABEL_SEPARATOR) if n.strip())
    )
    multilabel = frame["label"].str.contains(LABEL_SEPARATOR, regex=False).any()
    if not multilabel:
        frame.loc[(frame["label"] == "") & (frame["problem"] == ""), "problem"] = "no label"
    names = set(frame["label"].str.split(LABEL_SEPARATOR, regex=False).explode()) - {""}
    frame["patient_id"] = frame["patient_id"].str.strip()
    frame["patient_known"] = frame["patient_id"] != ""
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
    cache = fetch.cache_dir(params.cache)
    name = fetch.archive_name(url, sha)
    archive = fetch.fetch(
        fetch.mirror_url(url, params.mirror),
        f"sha256:{sha}",
        name,
        cache / "downloads",
        params.retries,
    )
    root = fetch.extract_archive(
        archive, cache / "extracted" / sha[:16], params.max_extract_mb * 1e6
    )
    target = _inside(root, params.path, "data.path")
    while not params.path and len(entries := collect.visible_entries(target)) == 1:
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
    why = ""
    if len(rejected):
        first = rejected.iloc[0]
        why = f"; {len(rejected):,} file(s) rejected, e.g. {first['path']}: {first['reason']}"
    if raw.manifest.empty:
        raise ValueError(f"data: no readable images in the {card['source']} source{why}")
    counts = count_classes(raw.manifest["label"], card["classes"], card["task"] == "multilabel")
    empty = [c for c, n in counts.items() if n == 0]
    if empty:
        raise ValueError(f"data: class(es) {empty} have no images{why}")
    return counts


def run(params: DataParams, raw_dir: Path = RAW_DIR) -> str:
    """Build data/raw atomically; return the summary line."""
    start = time.perf_counter()
    with atomic_dir(raw_dir) as out:
        raw = BUILDERS[params.source](params, out)
        card = raw.card
        card["class_counts"] = check_classes(raw)
        card["n_images"] = len(raw.manifest)
        card["n_patients"] = int(raw.manifest["patient_id"].nunique())
        write_csv(out / "manifest.csv", raw.manifest)
        write_csv(out / "rejected.csv", raw.rejected)
        np.save(out / "thumbnails.npy", raw.thumbnails)
        write_json(out / "dataset.json", card)
    per_class = ", ".join(f"{c} {n:,}" for c, n in card["class_counts"].items())
    extra = (
        [f"{len(raw.rejected):,} rejected (see {raw_dir}/rejected.csv)"]
        if len(raw.rejected)
        else []
    )
    return "; ".join(
        [
            f"download: {card['n_images']:,} images of {card['n_patients']:,} patients "
            f"({per_class}) -> {raw_dir} in {time.perf_counter() - start:.1f} s",
            *extra,
            *raw.notes,
        ]
    )
