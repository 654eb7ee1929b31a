"""Candidate recipes on the shifted default: which settings hold up on a site training never saw?

Each candidate is a params overlay (benchmarks/candidates.yaml) on this repository's
params.yaml with the file's `reference` overlay (the recipe the candidates were measured
against) applied first. For every candidate and seed, the real train and evaluate stages run on the
already processed default data (`dvc repro preprocess` first): the model is chosen on the
validation split (sites a and b) and tested on the held-out site c. One row per run goes to
the results CSV (runs already there are skipped, so an interrupted sweep continues); the
summary gives each candidate's seed mean and sd of the test figures, the validation
figures and the val/test gap of specificity (normal chests called normal), and the median training
wall time.

    dvc repro preprocess
    python benchmarks/candidates.py                          # every candidate, seeds 0 1 2
    python benchmarks/candidates.py --only base ema --seeds 0 1 2 3 4
    python benchmarks/candidates.py --summary                # the table only
    python benchmarks/candidates.py --pool efficientnet_b0-scratch --seeds 0 1 2

`--pool` scores the mean of the saved test probabilities of those seeds: the ensemble of
already trained runs, after the fact (a `train.ensemble: 2` run with seed s has the members
of seeds s and s+1, so it must score what `--pool NAME --seeds s s+1` does).

A difference between two candidates is beyond noise only when it is larger than a few
seed sds (the seed sd is what another run of the same recipe moves by); the figures are
from one machine, and other CPUs round floats differently.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.seedrun import train_and_evaluate  # noqa: E402
from stages import preprocess  # noqa: E402
from stages.lib.metrics import expected_calibration_error, summarize  # noqa: E402
from stages.lib.params import parse_params  # noqa: E402

CANDIDATES = Path(__file__).with_name("candidates.yaml")
RESULTS = Path(__file__).with_name("results") / "candidates.csv"
FIGURES = ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc", "ece")


def merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


def normal_recall(result: dict, split: str) -> float:
    """Share of normal chests called normal on `split`: the specificity of "any disease"
    (class 0 is normal in the default; the pneumonia benchmark's 0.94 -> 0.64 is this)."""
    rows = [r for r in result["shift"]["figures"] if r["figure"] == "sensitivity"]
    return rows[0][split]


def processed_for(params, base: dict, processed: Path, work: Path) -> Path:
    """The processed arrays for the candidate: the default ones, or (a candidate with its
    own `preprocess` keys) arrays made once from the same split into the work folder."""
    if params.preprocess == parse_params(base).preprocess:
        return processed
    key = hashlib.sha256(params.preprocess.model_dump_json().encode()).hexdigest()[:10]
    out = work / f"processed-{key}"
    if not (out / "meta.json").is_file():
        with contextlib.redirect_stderr(io.StringIO()):
            print(preprocess.run(params.preprocess, ROOT / "data/raw", ROOT / "data/split", out,
                                 work / f"samples-{key}"), flush=True)  # fmt: skip
    return out


def run_one(name: str, overlay: dict, seed: int, base: dict, processed: Path, work: Path) -> dict:
    """Train and evaluate one candidate with one seed; the result row."""
    params = parse_params(merge(merge(base, overlay), {"train": {"seed": seed}}))
    processed = processed_for(params, base, processed, work)
    done = train_and_evaluate(params, processed, work / f"{name}-{seed}")
    result, trained, history = done.result, done.trained, done.history
    best = history[history["epoch"] == trained["best_epoch"]].iloc[0]
    prefix = "ema_" if trained.get("best_weights") == "ema" else ""
    row = {"candidate": name, "seed": seed, "train_seconds": round(done.train_seconds, 1)}
    row |= {f"test_{k}": result[k] for k in FIGURES}
    val_f1 = trained.get("ensemble_val_f1_macro", float(best[f"{prefix}val_f1_macro"]))
    row |= {
        "val_f1_macro": round(val_f1, 4),  # an ensemble's: the members as one model
        "val_roc_auc": round(float(best[f"{prefix}val_roc_auc"]), 4),
        "val_specificity": normal_recall(result, "val"),
        "test_specificity": normal_recall(result, "test"),
        "shift_flags": result["shift_flags"],
        "best_epoch": trained["best_epoch"],
        "epochs_run": trained["epochs_run"],
        "best_weights": trained.get("best_weights", "raw"),
    }
    print(f"{name} seed {seed}: {done.line}", flush=True)
    # the test probabilities, for ensembles of any seeds after the fact (mean of members)
    keep = RESULTS.parent / "predictions" / f"{name}-{seed}.csv.gz"
    keep.parent.mkdir(parents=True, exist_ok=True)
    done.predictions.to_csv(keep, index=False)
    return row


def pooled(name: str, seeds: list[int]) -> dict:
    """Test figures of the mean probability of `name`'s saved runs with `seeds`."""
    files = [RESULTS.parent / "predictions" / f"{name}-{seed}.csv.gz" for seed in seeds]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise SystemExit(f"no saved test probabilities {missing}: run those seeds first")
    frames = [pd.read_csv(f) for f in files]
    columns = [c for c in frames[0].columns if c.startswith("prob_")]
    if any(not f["image"].equals(frames[0]["image"]) for f in frames):
        raise SystemExit(f"{name}: the saved runs scored different test images")
    probs = np.mean([f[columns].to_numpy() for f in frames], axis=0)
    classes = [c.removeprefix("prob_") for c in columns]
    y = frames[0]["label"].map({c: k for k, c in enumerate(classes)}).to_numpy()
    figures = summarize(y, probs) | {"ece": expected_calibration_error(y, probs)}
    normal = y == 0
    figures["specificity"] = float((probs[normal].argmax(axis=1) == 0).mean())
    keys = (*FIGURES, "specificity")
    return {"candidate": name, "seeds": seeds} | {k: round(figures[k], 4) for k in keys}


def summary(frame: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """Seed mean and sd per candidate (candidates in file order)."""
    keys = [
        "test_accuracy", "test_balanced_accuracy", "test_f1_macro", "test_roc_auc",
        "test_ece", "val_f1_macro", "val_specificity", "test_specificity",
        "train_seconds",
    ]  # fmt: skip
    grouped = frame.groupby("candidate")[keys]
    mean, sd, n = grouped.mean(), grouped.std(ddof=1), grouped.size()
    # wall time: the median, as a run slowed by other work on the machine is not the recipe's
    mean["train_seconds"] = frame.groupby("candidate")["train_seconds"].median()
    table = pd.DataFrame(index=[c for c in order if c in mean.index])
    table["seeds"] = n
    for k in keys:
        if k == "train_seconds":
            table["train_seconds_median"] = [f"{mean.loc[c, k]:.0f}" for c in table.index]
            continue
        table[k] = [
            f"{mean.loc[c, k]:.3f} ± {sd.loc[c, k]:.3f}" if n[c] > 1 else f"{mean.loc[c, k]:.3f}"
            for c in table.index
        ]
    gap = frame.assign(gap=frame["test_specificity"] - frame["val_specificity"])
    gap = gap.groupby("candidate")["gap"]
    table["specificity_gap"] = [
        f"{gap.mean()[c]:+.3f} ± {gap.std(ddof=1)[c]:.3f}" for c in table.index
    ]
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="candidates to run (default: all)")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--processed", type=Path, default=ROOT / "data/processed")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--summary", action="store_true", help="print the table, run nothing")
    parser.add_argument("--pool", metavar="NAME", help="score the mean of saved runs' seeds")
    args = parser.parse_args()
    if args.pool:
        print(json.dumps(pooled(args.pool, args.seeds)))
        return
    candidates = yaml.safe_load(CANDIDATES.read_text())
    # the recipe every overlay starts from, pinned in the file, so that a row means the same
    # after params.yaml's defaults change
    base = merge(yaml.safe_load(args.params.read_text()), candidates.pop("reference", {}))
    done = pd.read_csv(args.results) if args.results.is_file() else pd.DataFrame()
    if not args.summary:
        names = args.only or list(candidates)
        unknown = sorted(set(names) - set(candidates))
        if unknown:
            raise SystemExit(f"unknown candidate(s) {unknown}; known: {list(candidates)}")
        work = ROOT / ".medpipe" / "candidates"
        for name in names:
            for seed in args.seeds:
                if len(done) and ((done["candidate"] == name) & (done["seed"] == seed)).any():
                    continue
                row = run_one(name, candidates[name] or {}, seed, base, args.processed, work)
                done = pd.concat([done, pd.DataFrame([row])], ignore_index=True)
                args.results.parent.mkdir(parents=True, exist_ok=True)
                tmp = args.results.with_suffix(".tmp")
                done.to_csv(tmp, index=False)
                tmp.replace(args.results)
    if len(done):
        table = summary(done, list(candidates))
        print(table.to_markdown())
        print(json.dumps({"runs": len(done)}))


if __name__ == "__main__":
    main()
