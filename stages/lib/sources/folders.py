"""The folder source: images in class folders, `root/<class>/**` or
`root/<split>/<class>/**`, with patient ids from a regex on their paths."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from stages.lib.labels import LABEL_SEPARATOR
from stages.lib.sources.files import SPLIT_NAMES, link_problem, visible, visible_entries


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
