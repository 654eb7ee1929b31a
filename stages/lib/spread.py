"""The recorded spread of a recipe: K trainings (seeds) with their headline figures and
per-image test predictions, in small git-tracked files (`metrics/spread/`).

`summary.json` holds the recipe they were trained with (every params section that shapes
the model or its predictions; not train.seed, not the report), each seed's figures, and
the mean and sd; `seed-<k>.csv` each training's predictions (the evaluate stage's columns
`image`, `patient_id`, `label`, `prob_*`). A spread counts only for the recipe it was
recorded with: `stale_keys` names what changed since.
"""

from __future__ import annotations

import io
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from stages.lib import paths
from stages.lib.metric_registry import compared_keys

# sections that never change a model or its test predictions
NOT_RECIPE = ("report", "embed", "explain", "export")
PREDICTION_COLUMNS = ("image", "patient_id", "label")


def recipe_of(params: dict[str, Any]) -> dict[str, Any]:
    """The params that define a recipe: all but train.seed and the sections above."""
    recipe = {k: v for k, v in params.items() if k not in NOT_RECIPE}
    recipe["train"] = {k: v for k, v in recipe.get("train", {}).items() if k != "seed"}
    return recipe


def flat_keys(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested params mapping as {dotted key: value} (also `recipe apply`'s change list)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= flat_keys(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def stale_keys(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted params keys whose values differ between two recipes."""
    a, b = flat_keys(recorded), flat_keys(recipe_of(current))
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


@dataclass
class Spread:
    """K trainings of one recipe: seeds, figures per seed, predictions per seed."""

    recipe: dict[str, Any]
    figures: pd.DataFrame  # one row per seed: seed + the headline metrics
    predictions: dict[int, pd.DataFrame]
    where: str  # "main", "the workspace", ...

    @property
    def k(self) -> int:
        return len(self.figures)

    def member_like(self, run: pd.DataFrame) -> int | None:
        """The seed whose recorded predictions are this run's (same images, probabilities
        equal to the 6 decimals stored), else None."""
        columns = [c for c in run.columns if c.startswith("prob_")]
        for seed, frame in self.predictions.items():
            if list(frame["image"]) != list(run["image"]) or not set(columns) <= set(frame):
                continue
            if np.allclose(frame[columns].to_numpy(float), run[columns].to_numpy(float), atol=2e-6):
                return seed
        return None


def summary(recipe: dict[str, Any], rows: list[dict[str, Any]], seconds: float) -> dict:
    figures = pd.DataFrame(rows)
    keys = [k for k in compared_keys() if k in figures]
    return {
        "recipe": recipe,
        "k": len(rows),
        "seeds": rows,
        "mean": {k: round(float(figures[k].mean()), 4) for k in keys},
        "sd": {k: round(float(figures[k].std(ddof=1)), 4) if len(rows) > 1 else None for k in keys},
        "train_seconds": round(seconds, 1),
    }


def _read(repo: Path, rev: str | None, path: Path) -> str | None:
    """A file's text at git revision `rev` (None: the working tree), or None if absent."""
    if rev is None:
        full = repo / path
        return full.read_text(encoding="utf-8") if full.is_file() else None
    done = subprocess.run(
        ["git", "show", f"{rev}:{path.as_posix()}"], cwd=repo, capture_output=True, check=False
    )
    return done.stdout.decode() if done.returncode == 0 else None


def load(repo: Path, rev: str | None, where: str) -> tuple[Spread | None, str]:
    """The spread recorded at `rev` (None: the workspace) if it matches that revision's
    params, else None and the reason (shown to the user)."""
    text = _read(repo, rev, paths.SPREAD_SUMMARY)
    if text is None:
        return None, f"no spread recorded in {where} ({paths.SPREAD_SUMMARY} is absent)"
    record = json.loads(text)
    params_text = _read(repo, rev, paths.PARAMS)
    params = yaml.safe_load(params_text) if params_text else {}
    changed = stale_keys(record["recipe"], params or {})
    if changed:
        shown = ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else "")
        return None, (
            f"the spread in {where} was recorded for another recipe (params since changed: {shown})"
        )
    predictions = {}
    for row in record["seeds"]:
        csv = _read(repo, rev, paths.spread_predictions(row["seed"]))
        if csv is None:
            return None, f"{paths.spread_predictions(row['seed'])} is missing in {where}"
        predictions[row["seed"]] = pd.read_csv(
            io.StringIO(csv), dtype={"patient_id": str, "label": str}, keep_default_na=False
        )
    return Spread(record["recipe"], pd.DataFrame(record["seeds"]), predictions, where), ""
