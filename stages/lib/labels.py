"""Labels: class names encoded as model targets (class indices, or multi-hot rows for
multi-label tasks, `|`-joined in the manifests), multi-label "no finding" as the empty label
set, and the positive class of a binary task: the one whose probability is thresholded and
whose sensitivity, specificity, PPV and NPV are reported.

Sorting the class names cannot decide it: MURA's `['abnormal', 'normal']` would make
"normal" the positive class. The rule here: `data.positive_class` when given; else the
other class when exactly one class is recognisably the normal/negative one (normal,
negative, healthy, benign, no finding, ...); else the user must say.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

LABEL_SEPARATOR = "|"  # joins the labels of a multi-label image: "Effusion|Mass"

# whole words (so "abnormal" is not "normal"); multi-word names are matched as phrases
NEGATIVE_WORDS = frozenset(
    {"normal", "negative", "healthy", "benign", "control", "controls", "nofinding", "none"}
)
NEGATIVE_PHRASES = ("no finding", "no findings", "no disease", "no tumor", "no tumour", "no lesion")


def _words(name: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", name.lower())


def is_negative_name(name: str) -> bool:
    """Whether a class name says "nothing found" (normal, negative, healthy, no finding...)."""
    words = _words(name)
    text = " ".join(words)
    if any(f" {p} " in f" {text} " for p in NEGATIVE_PHRASES):
        return True
    return bool(NEGATIVE_WORDS & set(words)) and not {"abnormal", "not", "non"} & set(words)


def positive_class(classes: list[str], task: str, chosen: str | None) -> str | None:
    """The positive class name for a binary task (None for other tasks).

    Raises:
        ValueError: naming `data.positive_class` when it is not one of `classes`, when it is
            set for a task that has no positive class, or when a binary task gives no way to
            tell which class is the finding.
    """
    if task != "binary":
        if chosen is not None:
            raise ValueError(
                f"data.positive_class: only binary tasks have a positive class; this {task} "
                f"dataset has {len(classes)} classes {classes}: unset data.positive_class"
            )
        return None
    if chosen is not None:
        matches = [c for c in classes if c == chosen] or [
            c for c in classes if c.lower() == chosen.lower()
        ]
        if len(matches) != 1:
            raise ValueError(
                f"data.positive_class: {chosen!r} is not a class of this dataset; "
                f"use one of {classes}"
            )
        return matches[0]
    negatives = [c for c in classes if is_negative_name(c)]
    if len(negatives) == 1:
        return next(c for c in classes if c != negatives[0])
    why = "both look like" if len(negatives) == 2 else "neither is recognisably"
    raise ValueError(
        f"data.positive_class: this binary dataset's classes are {classes} and {why} the "
        "normal/negative one, so the positive class (whose sensitivity, specificity and "
        f"threshold are reported) must be named: set data.positive_class to one of {classes}"
    )


def call_positive(
    probs: np.ndarray, classes: list[str], positive: int, threshold: float
) -> np.ndarray:
    """Binary decisions by name: the positive class where its probability reaches
    `threshold`, the other class elsewhere."""
    names = np.asarray(classes)
    return np.where(probs[:, positive] >= threshold, names[positive], names[1 - positive])


def drop_no_finding(labels: pd.Series, named: str | None = None) -> tuple[pd.Series, list[str]]:
    """Multi-label values with the "nothing found" names removed (NIH's `No Finding`,
    PadChest's `normal`, ...): such an image has the empty label set, not a class of its own.

    `named` (data.no_finding) adds a name the word rule does not recognise. Returns the
    cleaned `|`-joined labels and the names that were removed, in order of first sight.

    Raises:
        ValueError: naming data.no_finding when `named` is not a label value of the data.
    """
    names = labels.str.split(LABEL_SEPARATOR, regex=False).explode().dropna()
    present = list(dict.fromkeys(n for n in names if n))
    if named is not None and named not in present:
        raise ValueError(
            f"data.no_finding: {named!r} is not a label of this dataset; its labels are "
            f"{sorted(present)[:20]}"
        )
    empty = [n for n in present if n == named or is_negative_name(n)]
    if not empty:
        return labels, []
    cleaned = labels.map(
        lambda s: LABEL_SEPARATOR.join(n for n in s.split(LABEL_SEPARATOR) if n not in empty)
    )
    return cleaned, empty


def targets(frame: pd.DataFrame, meta: dict) -> np.ndarray:
    """What a model is scored against, from a `read_processed` frame: class indices (N,), or
    an (N, K) multi-hot matrix for multi-label tasks (classes in `meta["classes"]` order)."""
    if meta.get("task") == "multilabel":
        return encode_labels(frame["label"], meta["classes"], True)
    return frame["y"].to_numpy(copy=True)  # writable: becomes tensors


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


def count_classes(labels: pd.Series, classes: list[str], multilabel: bool) -> dict[str, int]:
    """Images per class (for multi-label: images where the class is positive)."""
    encoded = encode_labels(labels, classes, multilabel)
    counts = encoded.sum(axis=0) if multilabel else np.bincount(encoded, minlength=len(classes))
    return {c: int(n) for c, n in zip(classes, counts, strict=True)}
