"""`medpipe compare`: seed repeats are one setting, ranked by their mean, with seed noise."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from stages.tools import compare


def runs(values: dict[float, list[float]]) -> pd.DataFrame:
    rows = [
        {"name": f"exp{lr}-{seed}", "rev": f"r{lr}{seed}", "train.lr": lr, "train.seed": seed,
         "f1_macro": f1}
        for lr, scores in values.items()
        for seed, f1 in enumerate(scores)
    ]  # fmt: skip
    return pd.DataFrame(rows)


def test_seed_repeats_become_one_setting_with_mean_sd_and_interval():
    frame = runs({0.001: [0.70, 0.72, 0.71], 0.005: [0.86, 0.85, 0.87], 0.01: [0.84, 0.88, 0.83]})
    table = compare.seed_summary(frame, ["train.lr", "train.seed"], "f1_macro")
    assert table["setting"].tolist() == ["0.005", "0.01", "0.001"]  # by seed mean
    best = table.iloc[0]
    assert best["seeds"] == 3 and np.isclose(best["mean"], 0.86)
    assert np.isclose(best["sd"], np.std([0.86, 0.85, 0.87], ddof=1))
    half = stats.t.ppf(0.975, 2) * best["sd"] / np.sqrt(3)
    assert np.isclose(best["ci_high"] - best["mean"], half)
    verdicts = dict(zip(table["setting"], table["verdict"], strict=True))
    assert verdicts == {
        "0.005": "best",
        "0.01": "within training noise",  # 0.85 vs 0.86: the size of the seed noise
        "0.001": "worse beyond training noise (test noise not assessed)",
    }


def test_no_seed_grid_means_no_seed_table():
    frame = runs({0.001: [0.7], 0.005: [0.8]}).drop(columns="train.seed")
    assert compare.seed_summary(frame, ["train.lr"], "f1_macro") is None


def test_workspace_that_repeats_a_run_is_dropped():
    frame = runs({0.001: [0.7], 0.005: [0.8]})
    copy = frame.iloc[[1]].assign(name="workspace", rev="workspace")
    own = frame.iloc[[0]].assign(name="workspace", rev="workspace", f1_macro=0.9)
    columns = ["train.lr", "train.seed", "f1_macro"]
    kept = compare.drop_workspace_copy(pd.concat([frame, copy], ignore_index=True), columns)
    assert "workspace" not in kept["name"].tolist() and len(kept) == 2
    kept = compare.drop_workspace_copy(pd.concat([frame, own], ignore_index=True), columns)
    assert "workspace" in kept["name"].tolist()  # uncommitted results of its own count


def test_an_experiment_repeating_its_baseline_counts_once():
    frame = runs({0.002: [0.80, 0.82], 0.005: [0.85, 0.86]})
    baseline = frame.iloc[[0]].assign(name="main", rev="main")  # the grid re-ran it
    workspace = baseline.assign(name="workspace", rev="workspace")  # and the workspace too
    rows = pd.concat([workspace, baseline, frame], ignore_index=True)
    kept = compare.drop_workspace_copy(rows, ["train.lr", "train.seed", "f1_macro"])
    assert len(kept) == 4 and "main" in kept["name"].tolist()
    table = compare.seed_summary(kept, ["train.lr", "train.seed"], "f1_macro")
    assert table.set_index("setting")["seeds"].to_dict() == {"0.005": 2, "0.002": 2}


def test_a_grid_of_seeds_alone_is_one_setting():
    frame = runs({0.002: [0.80, 0.82, 0.81]})
    table = compare.seed_summary(frame, ["train.seed"], "f1_macro")
    assert table["setting"].tolist() == ["all runs"] and table["seeds"].tolist() == [3]


def test_a_commit_never_reproduced_is_no_run():
    frame = runs({0.002: [0.80], 0.005: [0.85]})
    baseline = frame.iloc[[0]].assign(name="main", rev="main", f1_macro=np.nan)  # queued only
    kept = compare.with_results(pd.concat([baseline, frame], ignore_index=True), "f1_macro")
    assert kept["name"].tolist() == ["exp0.002-0", "exp0.005-0"]
    with pytest.raises(ValueError, match="no run has a value of f1_macro"):
        compare.with_results(baseline, "f1_macro")
