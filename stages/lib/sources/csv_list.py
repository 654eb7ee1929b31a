"""The csv source: a CSV that lists image paths and labels (columns mapped by data.columns),
optionally patient ids, splits and groups."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from stages.lib.io import SPLITS
from stages.lib.sources.files import SPLIT_NAMES, link_problem


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
