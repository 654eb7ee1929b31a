"""preprocess stage: crop borders, equalise, resize; store each split as one uint8 array.

The per-image function `prepare_image` is the single definition of preprocessing: the
train/evaluate stages read its output and `model.pt` records its params, so inference on new
files applies exactly the same steps.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from stages.io import (
    LABEL_SEPARATOR,
    SPLITS,
    atomic_dir,
    npy_writer,
    read_csv,
    read_image,
    read_json,
    write_json,
)
from stages.parallel import ordered_map
from stages.params import PreprocessParams

RAW_DIR = Path("data/raw")
SPLIT_DIR = Path("data/split")
OUT_DIR = Path("data/processed")
SAMPLES_DIR = Path("plots/preprocess")
CHUNK = 128  # images per worker task
PARALLEL_MIN_IMAGES = 1000  # below this, starting processes costs more than it saves
MIN_CLAHE_TILE = 16  # px; smaller tiles amplify noise on low-resolution inputs


def to_uint8(img: np.ndarray, channels: int) -> np.ndarray:
    """Any 2-D/3-D image -> (H, W) uint8 gray for channels=1, (H, W, 3) otherwise."""
    if img.dtype != np.uint8:
        lo, hi = np.percentile(img, (0.5, 99.5))
        img = np.clip((img.astype(np.float32) - lo) / max(hi - lo, 1e-6) * 255, 0, 255)
        img = img.astype(np.uint8)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if channels == 1 and img.ndim == 3:
        return cv2.cvtColor(img[:, :, :3], cv2.COLOR_RGB2GRAY)
    if channels == 3 and img.ndim == 2:
        return np.repeat(img[:, :, None], 3, axis=2)
    return img


def content_box(img: np.ndarray, threshold: int) -> tuple[int, int, int, int]:
    """Bounding box (y0, y1, x0, x1) of pixels brighter than threshold; whole image if none."""
    gray = img if img.ndim == 2 else img.max(axis=2)
    rows = np.flatnonzero((gray > threshold).any(axis=1))
    cols = np.flatnonzero((gray > threshold).any(axis=0))
    h, w = gray.shape
    if len(rows) == 0 or rows[-1] - rows[0] < h // 4 or cols[-1] - cols[0] < w // 4:
        return 0, h, 0, w  # nothing sensible to crop to
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def equalize(img: np.ndarray, how: str, clip: float, grid: int) -> np.ndarray:
    """Histogram equalisation of a uint8 image (each channel of RGB alike, via luminance)."""
    if how == "none":
        return img
    if img.ndim == 3:
        ycc = cv2.cvtColor(img, cv2.COLOR_RGB2YCrCb)
        ycc[:, :, 0] = equalize(ycc[:, :, 0], how, clip, grid)
        return cv2.cvtColor(ycc, cv2.COLOR_YCrCb2RGB)
    if how == "global":
        return cv2.equalizeHist(img)
    tiles = max(1, min(grid, min(img.shape) // MIN_CLAHE_TILE))
    return cv2.createCLAHE(clipLimit=clip, tileGridSize=(tiles, tiles)).apply(img)


def prepare_image(
    img: np.ndarray, params: PreprocessParams, mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """One raw image -> (size, size, channels) uint8, and its mask cropped/resized alike."""
    img = to_uint8(img, params.channels)
    if params.crop_borders:
        y0, y1, x0, x1 = content_box(img, params.border_threshold)
        img = img[y0:y1, x0:x1]
        mask = None if mask is None else mask[y0:y1, x0:x1]
    img = equalize(img, params.equalize, params.clahe_clip, params.clahe_grid)
    size = (params.size, params.size)
    img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    if params.blur > 0:
        img = cv2.GaussianBlur(img, (0, 0), params.blur)
    if mask is not None:
        mask = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)
    return img.reshape(params.size, params.size, params.channels), mask


def process_split(
    frame: pd.DataFrame, raw_dir: Path, out: Path, split: str, params: PreprocessParams
) -> None:
    """Stream one split into `<split>_images.npy` (N, S, S, C) and, if any, `_masks.npy`."""
    n, s = len(frame), params.size
    has_masks = "mask" in frame and (frame["mask"] != "").any()
    refs = list(zip(frame["image"], frame["mask"] if has_masks else [""] * n, strict=True))
    chunks = [(raw_dir, refs[i : i + CHUNK], params) for i in range(0, n, CHUNK)]
    bar = tqdm(total=n, desc=split, leave=False, mininterval=2)
    with contextlib.ExitStack() as files:
        images = files.enter_context(
            npy_writer(out / f"{split}_images.npy", (n, s, s, params.channels))
        )
        masks = (
            files.enter_context(npy_writer(out / f"{split}_masks.npy", (n, s, s)))
            if has_masks
            else None
        )
        chunk_results = ordered_map(prepare_chunk, chunks, n >= PARALLEL_MIN_IMAGES)
        for chunk_images, chunk_masks in chunk_results:
            # results arrive in order and are written at once: memory holds ~workers chunks
            images(chunk_images)
            if masks is not None:
                masks(chunk_masks)
            bar.update(len(chunk_images))
    bar.close()


def prepare_chunk(
    job: tuple[Path, list[tuple[str, str]], PreprocessParams],
) -> tuple[np.ndarray, np.ndarray]:
    """Worker: prepare a list of (image ref, mask ref) into stacked arrays."""
    raw_dir, refs, params = job
    cv2.setNumThreads(1)  # one process per core already
    s = params.size
    images = np.empty((len(refs), s, s, params.channels), np.uint8)
    masks = np.zeros((len(refs), s, s), np.uint8)
    for i, (image_ref, mask_ref) in enumerate(refs):
        raw_mask = read_image(raw_dir, mask_ref) if mask_ref else None
        images[i], mask = prepare_image(read_image(raw_dir, image_ref), params, raw_mask)
        if mask is not None:
            masks[i] = mask
    return images, masks


def save_samples(
    frame: pd.DataFrame,
    raw_dir: Path,
    path: Path,
    params: PreprocessParams,
    per_class: int = 3,
    height: int = 128,
) -> None:
    """One PNG, a row per class: `per_class` (raw | preprocessed) pairs, class name on top."""
    rows = []
    # multi-label: one row per first-named label, not one per label combination
    first = frame["label"].str.split(LABEL_SEPARATOR, regex=False).str[0].replace("", "(none)")
    for label, group in frame.groupby(first, sort=True):
        tiles = []
        for ref in group["image"].head(per_class):
            raw = to_uint8(read_image(raw_dir, ref), 1)
            raw = cv2.resize(raw, (height, height), interpolation=cv2.INTER_AREA)
            done, _ = prepare_image(read_image(raw_dir, ref), params)
            done = cv2.resize(to_uint8(done, 1), (height, height), interpolation=cv2.INTER_NEAREST)
            tiles += [
                raw,
                np.full((height, 2), 255, np.uint8),
                done,
                np.zeros((height, 12), np.uint8),
            ]
        strip = np.hstack(tiles)
        caption = np.zeros((22, strip.shape[1]), np.uint8)
        cv2.putText(
            caption, str(label)[:40], (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, 255, 1, cv2.LINE_AA
        )
        rows.append(np.vstack([caption, strip]))
    width = max(r.shape[1] for r in rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.vstack([np.pad(r, ((0, 6), (0, width - r.shape[1]))) for r in rows])).save(
        path
    )


def run(
    params: PreprocessParams,
    raw_dir: Path = RAW_DIR,
    split_dir: Path = SPLIT_DIR,
    out_dir: Path = OUT_DIR,
    samples_dir: Path = SAMPLES_DIR,
) -> str:
    start = time.perf_counter()
    card = read_json(raw_dir / "dataset.json")
    frames = {s: read_csv(split_dir / f"{s}.csv", required=("image", "label")) for s in SPLITS}
    with atomic_dir(out_dir) as out:
        for split, frame in frames.items():
            process_split(frame, raw_dir, out, split, params)
            frame.assign(index=range(len(frame))).to_csv(out / f"{split}.csv", index=False)
        train = np.load(out / "train_images.npy", mmap_mode="r")
        sample = train[:: max(1, len(train) // 512)].astype(np.float32) / 255
        write_json(
            out / "meta.json",
            {
                "classes": card["classes"],
                "task": card["task"],
                "dataset": card["name"],
                "preprocess": params.model_dump(),
                "mean": sample.mean(axis=(0, 1, 2)).round(4).tolist(),
                "std": sample.std(axis=(0, 1, 2)).round(4).tolist(),
            },
        )
        del train
    with atomic_dir(samples_dir) as tmp:
        save_samples(frames["train"], raw_dir, tmp / "samples.png", params)
    n = sum(len(f) for f in frames.values())
    return (
        f"preprocess: {n:,} images -> {out_dir} ({params.size} px, {params.channels} ch, "
        f"equalize {params.equalize}) in {time.perf_counter() - start:.1f} s"
    )
