"""What the file sources (folder, csv, url) share: which files count, links that leave the
root, split folder/column names, and packing the readable images into one zip.

Each file is read once, rejected if it cannot be read, and packed into one uncompressed zip:
one zip instead of thousands of files keeps `data/raw` a handful of files for DVC (hashing,
checkout and push of many small files are slow), while keeping each file's original bytes
(no re-encoding, same size as the source). Members are read back by `stages.lib.images.read_image`
as `images.zip#<path>`.
"""

from __future__ import annotations

import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from stages.lib import paths
from stages.lib.images import ImageError, decode_image, thumbnail
from stages.lib.io import ZIP_DATE

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


def link_problem(file: Path, base: Path, follow_links: bool) -> str:
    """Why a file is not read: a symbolic link (anywhere on its path) that leads outside
    `base`, as for archive members; "" when it stays inside or links may be followed."""
    if follow_links or file.resolve().is_relative_to(base):
        return ""
    return f"link to {file.resolve()}, outside {base} (set data.follow_links: true to read it)"


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
    kept = frame.loc[keep].assign(image=f"{paths.ARCHIVE_NAME}#" + frame.loc[keep, "name"])
    rejected = pd.DataFrame(
        {
            "path": [frame.at[i, "name"] for i in sorted(reasons)],
            "reason": [reasons[i] for i in sorted(reasons)],
            "label": [frame.at[i, "label"] for i in sorted(reasons)],
        }
    )
    stack = np.stack(thumbs) if thumbs else np.zeros((0, 16, 16), np.uint8)
    return kept, rejected, stack, colour
