"""MedMNIST-format array files (`{train,val,test}_{images,labels}` in one .npz), the npz and
medmnist sources: MedMNIST's own URL/MD5 table, the file validated, kept as one uncompressed
file, indexed by `file.npz#split/i`."""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from stages.lib import paths
from stages.lib.catalog import medmnist_flags, medmnist_info
from stages.lib.images import thumbnail
from stages.lib.io import SPLITS, ZIP_DATE, npz_array
from stages.lib.labels import LABEL_SEPARATOR
from stages.lib.sources.remote import CHUNK


def medmnist_source(flag: str, size: int) -> tuple[str, str]:
    """(url, "md5:<hash>") of one MedMNIST file, from INFO (`url`/`MD5`, `url_64`/`MD5_64`...)."""
    entry = medmnist_info().get(flag)
    if entry is None or flag not in medmnist_flags():
        raise ValueError(
            f"data.flag: {flag!r} is not a 2D MedMNIST flag; one of {medmnist_flags()}"
        )
    suffix = "" if size == 28 else f"_{size}"
    url, md5 = entry.get(f"url{suffix}"), entry.get(f"MD5{suffix}")
    if not url or not md5:
        raise ValueError(f"data.size: medmnist has no {size} px version of {flag}")
    return url, f"md5:{md5}"


def medmnist_entry(stem: str) -> dict | None:
    """medmnist INFO entry for a file named like `pneumoniamnist[_64].npz`, if any."""
    try:
        return medmnist_info().get(stem.split("_")[0].lower())
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
                    member = zipfile.ZipInfo(info.filename, date_time=ZIP_DATE)
                    with zf.open(info) as s, out.open(member, "w", force_zip64=True) as d:
                        shutil.copyfileobj(s, d, CHUNK)
            return
    if link:
        try:
            os.link(src, dest)
            return
        except OSError:  # another file system, or links not allowed
            pass
    shutil.copyfile(src, dest)


def index_npz(
    src: Path, out: Path, entry: dict | None, link: bool = False
) -> tuple[pd.DataFrame, dict, np.ndarray]:
    """Put a MedMNIST-format file in `out` as source.npz and index its official splits.

    Returns the manifest (`source.npz#<split>/<i>` refs), the dataset card and the
    (N, 16, 16) thumbnails. Multi-label rows name their positive labels, `|`-joined.
    """
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
    place_npz(src, out / paths.MEDMNIST_NAME, link)
    rows, thumbs = [], []
    for split, lab in labels.items():
        if multilabel:
            text = [
                LABEL_SEPARATOR.join(c for c, on in zip(classes, r, strict=True) if on) for r in lab
            ]
        else:
            text = [classes[int(y)] for y in lab[:, 0]]
        rows += [
            (f"{paths.MEDMNIST_NAME}#{split}/{i}", t, f"{split}-{i}", split)
            for i, t in enumerate(text)
        ]
        images = npz_array(out / paths.MEDMNIST_NAME, f"{split}_images")
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
    return manifest, card, np.stack(thumbs)
