"""`medpipe spread --seeds K`: record the training noise of the recipe in params.yaml.

Trains the recipe with seeds train.seed, train.seed+1, ... (K in all) on the prepared data
and keeps each training's headline figures and per-image test predictions in
`metrics/spread/` (small files, committed with the run). `medpipe pr-summary`, `diff` and
`compare` then judge a change against that spread, so that another seed or another CPU is
never taken for a regression (`stages.lib.noise`).

The workspace's own run (current, as `dvc status` says) is the first seed; the others
train in temporary folders outside the repository (the prepared data linked in, so nothing
is prepared twice), `--jobs` at a time, each pinned to its own cores as `dvc queue` would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import pandas as pd
import yaml
from tqdm import tqdm

from stages.lib import paths, spread
from stages.lib.errors import ToolFailed
from stages.lib.io import atomic_dir, read_csv, read_json, write_csv, write_json
from stages.lib.metric_registry import compared_keys
from stages.lib.parallel import core_slices, pin
from stages.lib.params import Params

LOSS_LOG = paths.LIVE_PLOTS / "metrics" / "train" / "loss.tsv"  # one line per epoch


def workspace_is_current(repo: Path) -> bool:
    """True when the workspace's evaluate outputs exist and `dvc status` finds the stage
    and everything upstream up to date (so they belong to params.yaml as it is)."""
    if not (repo / paths.PREDICTIONS).is_file() or not (repo / paths.EVALUATE_METRICS).is_file():
        return False
    done = subprocess.run(
        ["dvc", "status", "--json", "--with-deps", "evaluate"],
        cwd=repo, capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    try:
        return done.returncode == 0 and json.loads(done.stdout or "{}") == {}
    except json.JSONDecodeError:
        return False


def figures(root: Path, seed: int) -> dict:
    values = read_json(root / paths.EVALUATE_METRICS)
    row = {"seed": seed} | {k: values[k] for k in compared_keys() if k in values}
    detail = root / paths.TRAIN_DETAIL
    row["train_seconds"] = read_json(detail).get("train_seconds") if detail.is_file() else None
    return row


def predictions(root: Path) -> pd.DataFrame:
    frame = read_csv(root / paths.PREDICTIONS)
    keep = [c for c in frame.columns if c in spread.PREDICTION_COLUMNS or c.startswith("prob_")]
    return frame[keep]


def train_one(seed: int, full: dict, repo: Path, work: Path, cores: list[int] | None) -> Path:
    """Train and evaluate one seed in `work` (the project's data linked in)."""
    work.mkdir(parents=True)
    (work / "data").symlink_to((repo / "data").resolve(), target_is_directory=True)
    values = json.loads(json.dumps(full))
    values["train"]["seed"] = seed
    (work / paths.PARAMS).write_text(yaml.safe_dump(values, sort_keys=False))
    log = work / "log.txt"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for stage in ("train", "evaluate"):
        with open(log, "a") as out:
            done = subprocess.run(
                [sys.executable, "-m", "stages", stage], cwd=work, env=env, stdout=out,
                stderr=subprocess.STDOUT, check=False,
                preexec_fn=pin(cores),
            )  # fmt: skip
        if done.returncode != 0:
            tail = log.read_text(errors="replace").strip().splitlines()[-5:]
            raise ToolFailed(f"spread: seed {seed}: `medpipe {stage}` failed: " + " | ".join(tail))
    return work


def run(params: Params, seeds: int, jobs: int, repo: Path = Path(".")) -> str:
    """Record `seeds` trainings of the recipe; return the summary line."""
    start = time.perf_counter()
    if not (repo / paths.PROCESSED_META).is_file():
        raise FileNotFoundError(
            f"{paths.PROCESSED}: no prepared data; run `dvc repro` (or medpipe download, split, "
            "preprocess) before `medpipe spread`"
        )
    full = params.model_dump(mode="json")
    wanted = [params.train.seed + i for i in range(seeds)]
    if not workspace_is_current(repo):
        raise ValueError(
            "spread: the workspace's run is not current (`dvc status` lists changes, or "
            f"{paths.PREDICTIONS} is missing); run `dvc repro` first, so that the spread "
            "includes the run you commit (it is the first of the K trainings)"
        )
    rows = {wanted[0]: figures(repo, wanted[0])}
    kept = {wanted[0]: predictions(repo)}
    todo = wanted[1:]
    jobs = max(1, min(jobs, len(todo) or 1))
    slices = core_slices(jobs)
    with tempfile.TemporaryDirectory(prefix="medpipe-spread-") as tmp:

        def one(i_seed: tuple[int, int]) -> tuple[int, Path]:
            i, seed = i_seed
            return seed, train_one(seed, full, repo, Path(tmp) / f"seed-{seed}", slices[i % jobs])

        epochs = params.train.epochs
        bar = tqdm(total=len(todo) * epochs, desc="spread: epochs trained", unit="epoch")
        done: set[int] = set()

        def progress() -> int:  # epochs logged by the running trainings (DVCLive's files)
            logged = 0
            for seed in todo:
                log = Path(tmp) / f"seed-{seed}" / LOSS_LOG
                lines = log.read_text().count("\n") - 1 if log.is_file() else 0
                logged += epochs if seed in done else max(0, min(lines, epochs))
            return logged

        with ThreadPoolExecutor(jobs) as pool:
            futures = {pool.submit(one, item): item[1] for item in enumerate(todo)}
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, timeout=2, return_when=FIRST_COMPLETED)
                for future in finished:
                    seed, work = future.result()
                    rows[seed], kept[seed] = figures(work, seed), predictions(work)
                    done.add(seed)
                bar.update(progress() - bar.n)
        bar.close()
        order = sorted(rows)
        trained = sum(r.get("train_seconds") or 0 for r in rows.values())
        record = spread.summary(spread.recipe_of(full), [rows[s] for s in order], trained)
        with atomic_dir(repo / paths.SPREAD) as out:
            write_json(out / paths.SPREAD_SUMMARY.name, record)
            for seed in order:
                write_csv(paths.spread_predictions(seed, out), kept[seed])
    reused = f"seed {wanted[0]} reused from the workspace, "
    mean, sd = record["mean"], record["sd"]
    keys = [k for k in ("accuracy", "f1_macro") if k in mean]
    shown = ", ".join(f"{k} {mean[k]:.4f} ± {sd[k]:.4f} sd" for k in keys)
    return (
        f"spread: {len(order)} trainings (seeds {order[0]}-{order[-1]}; {reused}"
        f"{len(todo)} trained, {jobs} at a time): {shown} -> {paths.SPREAD}/ "
        f"in {time.perf_counter() - start:.0f} s"
    )


def check(repo: Path = Path(".")) -> tuple[bool, str]:
    """Whether `metrics/spread/` holds the spread of the workspace's recipe and run (what
    the gate needs on main), and the line saying so."""
    recorded, note = spread.load(repo, None, "the workspace")
    if recorded is None:
        return False, f"spread: {note}; record it: medpipe spread --seeds 3"
    run_file = repo / paths.PREDICTIONS
    own = recorded.member_like(predictions(repo)) if run_file.is_file() else None
    if own is None:
        return False, (
            f"spread: {paths.SPREAD}/ does not include the workspace's run ({paths.PREDICTIONS} "
            "changed since it was recorded); record it again: medpipe spread --seeds 3"
        )
    sd = ", ".join(f"{k} sd {v:.4f}" for k, v in recorded_sd(recorded).items())
    return True, f"spread: current ({recorded.k} seeds of this recipe; {sd})"


def recorded_sd(recorded: spread.Spread) -> dict[str, float]:
    keys = [k for k in ("accuracy", "f1_macro") if k in recorded.figures]
    return {k: float(recorded.figures[k].std(ddof=1)) for k in keys}
