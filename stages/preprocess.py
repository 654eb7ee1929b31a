"""preprocess stage: crop borders, equalise, resize; store each split as one uint8 array.

The per-image function `stages.lib.images.prepare_image` is the single definition of
preprocessing: the train/evaluate stages read its output and `model.pt` records its params,
so inference on new files applies exactly the same steps.
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

from stages.lib import paths
from stages.lib.images import prepare_image, read_image, to_uint8
from stages.lib.io import (
    SPLITS,
    atomic_dir,
    npy_writer,
    read_csv,
    read_json,
    write_json,
)
from stages.lib.labels import LABEL_SEPARATOR
from stages.lib.parallel import ordered_map
from stages.lib.params import PreprocessParams

CHUNK = 128  # images per worker task
PARALLEL_MIN_IMAGES = 1000  # below this, starting processes costs more than it saves


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
            npy_writer(paths.split_images(out, split), (n, s, s, params.channels))
        )
        masks = (
            files.enter_context(npy_writer(paths.split_masks(out, split), (n, s, s)))
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
    raw_dir: Path = paths.RAW,
    split_dir: Path = paths.SPLIT,
    out_dir: Path = paths.PROCESSED,
    samples_dir: Path = paths.PREPROCESS_PLOTS,
) -> str:
    start = time.perf_counter()
    card = read_json(raw_dir / paths.DATASET_CARD_NAME)
    frames = {
        s: read_csv(paths.split_table(split_dir, s), required=("image", "label")) for s in SPLITS
    }
    with atomic_dir(out_dir) as out:
        for split, frame in frames.items():
            process_split(frame, raw_dir, out, split, params)
            frame.assign(index=range(len(frame))).to_csv(paths.split_table(out, split), index=False)
        train = np.load(paths.split_images(out, "train"), mmap_mode="r")
        sample = train[:: max(1, len(train) // 512)].astype(np.float32) / 255
        write_json(
            out / paths.PROCESSED_META_NAME,
            {
                "classes": card["classes"],
                "task": card["task"],
                "positive_class": card.get("positive_class"),
                "dataset": card["name"],
                "preprocess": params.model_dump(),
                "mean": sample.mean(axis=(0, 1, 2)).round(4).tolist(),
                "std": sample.std(axis=(0, 1, 2)).round(4).tolist(),
            },
        )
        del train
    with atomic_dir(samples_dir) as tmp:
        save_samples(frames["train"], raw_dir, tmp / paths.SAMPLES_NAME, params)
    n = sum(len(f) for f in frames.values())
    return (
        f"preprocess: {n:,} images -> {out_dir} ({params.size} px, {params.channels} ch, "
        f"equalize {params.equalize}) in {time.perf_counter() - start:.1f} s"
    )
