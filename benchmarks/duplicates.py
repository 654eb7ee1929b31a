"""How precise is the split stage's near-duplicate audit on real images, per threshold?

Reads a class-folder dataset with an official test split (default: the Kaggle brain-tumour
MRI folders in ../shared/data), runs the real download stage (it computes the 16x16
thumbnails the audit uses), and for each thumbnail RMS threshold counts the test/val images
`split.drop_duplicates` would drop. Ground truth is an independent, stricter measure: the
Pearson correlation, at 64 px after each image's own mean/sd normalisation, between a dropped
image and its closest training image; >= 0.99 is a copy (re-encoded, resized or
re-windowed). Prints per threshold: dropped, confirmed copies (precision), copies it misses
(recall against the same measure), and how many dropped files carry a name that marks a
training copy (`--tag`, e.g. Kaggle's `Te-meTr_*`). `--sheet FILE.png` saves the least
similar dropped pairs side by side, to look at.

    python benchmarks/duplicates.py
    python benchmarks/duplicates.py --path /data/chest_xray --thresholds 4 6 8 --sheet pairs.png
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages import download  # noqa: E402
from stages.lib.images import read_image  # noqa: E402
from stages.lib.params import DataParams, SplitParams  # noqa: E402
from stages.lib.splitting import (  # noqa: E402
    assign_splits,
    cluster_duplicates,
    copies_of_earlier,
    load_thumbnails,
)

COPY = 0.99  # correlation at or above which two images are the same picture


def normalised(raw: Path, refs: pd.Series, size: int = 64) -> np.ndarray:
    """(N, size*size) images scaled to zero mean and unit norm: rows' dot product = r."""
    rows = []
    for ref in refs:
        img = read_image(raw, ref).astype(np.float32)
        img = img.mean(axis=2) if img.ndim == 3 else img
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA).ravel()
        img -= img.mean()
        rows.append(img / (np.linalg.norm(img) + 1e-6))
    return np.stack(rows)


def audit(raw: Path, thresholds: list[float], tag: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per threshold: dropped, confirmed, missed, tagged; and the dropped pairs at the last."""
    manifest = pd.read_csv(raw / "manifest.csv", keep_default_na=False)
    thumbs = load_thumbnails(raw, manifest)
    train = manifest["source_split"] == "train"
    vectors = normalised(raw, manifest["image"])
    best = (vectors[~train.to_numpy()] @ vectors[train.to_numpy()].T).max(axis=1)
    similarity = pd.Series(best, index=manifest.index[~train])  # r to the closest train image
    copies = set(similarity.index[similarity >= COPY])
    rows, pairs = [], pd.DataFrame()
    for rms in thresholds:
        cluster = cluster_duplicates(thumbs, rms)
        column = assign_splits(manifest, SplitParams(strategy="official"), cluster)
        dropped = copies_of_earlier(cluster, column)
        from_train = dropped[column[dropped.index] != "train"].index
        confirmed = len(copies & set(from_train))
        rows.append(
            {
                "rms": rms,
                "dropped": len(dropped),
                "confirmed_copies": confirmed,
                "precision": round(confirmed / max(len(dropped), 1), 4),
                "copies_missed": len(copies - set(dropped.index)),
                "tagged": int(manifest.loc[dropped.index, "image"].str.contains(tag).sum()),
                "tagged_total": int(manifest["image"].str.contains(tag).sum()),
            }
        )
        pairs = pd.DataFrame(
            {
                "image": manifest.loc[dropped.index, "image"].to_numpy(),
                "same_as": manifest["image"].to_numpy()[dropped.to_numpy()],
                "r": similarity.reindex(dropped.index).to_numpy(),
            }
        )
    return pd.DataFrame(rows), pairs


def save_sheet(raw: Path, pairs: pd.DataFrame, out: Path, n: int = 16) -> None:
    """The `n` least similar dropped pairs, each image beside the one it copies."""
    tiles = []
    for _, row in pairs.sort_values("r").head(n).iterrows():
        a, b = (
            cv2.resize(read_image(raw, ref), (96, 96)).reshape(96, 96, -1)[..., 0]
            for ref in (row["image"], row["same_as"])
        )
        tiles.append(
            np.hstack([a, np.full((96, 4), 255, np.uint8), b, np.zeros((96, 12), np.uint8)])
        )
    while len(tiles) % 4:
        tiles.append(np.zeros_like(tiles[0]))
    grid = np.vstack([np.hstack(tiles[k : k + 4]) for k in range(0, len(tiles), 4)])
    cv2.imwrite(str(out), grid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = ROOT.parent / "shared/data/brain-tumor-mri-96"
    parser.add_argument("--path", type=Path, default=default, help="class folders with splits")
    parser.add_argument("--thresholds", nargs="*", type=float, default=[2, 4, 6, 8, 10, 12])
    parser.add_argument("--tag", default=r"Te-\w\wTr_", help="regex marking a training copy")
    parser.add_argument("--sheet", type=Path, help="save the least similar pairs (PNG)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw"
        with contextlib.redirect_stderr(io.StringIO()):
            print(download.run(DataParams(source="folder", path=str(args.path)), raw))
        table, pairs = audit(raw, sorted(args.thresholds), args.tag)
        print(table.to_markdown(index=False))
        print(
            f"copies (r >= {COPY} to a training image, 64 px, intensity-normalised): "
            f"{table['confirmed_copies'].iloc[-1] + table['copies_missed'].iloc[-1]}; "
            f"lowest r among the pairs dropped at rms {table['rms'].iloc[-1]:g}: "
            f"{pairs['r'].min():.3f}"
        )
        if args.sheet:
            save_sheet(raw, pairs, args.sheet)
            print(f"sheet: {args.sheet}")


if __name__ == "__main__":
    main()
