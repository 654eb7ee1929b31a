"""Image files for the download stage: find them (class folders or a CSV), read each once,
reject what cannot be read, and pack the rest into one uncompressed zip.

One zip instead of thousands of files keeps `data/raw` a handful of files for DVC (hashing,
checkout and push of many small files are slow), while keeping each file's original bytes
(no re-encoding, same size as the source). Members are read back by `stages.lib.images.read_image`
as `images.zip#<path>`.
"""

from __future__ import annotations

import os
import re
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from stages.lib.images import ImageError, decode_image, thumbnail
from stages.lib.io import LABEL_SEPARATOR, SPLITS, ZIP_DATE

SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}
IGNORED = {"__MACOSX", "Thumbs.db", "desktop.ini"}
BATCH = 256  # files decoded per batch (bounds memory while keeping threads busy)


def visible(path: Path) -> bool:
    """False for hidden files and OS litter (.DS_Store, __MACOSX, Thumbs.db)."""
    return not path.name.startswith(".") and path.name not in IGNORED


def visible_entries(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if visible(p))


def _subdirs(path: Path) -> list[Path]:
    return [p for p in visible_entries(path) if p.is_dir()]


def scan_folder(root: Path, follow_links: bool = False) -> tuple[pd.DataFrame, list[str]]:
    """Files of `root/<class>/**` or `root/<split>/<class>/**` (split: train, val, test).

    Returns one row per file: file (path), name (path below root), label (class folder),
    source_split (or ""), below (path below the class folder, for patient_regex), problem
    (why it is not read: a link leaving `root` unless `follow_links`); and the class
    folders that hold no file (named so that the summary can say so).
    """
    if not root.is_dir():
        raise FileNotFoundError(f"data.path: {root} is not a folder")
    top = _subdirs(root)
    if top and all(d.name.lower() in SPLIT_NAMES for d in top):
        groups = [(SPLIT_NAMES[d.name.lower()], c) for d in top for c in _subdirs(d)]
    else:
        groups = [("", c) for c in top]
    rows, empty, base = [], [], root.resolve()
    for split, class_dir in groups:
        if LABEL_SEPARATOR in class_dir.name:
            raise ValueError(f"{class_dir}: class names must not contain {LABEL_SEPARATOR!r}")
        found = 0
        for file in sorted(class_dir.rglob("*")):
            parts = file.relative_to(root).parts
            if file.is_file() and all(visible(Path(p)) for p in parts):
                below = file.relative_to(class_dir).as_posix()
                problem = link_problem(file, base, follow_links)
                rows.append((file, "/".join(parts), class_dir.name, split, below, problem))
                found += 1
        if not found:
            empty.append(class_dir.relative_to(root).as_posix())
    if len({label for _, _, label, _, _, _ in rows}) < 2:
        raise ValueError(
            f"data.path: {root} needs two or more class folders with files "
            "(root/<class>/* or root/<train|val|test>/<class>/*); found "
            f"{[d.name for d in top] or 'none'}"
        )
    columns = ["file", "name", "label", "source_split", "below", "problem"]
    return pd.DataFrame(rows, columns=columns), empty


def link_problem(file: Path, base: Path, follow_links: bool) -> str:
    """Why a file is not read: a symbolic link (anywhere on its path) that leads outside
    `base`, as for archive members; "" when it stays inside or links may be followed."""
    if follow_links or file.resolve().is_relative_to(base):
        return ""
    return f"link to {file.resolve()}, outside {base} (set data.follow_links: true to read it)"


def patients_from_paths(
    below: pd.Series, names: pd.Series, regex: str | None
) -> tuple[pd.Series, pd.Series]:
    """Patient ids from `regex` on `below` (first group, else the whole match).

    Files the regex does not match (all of them without a regex) count as their own
    patient, `image:<name>`. Returns the ids and a mask of the rows whose id was found.
    """
    fallback = "image:" + names
    if regex is None:
        return fallback, pd.Series(False, index=names.index)
    pattern = re.compile(regex)

    def patient(path: str) -> str | None:
        match = pattern.search(path)
        if match is None:
            return None
        return match.group(1) if match.groups() else match.group(0)

    found = below.map(patient)
    return found.where(found.notna(), fallback), found.notna()


def rows_from_csv(
    path: Path, root: Path | None, columns: dict[str, str | None], follow_links: bool = False
) -> pd.DataFrame:
    """Rows (file, name, label, patient_id, source_split, group) of a CSV source.

    Image paths are relative to `root` (default: the CSV's folder) and may not leave it.
    """
    if not path.is_file():
        raise FileNotFoundError(f"data.path: {path} not found (expected a CSV file)")
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    wanted = {k: v for k, v in columns.items() if v is not None}
    missing = sorted(v for v in wanted.values() if v not in table.columns)
    if missing:
        raise ValueError(
            f"{path}: column(s) {missing} not found (data.columns); it has {list(table.columns)}"
        )
    base = (root or path.parent).resolve()
    files = [
        Path(os.path.normpath(base / n.strip().replace("\\", "/"))) for n in table[wanted["image"]]
    ]
    inside = [f.is_relative_to(base) for f in files]
    frame = pd.DataFrame(
        {
            "file": files,
            "name": [
                f.relative_to(base).as_posix() if ok else str(f)
                for f, ok in zip(files, inside, strict=True)
            ],
            "label": table[wanted["label"]].str.strip(),
            "patient_id": table[wanted["patient_id"]] if "patient_id" in wanted else "",
            "source_split": "",
            "group": table[wanted["group"]] if "group" in wanted else "",
        }
    )
    if "split" in wanted:
        raw = table[wanted["split"]].str.strip().str.lower()
        bad = sorted(set(raw) - set(SPLIT_NAMES) - {""})
        if bad:
            raise ValueError(f"{path}: column {wanted['split']!r} has {bad}; use {list(SPLITS)}")
        frame["source_split"] = raw.map(lambda s: SPLIT_NAMES.get(s, ""))
    frame["problem"] = [
        link_problem(f, base, follow_links) if ok else f"path outside {base}"
        for f, ok in zip(files, inside, strict=True)
    ]
    frame.loc[table[wanted["image"]].str.strip() == "", "problem"] = "no image path"
    frame.loc[frame["name"].duplicated() & (frame["problem"] == ""), "problem"] = "listed twice"
    return frame


def _read_one(file: Path) -> tuple[np.ndarray | None, bool, str]:
    """(16x16 thumbnail, is colour, "") for a readable image, else (None, False, reason)."""
    try:
        img = decode_image(file.read_bytes(), file.name)
    except FileNotFoundError:
        return None, False, "file not found"
    except (ImageError, OSError) as exc:
        return None, False, str(exc)
    if min(img.shape[:2]) < 2:
        return None, False, f"too small ({img.shape[1]} x {img.shape[0]} px)"
    return thumbnail(img), _is_colour(img), ""


def _is_colour(img: np.ndarray) -> bool:
    """True for RGB images whose channels differ (gray saved as RGB is not colour)."""
    if img.ndim == 2:
        return False
    step = max(1, min(img.shape[:2]) // 64)
    sample = img[::step, ::step].astype(np.int16)
    return bool(np.abs(sample - sample[:, :, :1]).max() > 8)


def pack_images(
    frame: pd.DataFrame, zip_path: Path, workers: int
) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray, bool]:
    """Read every row's file (in threads), pack the readable ones into `zip_path`.

    Rows with a non-empty `problem` column are rejected without reading.

    Returns:
        kept rows (with `image` = `images.zip#<name>`), rejected rows (path, reason, label),
        (N, 16, 16) uint8 thumbnails of the kept rows, and whether any image is colour.
    """
    problem = frame["problem"] if "problem" in frame else pd.Series("", index=frame.index)
    keep, reasons, thumbs, colour = [], {}, [], False
    todo = frame.index[problem == ""]
    for i in frame.index[problem != ""]:
        reasons[i] = problem[i]
    with (
        ThreadPoolExecutor(max_workers=workers) as pool,
        zipfile.ZipFile(zip_path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf,
        tqdm(total=len(todo), desc="images", unit="img", leave=False, mininterval=2) as bar,
    ):
        for start in range(0, len(todo), BATCH):
            batch = todo[start : start + BATCH]
            results = pool.map(_read_one, frame.loc[batch, "file"])
            for i, (thumb, is_colour, reason) in zip(batch, results, strict=True):
                bar.update()
                if thumb is None:
                    reasons[i] = reason
                    continue
                info = zipfile.ZipInfo(frame.at[i, "name"], date_time=ZIP_DATE)
                info.external_attr = 0o644 << 16
                with (
                    open(frame.at[i, "file"], "rb") as src,
                    zf.open(info, "w", force_zip64=True) as dst,
                ):
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
                keep.append(i)
                thumbs.append(thumb)
                colour |= is_colour
    kept = frame.loc[keep].assign(image="images.zip#" + frame.loc[keep, "name"])
    rejected = pd.DataFrame(
        {
            "path": [frame.at[i, "name"] for i in sorted(reasons)],
            "reason": [reasons[i] for i in sorted(reasons)],
            "label": [frame.at[i, "label"] for i in sorted(reasons)],
        }
    )
    stack = np.stack(thumbs) if thumbs else np.zeros((0, 16, 16), np.uint8)
    return kept, rejected, stack, colour
