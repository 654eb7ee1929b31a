"""One seed of a benchmark: train and evaluate into a scratch folder, keep what the rows need.

Shared by candidates.py and realdata.py (imported after they put the repository on sys.path).
"""

from __future__ import annotations

import contextlib
import io
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from stages import evaluate, train
from stages.lib.io import read_result
from stages.lib.params import Params


@dataclass(frozen=True)
class SeedRun:
    """What one training and evaluation left, read before its folder is removed."""

    line: str  # the train stage's summary line
    train_seconds: float  # wall time of the training alone
    result: dict  # evaluate.json
    trained: dict  # train.json
    history: pd.DataFrame  # plots/train/history.csv: one row per epoch
    predictions: pd.DataFrame  # plots/evaluate/predictions.csv: the test probabilities


def train_and_evaluate(params: Params, processed: Path, run: Path) -> SeedRun:
    """Train on `processed` and evaluate on its test split in `run` (emptied first, removed
    after); progress bars are silenced, latency is not measured."""
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    start = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):  # progress bars
        outputs = train.TrainOutputs(
            run / "model.pt", run / "train.json", run / "plots/train", run / "last.pt",
            run / "dvclive",
        )  # fmt: skip
        line = train.run(params.model, params.train, params.augment, processed, outputs)
        seconds = time.perf_counter() - start
        evaluate.run(
            params.evaluate.model_copy(update={"latency_runs": 0}),
            processed, run / "model.pt", run / "evaluate.json", run / "plots/evaluate",
        )  # fmt: skip
    done = SeedRun(
        line,
        seconds,
        read_result(run / "evaluate.json"),
        read_result(run / "train.json"),
        pd.read_csv(run / "plots/train/history.csv"),
        pd.read_csv(run / "plots/evaluate/predictions.csv"),
    )
    shutil.rmtree(run, ignore_errors=True)
    return done
