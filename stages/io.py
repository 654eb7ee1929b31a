"""Files between stages: atomic writes, manifests, image references.

Every output is written to a temporary sibling and renamed into place, so a stage that is
interrupted leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

MANIFEST_COLUMNS = ("image", "label", "patient_id", "source_split")
OPTIONAL_COLUMNS = ("group", "mask")
SPLITS = ("train", "val", "test")
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs are ordinary files
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: Path | str) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; swap it in for `path` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)
    try:
        yield tmp
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def safe_name(name: str) -> str:
    """A class name as a file-name part: anything but letters, digits, `._-` becomes `_`."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "class"


def write_json(path: Path | str, data: Any) -> None:
    """Write JSON (sorted keys, 2-space indent) atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_json(path: Path | str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (run the stage that writes it first)")
    return json.loads(path.read_text())


def write_csv(path: Path | str, frame: pd.DataFrame) -> None:
    """Write a DataFrame as CSV (no index) atomically."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def read_csv(path: Path | str, required: tuple[str, ...] = ()) -> pd.DataFrame:
    """Read a CSV with string columns kept as strings; check required columns."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (run the stage that writes it first)")
    frame = pd.read_csv(path, dtype={"patient_id": str, "label": str}, keep_default_na=False)
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {list(frame.columns)}")
    return frame


@contextlib.contextmanager
def npz_writer(
    path: Path | str, compress: bool = False
) -> Iterator[Callable[[str, np.ndarray], None]]:
    """Yield `add(name, array)` that streams arrays into an .npz (what np.load reads), so a
    large set never sits in memory; the file appears atomically when the block ends.
    Uncompressed by default: members are then read back without inflating."""
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", method, allowZip64=True) as archive:

        def add(name: str, array: np.ndarray) -> None:
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)

        yield add


def save_npz(path: Path | str, arrays: dict[str, np.ndarray], compress: bool = False) -> None:
    """Write a dict of arrays as an .npz atomically."""
    with npz_writer(path, compress) as add:
        for name, array in arrays.items():
            add(name, array)


@lru_cache(maxsize=8)
def _open_npz(path: str, mtime_ns: int, pid: int) -> Any:
    """Open array files once per process: the pid keeps forked workers off the parent's file
    handle (a shared offset corrupts reads); the mtime drops stale handles."""
    return np.load(path, allow_pickle=False)


def read_image(root: Path | str, ref: str) -> np.ndarray:
    """Read one image given by a manifest reference relative to `root`.

    References: `file.png` (any format PIL reads), `file.npz#name` (array `name`) or
    `file.npz#split/index` (row `index` of `<split>_images`, the MedMNIST layout).

    Returns:
        (H, W) or (H, W, C) array, uint8 or uint16.
    """
    file, _, key = ref.partition("#")
    path = Path(root) / file
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image file not found (manifest entry {ref!r})")
    if key:
        arrays = _open_npz(str(path.resolve()), path.stat().st_mtime_ns, os.getpid())
        if "/" in key:
            split, index = key.split("/", 1)
            return np.asarray(arrays[f"{split}_images"][int(index)])
        if key not in arrays.files:
            raise KeyError(f"{path}: no array {key!r} (manifest entry {ref!r})")
        return np.asarray(arrays[key])
    with Image.open(path) as img:
        img.load()
        if img.mode in ("I;16", "I;16B", "I"):
            return np.asarray(img).astype(np.uint16)
        if img.mode not in ("L", "RGB"):
            img = img.convert("RGB" if img.mode in ("RGBA", "P", "CMYK", "LA") else "L")
        return np.asarray(img)


def read_processed(processed_dir: Path | str, split: str) -> tuple[np.ndarray, pd.DataFrame, dict]:
    """Memory-mapped (N, S, S, C) uint8 images, the index frame with a `y` column, and meta."""
    processed_dir = Path(processed_dir)
    meta = read_json(processed_dir / "meta.json")
    frame = read_csv(processed_dir / f"{split}.csv", required=("image", "label"))
    images = np.load(processed_dir / f"{split}_images.npy", mmap_mode="r")
    if len(images) != len(frame):
        raise ValueError(
            f"{processed_dir}: {split} has {len(images)} images but "
            f"{len(frame)} index rows; rerun `medpipe preprocess`"
        )
    if meta.get("task") != "multilabel":  # multilabel targets: encode_labels(..., True)
        try:
            frame = frame.assign(y=encode_labels(frame["label"], meta["classes"], False))
        except ValueError as exc:
            raise ValueError(f"{processed_dir}/{split}.csv: {exc}") from None
    return images, frame, meta


LABEL_SEPARATOR = "|"


def encode_labels(labels: pd.Series, classes: list[str], multilabel: bool) -> np.ndarray:
    """Class names -> int indices (N,), or `|`-joined names -> multi-hot float32 (N, K)."""
    lookup = {name: k for k, name in enumerate(classes)}
    if not multilabel:
        unknown = sorted(set(labels) - set(lookup))
        if unknown:
            raise ValueError(f"labels {unknown} not in classes {classes}")
        return labels.map(lookup).to_numpy(dtype=np.int64)
    out = np.zeros((len(labels), len(classes)), np.float32)
    for i, value in enumerate(labels):
        for name in filter(None, str(value).split(LABEL_SEPARATOR)):
            if name not in lookup:
                raise ValueError(f"label {name!r} not in classes {classes}")
            out[i, lookup[name]] = 1.0
    return out
