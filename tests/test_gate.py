"""The pull-request gate against training noise, with real training.

The issue's scenario, exactly: 300 synthetic patients, no held-out site, ResNet-18 from
scratch at 32 px, 6 epochs, batch 32, 200 bootstrap resamples, and the lr of the default
when it was filed (0.002; seed 0 and 1 give F1 0.4947 and 0.3254, the issue's figures).
Trainings of it differ by seed far beyond test noise, so the gate must judge a change
against the recorded spread of main's recipe:

- end to end in a fresh git + DVC repo: `dvc repro`, `medpipe spread --seeds 3` on main,
  a branch that changes only train.seed passes, labelled within training noise;
- 20 seed pairs (each baseline of 3 of 5 seeds against each of the other 2) pass at least
  19 times (over all 280 such pairs of 8 seeds: 8 false alarms, 2.9%; 1.1% with two-sided
  bounds).

That recipe barely learns (test AUC 0.47-0.64 over seeds 0-5): its 1-epoch model (F1
0.297) and train.lr x 50 (0.278) lie inside its seed range (0.241-0.495), so no gate can
call them regressions. The regression tests use the same recipe on learnable phantoms
(`difficulty: 0`, one site): a 1-epoch model and train.lr x 50 fail naming the metric
and the interval (lr x 50 is a noisy regression: seeds 0, 1, 2 give F1 0.414, 0.262,
0.468 against the base's 0.561, 0.617, 0.527; seeds 0 and 1 fail, seed 2 is within test
noise), an improvement is labelled better, another CPU (two threads instead of one)
passes. The seeds train once per module, two at a time, each pinned to its own core.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from stages.lib import noise, statistics
from stages.lib.params import Params
from stages.tools import diff, spread
from tests.conftest import BIN, ROOT, child_env, merge

pytestmark = pytest.mark.slow
SCENARIO = {
    "data": {"synthetic": {"n_patients": 300, "test_site": None}},
    "model": {"name": "resnet18", "pretrained": False},  # from scratch, as the run
    "preprocess": {"size": 32},
    "train": {"epochs": 6, "batch_size": 32, "lr": 0.002},
    "evaluate": {"bootstrap": 200},
}
LEARNABLE = {"data": {"synthetic": {"difficulty": 0.0, "sites": []}}}
DATA = {"scenario": SCENARIO, "learnable": merge(SCENARIO, LEARNABLE)}
VARIANTS = {  # name -> (data, params change, seeds, threads)
    "scenario": ("scenario", {}, range(5), 1),
    "learnable": ("learnable", {}, range(3), 1),
    "one-epoch": ("learnable", {"train": {"epochs": 1}}, range(3), 1),
    "lr-x50": ("learnable", {"train": {"lr": 50 * 0.002}}, range(1), 1),
    "other-cpu": ("learnable", {}, range(1), 2),  # seed 0 again, two threads
}
LEVEL, TOLERANCE = 0.95, 0.02


def full(data: str, change: dict | None = None) -> dict:
    values = merge(Params().model_dump(mode="json"), merge(DATA[data], change or {}))
    return Params.model_validate(values).model_dump(mode="json")


def run(repo: Path, *cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, cwd=repo, env=child_env(), capture_output=True, text=True, timeout=1800
    )


def ok(repo: Path, *cmd: str) -> str:
    done = run(repo, *cmd)
    assert done.returncode == 0, f"{' '.join(cmd)}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, dict[int, pd.DataFrame]]:
    """Test predictions of every variant and seed, trained on one prepared dataset."""
    projects = {}
    for data in DATA:
        projects[data] = tmp_path_factory.mktemp(data)
        (projects[data] / "params.yaml").write_text(yaml.safe_dump(full(data), sort_keys=False))
        for stage in ("download", "split", "preprocess"):
            ok(projects[data], f"{BIN}/medpipe", stage)
    jobs = [(name, seed) for name, (_, _, seeds, _) in VARIANTS.items() for seed in seeds]
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []

    def one(item: tuple[int, tuple[str, int]]) -> tuple[str, int, pd.DataFrame]:
        i, (name, seed) = item
        data, change, _, threads = VARIANTS[name]
        pinned = [cores[i % len(cores)]] if threads == 1 and cores else None
        if threads > 1 and hasattr(os, "sched_setaffinity"):  # all cores, even under xdist
            pinned = list(range(os.cpu_count() or 1))
        work = projects[data] / f"{name}-{seed}"
        work = spread.train_one(seed, full(data, change), projects[data], work, pinned)
        return name, seed, spread.predictions(work)

    found: dict[str, dict[int, pd.DataFrame]] = {name: {} for name in VARIANTS}
    # the two-thread run alone (it would share a core), the others two at a time
    single = [(i, j) for i, j in enumerate(jobs) if VARIANTS[j[0]][3] == 1]
    with ThreadPoolExecutor(max(1, min(2, len(cores)))) as pool:
        for name, seed, frame in pool.map(one, single):
            found[name][seed] = frame
    for i, job in enumerate(jobs):
        if VARIANTS[job[0]][3] > 1:
            name, seed, frame = one((i, job))
            found[name][seed] = frame
    return found


def judge(base: list[pd.DataFrame], head: pd.DataFrame, metric: str = "f1_macro"):
    comparison = diff.compare(base, [head], 200, 0, LEVEL)
    return comparison.rows[metric]


def test_twenty_seed_pairs_pass_within_training_noise(trained):
    runs = trained["scenario"]
    pairs = [
        (list(base), head)
        for base in itertools.combinations(range(5), 3)
        for head in range(5)
        if head not in base
    ]  # every (baseline of 3 seeds, other seed) pair of 5 trainings
    assert len(pairs) == 20
    rows = [judge([runs[s] for s in base], runs[head]) for base, head in pairs]
    failed = [
        (pair, row) for pair, row in zip(pairs, rows, strict=True)
        if row["verdict"] == noise.WORSE and row["difference"] < -TOLERANCE
    ]  # fmt: skip
    assert len(failed) <= 1, failed
    # before the spread: the same pairs against one training judged by test noise alone
    alone = [judge([runs[base[0]]], runs[head]) for base, head in pairs]
    labels = {row["verdict"] for row in alone}
    assert labels <= {noise.WITHIN_TEST, noise.WORSE_TEST_ONLY, noise.BETTER_TEST_ONLY}
    assert all(row["training_sd"] is None for row in alone)


def test_one_epoch_and_a_fifty_times_lr_fail_naming_metric_and_interval(trained):
    from stages.tools.review import Gate

    base = [trained["learnable"][s] for s in range(3)]
    for name in ("one-epoch", "lr-x50"):
        row = judge(base, trained[name][0])
        assert row["verdict"] == noise.WORSE, (name, row)
        gate = Gate(
            "f1_macro", row["base"], row["head"], TOLERANCE, row["ci"], row["verdict"],
            row["test_ci"], row["training_sd"],
        )  # fmt: skip
        assert not gate.passed
        text = gate.describe(LEVEL)
        assert text.startswith("**f1_macro**") and "one-sided 95% bounds: test noise [-" in text
        assert "with training noise (seed sd" in text and "worse beyond both" in text


def test_an_improvement_is_labelled_better(trained):
    base = [trained["one-epoch"][s] for s in range(3)]  # the worse recipe as main
    row = judge(base, trained["learnable"][0])
    assert row["verdict"] == noise.BETTER, row


def test_another_cpu_passes(trained):
    base = [trained["learnable"][s] for s in range(3)]
    other = trained["other-cpu"][0]
    same_seed = trained["learnable"][0]
    probs = [c for c in other if c.startswith("prob_")]
    assert not np.allclose(other[probs].to_numpy(), same_seed[probs].to_numpy())  # another model
    row = judge(base, other)
    assert row["verdict"] in (noise.WITHIN_TEST, noise.WITHIN_TRAINING), row


def test_paired_draws_of_one_training_a_side_are_the_paired_difference(trained):
    runs = trained["scenario"]
    columns = diff.prob_columns(runs[0])
    y, probs_base, patients = diff.arrays(runs[0], columns)
    probs_head = runs[1].set_index("image").loc[runs[0]["image"], columns].to_numpy(float)
    groups = statistics.patient_groups(patients)
    old = statistics.paired_bootstrap_difference(y, probs_base, probs_head, groups, 100, 0)
    new = statistics.paired_bootstrap_draws(y, [probs_base], [probs_head], groups, 100, 0)
    ci = statistics.percentile_interval(new["f1_macro"][2])
    assert old["f1_macro"]["ci"] == ci


def test_the_scenario_end_to_end_in_git_and_dvc(tmp_path):
    """Main records its spread with the real command; a branch that changes only
    train.seed passes pr-summary within training noise; without the spread the summary
    says it cannot separate training noise from a change."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(ROOT / "stages", repo / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore", ".dvcignore", "pyproject.toml"):
        shutil.copy(ROOT / name, repo / name)
    (repo / "params.yaml").write_text(yaml.safe_dump(full("scenario"), sort_keys=False))
    ok(repo, "git", "init", "-q", "-b", "main")
    ok(repo, f"{BIN}/dvc", "init", "-q")
    ok(repo, f"{BIN}/dvc", "repro", "evaluate")
    ok(repo, "git", "add", "-A")
    ok(repo, "git", "commit", "-qm", "baseline run")
    ok(repo, "git", "checkout", "-qb", "seed")
    values = yaml.safe_load((repo / "params.yaml").read_text())
    values["train"]["seed"] = 1
    (repo / "params.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    ok(repo, f"{BIN}/dvc", "repro", "evaluate")
    ok(repo, "git", "add", "-A")
    ok(repo, "git", "commit", "-qm", "another seed")
    done = run(repo, f"{BIN}/medpipe", "pr-summary", "--base", "main")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Training noise is not recorded" in done.stdout

    ok(repo, "git", "checkout", "-q", "main")
    ok(repo, f"{BIN}/dvc", "checkout", "-q", "-f", "--with-deps", "evaluate")
    out = ok(repo, f"{BIN}/medpipe", "spread", "--seeds", "3", "--jobs", "2")
    assert "seed 0 reused from the workspace, 2 trained" in out, out
    record = json.loads((repo / "metrics/spread/summary.json").read_text())
    assert [r["seed"] for r in record["seeds"]] == [0, 1, 2] and record["sd"]["f1_macro"] > 0
    ok(repo, "git", "add", "-A")
    ok(repo, "git", "commit", "-qm", "record the spread of main's recipe")
    ok(repo, "git", "checkout", "-q", "seed")
    ok(repo, "git", "merge", "-q", "main", "-m", "the spread from main")
    ok(repo, f"{BIN}/dvc", "checkout", "-q", "-f", "--with-deps", "evaluate")
    done = run(repo, f"{BIN}/medpipe", "pr-summary", "--base", "main")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "main (3 seeds)" in done.stdout
    line = next(x for x in done.stdout.splitlines() if x.startswith("✅ **f1_macro**"))
    assert noise.WITHIN_TRAINING in line or noise.WITHIN_TEST in line, line
    out = ok(repo, f"{BIN}/medpipe", "diff", "main")
    assert "main (3 seeds)" in out and "| f1_macro |" in out
