"""`medpipe predict`: classify new image files with a trained model.pt.

The preprocessing stored in the checkpoint is applied through the one definition,
`stages.lib.images.prepare_image`, and probabilities come from
`stages.lib.inference.predict`: the same two functions behind the processed arrays and the
evaluate stage, so a test image gets the same probabilities here as in
`plots/evaluate/predictions.csv`.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from stages.lib import paths
from stages.lib.checkpoint import ModelMeta
from stages.lib.images import IMAGE_SUFFIXES, image_kind, prepare_image, read_image
from stages.lib.inference import LoadedModel, load_model
from stages.lib.io import atomic_path, safe_name, write_csv
from stages.lib.labels import call_positive
from stages.lib.params import EvaluateParams, PreprocessParams
from stages.lib.sources.files import visible

SHOWN_ROWS = 20


def collect_inputs(paths: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Files as given, folders expanded (recursively, sorted), and `file.npz#key` references.

    In folders, files with an image suffix or a DICOM preamble (DICOM files often have no
    suffix) are taken; every other file is returned as skipped, with the reason.
    """
    refs: list[str] = []
    skipped: list[tuple[str, str]] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and visible(p))
            found = [p for p in files if image_kind(p)]
            others = sorted(set(files) - set(found))
            skipped += [
                (str(p), "not an image (no image suffix, no DICOM preamble)") for p in others
            ]
            if not found:
                raise FileNotFoundError(
                    f"{raw}: no image files in this folder ({', '.join(IMAGE_SUFFIXES)}, or "
                    f"DICOM by content); {len(files)} other file(s)"
                )
            refs += [str(p) for p in found]
        elif path.is_file() or ("#" in raw and Path(raw.partition("#")[0]).is_file()):
            refs.append(raw)
        else:
            raise FileNotFoundError(f"{raw}: no such file or folder")
    return refs, skipped


def load_images(
    refs: list[str], params: PreprocessParams
) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
    """Read and preprocess each input; unreadable ones are returned with the reason."""
    images, kept, rejected = [], [], []
    for ref in refs:
        try:
            img, _ = prepare_image(read_image(Path(), ref), params)
        except Exception as exc:  # any unreadable file is reported and skipped, not fatal
            rejected.append((ref, f"{type(exc).__name__}: {exc}"))
            continue
        images.append(img)
        kept.append(ref)
    shape = (0, params.size, params.size, params.channels)
    return (np.stack(images) if images else np.zeros(shape, np.uint8)), kept, rejected


def prediction_table(
    refs: list[str], probs: np.ndarray, meta: ModelMeta, threshold: float | None = None
) -> pd.DataFrame:
    """path, predicted class (multi-label: `|`-joined labels >= 0.5; binary with a
    `threshold`: the positive class where its probability reaches it), its probability, all
    class probabilities."""
    names = np.array(meta.classes)
    pos = meta.positive_index
    if meta.multilabel:
        predicted = ["|".join(names[row >= 0.5]) for row in probs]
    elif threshold is not None and pos is not None:
        predicted = call_positive(probs, meta.classes, pos, threshold).tolist()
    else:
        predicted = names[probs.argmax(axis=1)].tolist()
    columns = {f"prob_{c}": probs[:, k].round(6) for k, c in enumerate(names)}
    return pd.DataFrame(
        {"path": refs, "predicted": predicted, "confidence": probs.max(axis=1).round(4), **columns}
    )


def format_table(table: pd.DataFrame, rows: int = SHOWN_ROWS) -> str:
    shown = table.head(rows).copy()
    shown["path"] = shown["path"].map(lambda p: p if len(p) <= 48 else "..." + p[-45:])
    text = shown.to_string(index=False, float_format=lambda v: f"{v:.4f}")
    if len(table) > rows:
        text += f"\n... {len(table) - rows:,} more rows"
    return text


def write_cams(
    cam_dir: Path, model: LoadedModel, images: np.ndarray, refs: list[str], probs: np.ndarray
) -> None:
    """Grad-CAM overlay of the predicted (most likely) class per input, as PNGs in cam_dir."""
    from stages.lib.cam import compute_cams, find_target_layer, overlay

    meta = model.meta
    _, layer = find_target_layer(model.net, "auto", meta.input_size)
    targets = probs.argmax(axis=1)
    cams = compute_cams(model.net, images, meta, targets, "gradcam", layer, 32, model.device)
    cam_dir.mkdir(parents=True, exist_ok=True)
    for i, (ref, cam) in enumerate(zip(refs, cams, strict=True)):
        stem = safe_name(Path(ref.partition("#")[0]).stem + ref.partition("#")[2])
        name = f"{i:04d}_{stem}_{safe_name(meta.classes[targets[i]])}.png"
        with atomic_path(cam_dir / name) as tmp:
            Image.fromarray(overlay(images[i], cam)).save(tmp, format="PNG")


def run(
    paths: list[str],
    model_file: Path = paths.MODEL,
    out_file: Path = paths.PREDICT_OUTPUT,
    cam_dir: Path | None = None,
    batch_size: int = 64,
    tta: bool = EvaluateParams.model_fields["tta"].default,
    threshold: float | None = None,
) -> str:
    start = time.perf_counter()
    model = load_model(model_file)
    meta = model.meta
    if threshold is not None and meta.positive_index is None:
        raise ValueError(
            f"--threshold: only binary models have a positive class to threshold; "
            f"{model_file} is {meta.task} with classes {meta.classes}"
        )
    refs, not_images = collect_inputs(paths)
    images, kept, rejected = load_images(refs, PreprocessParams(**meta.preprocess))
    rejected = not_images + rejected
    skipped = "".join(f"skipped: {ref} ({reason})\n" for ref, reason in rejected)
    if not kept:
        raise ValueError(f"none of the {len(refs)} input(s) could be read:\n{skipped.rstrip()}")
    probs = model.predict(images, batch_size, tta=tta)
    table = prediction_table(kept, probs, meta, threshold)
    write_csv(out_file, table)
    if cam_dir is not None:
        write_cams(Path(cam_dir), model, images, kept, probs)
    cams = f", CAM overlays in {cam_dir}" if cam_dir is not None else ""
    if meta.positive_index is not None:
        positive = meta.classes[meta.positive_index]
        called = int((table["predicted"] == positive).sum())
        at = f"P >= {threshold:g}" if threshold is not None else "the most likely class"
        cams += f", positive class {positive}: {called:,} called ({at})"
    return (
        f"{format_table(table)}\n{skipped}"
        f"predict: {len(kept):,} image(s) -> {out_file}{cams}, {len(rejected)} skipped "
        f"({meta.model_name}, {meta.input_size} px) in {time.perf_counter() - start:.1f} s"
    )
