"""How often the pull-request gate fails a change that changes nothing, before and after it
knew training noise, and the smallest real drop it still catches.

Trains a recipe with many seeds (and its deliberate regressions) on one prepared dataset,
keeps each training's test predictions under `.medpipe/gate_noise/`, then replays the gate
on every (baseline of K seeds, head of one other seed) pair:

- before: the paired patient bootstrap alone (fail when the drop exceeds the tolerance and
  its interval excludes zero), baseline = one training;
- after: `stages.lib.noise.judge` with the baseline's K seeds (fail only "worse beyond both").

    python benchmarks/gate_noise.py --seeds 12 --k 3 -j 2        # the issue's scenario
    python benchmarks/gate_noise.py --summary                     # print, train nothing

Figures from this machine go to benchmarks/results/gate_noise.csv.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages.lib import noise, statistics  # noqa: E402
from stages.lib.params import Params  # noqa: E402
from stages.tools import diff, spread  # noqa: E402

CACHE = ROOT / ".medpipe/gate_noise"
RESULTS = ROOT / "benchmarks/results/gate_noise.csv"
METRIC = "f1_macro"
SCENARIO = {  # the scenario, with the default lr of its day (and of its figures)
    "data": {"synthetic": {"n_patients": 300, "test_site": None}},
    "model": {"name": "resnet18", "pretrained": False},
    "preprocess": {"size": 32},
    "train": {"epochs": 6, "batch_size": 32, "lr": 0.002},
    "evaluate": {"bootstrap": 200},
}
LEARNABLE = {"data": {"synthetic": {"difficulty": 0.0, "sites": []}}}  # same recipe, learns
REGRESSIONS = {  # name -> change of the learnable setup
    "one-epoch": {"train": {"epochs": 1}},
    "lr-x50": {"train": {"lr": 0.1}},
}


def merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


def full_params(override: dict) -> dict:
    values = merge(Params().model_dump(mode="json"), override)
    return Params.model_validate(values).model_dump(mode="json")


def prepare(project: Path, values: dict) -> None:
    if (project / "data/processed/meta.json").is_file():
        return
    project.mkdir(parents=True, exist_ok=True)
    (project / "params.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    for stage in ("download", "split", "preprocess"):
        subprocess.run([sys.executable, "-m", "stages", stage], cwd=project, check=True)


def train_all(setup: str, values: dict, seeds: list[int], jobs: int, project: Path) -> None:
    todo = [s for s in seeds if not (CACHE / setup / f"seed-{s}.csv").is_file()]
    cores = sorted(os.sched_getaffinity(0))

    def one(item: tuple[int, int]) -> None:
        i, seed = item
        work = CACHE / setup / f"work-{seed}"
        if work.exists():
            subprocess.run(["rm", "-rf", str(work)], check=True)
        mine = [cores[i % len(cores)]] if jobs > 1 else None
        spread.train_one(seed, values, project, work, mine)
        spread.predictions(work).to_csv(CACHE / setup / f"seed-{seed}.csv", index=False)
        row = spread.figures(work, seed)
        (CACHE / setup / f"seed-{seed}.json").write_text(json.dumps(row))
        subprocess.run(["rm", "-rf", str(work)], check=True)
        print(f"{setup} seed {seed}: {METRIC} {row[METRIC]:.4f}", flush=True)

    (CACHE / setup).mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(one, enumerate(todo)))


def load(setup: str) -> dict[int, pd.DataFrame]:
    found = sorted((CACHE / setup).glob("seed-*.csv"), key=lambda p: int(p.stem[5:]))
    return {int(p.stem[5:]): diff.read_csv(p) for p in found}


def arrays(frames: list[pd.DataFrame]):
    columns = diff.prob_columns(frames[0])
    y, _, patients = diff.arrays(frames[0], columns)
    probs = [f.set_index("image").loc[frames[0]["image"], columns].to_numpy(float) for f in frames]
    return y, probs, statistics.patient_groups(patients)


def verdicts(base: list[pd.DataFrame], head: pd.DataFrame, tol: float, level: float) -> dict:
    y, probs, groups = arrays([*base, head])
    found = statistics.paired_bootstrap_draws(y, probs[:-1], probs[-1:], groups, 200, 0, (METRIC,))
    values, head_values, draws = found[METRIC]
    # before: the first baseline training alone, paired interval, tolerance
    one = statistics.paired_bootstrap_draws(y, probs[:1], probs[-1:], groups, 200, 0, (METRIC,))
    b1, h1, d1 = one[METRIC]
    _, hi = np.percentile(d1, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    before_fail = (h1[0] < b1[0] - tol) and hi < 0
    judged = noise.judge(values, head_values, draws, level)
    after_fail = judged.worse_beyond_both and judged.difference < -tol
    return {
        "difference": judged.difference,
        "label": judged.label,
        "before_fail": before_fail,
        "after_fail": after_fail,
        "ci": judged.ci,
        "test_ci": judged.test_ci,
    }


def replay(setup: str, k: int, tol: float, level: float, limit: int) -> pd.DataFrame:
    """Every baseline of k seeds against every other seed."""
    runs = load(setup)
    seeds = sorted(runs)
    rows = []
    for base in map(list, itertools.combinations(seeds, k)):
        for head in seeds:
            if head in base:
                continue
            found = verdicts([runs[s] for s in base], runs[head], tol, level)
            rows.append({"setup": setup, "base": base, "head": head} | found)
            if len(rows) >= limit:
                return pd.DataFrame(rows)
    return pd.DataFrame(rows)


def regression_rows(k: int, tol: float, level: float) -> pd.DataFrame:
    base_runs = load("learnable")
    base = [base_runs[s] for s in sorted(base_runs)[:k]]
    rows = []
    for name in ["learnable-other-seeds", *REGRESSIONS]:
        heads = load(name) if name in REGRESSIONS else {
            s: f for s, f in base_runs.items() if s not in sorted(base_runs)[:k]
        }  # fmt: skip
        for seed, head in heads.items():
            found = verdicts(base, head, tol, level)
            rows.append({"setup": name, "base": sorted(base_runs)[:k], "head": seed} | found)
    return pd.DataFrame(rows)


def simulate(sd: float, test_sd: float, k: int, tol: float, level: float, n: int = 20000):
    """Model-based rates for a recipe with training sd `sd` and test-noise sd `test_sd` of
    a paired difference: (false alarms before, after, smallest drop caught in 80% of runs)."""
    from scipy import stats

    rng = np.random.default_rng(0)
    z = stats.norm.ppf(0.5 + level / 2)

    def rates(drop: float) -> tuple[float, float]:
        base = rng.normal(0, sd, (n, k))
        head = rng.normal(-drop, sd, n)
        test = rng.normal(0, test_sd, n)
        d1 = head - base[:, 0] + test  # before: one training a side, test noise alone
        before = np.mean((d1 < -tol) & (d1 + z * test_sd < 0))
        d = head - base.mean(1) + test
        s = base.std(1, ddof=1)
        train_var = s**2 * (1 / k + 1)
        total = train_var + test_sd**2
        df = total**2 / (train_var**2 / (k - 1))
        half = stats.t.ppf(level, df) * np.sqrt(total)  # one-sided, as noise.judge
        beyond_test = d + stats.norm.ppf(level) * test_sd < 0
        after = np.mean((d < -tol) & beyond_test & (d + half < 0))
        return float(before), float(after)

    before, after = rates(0.0)
    drops = np.arange(0.0, 0.6, 0.005)
    caught = next((float(x) for x in drops if rates(x)[1] >= 0.8), float("nan"))
    return before, after, caught


def detectable_drop(setup: str, k: int, level: float) -> tuple[float, float, float]:
    """sd of one training, typical test-noise sd of a difference, and the smallest drop
    whose combined interval excludes zero with a baseline of k seeds and one head."""
    runs = load(setup)
    values = np.array(
        [json.loads((CACHE / setup / f"seed-{s}.json").read_text())[METRIC] for s in runs]
    )
    sd = float(np.std(values, ddof=1))
    frames = [runs[s] for s in sorted(runs)[: k + 1]]
    base = min(k, len(frames) - 1)  # the last one is the head
    y, probs, groups = arrays(frames)
    found = statistics.paired_bootstrap_draws(
        y, probs[:base], probs[base:], groups, 200, 0, (METRIC,)
    )
    test_sd = float(np.nanstd(found[METRIC][2], ddof=1))
    train_var = sd**2 * (1 / k + 1)
    total = train_var + test_sd**2
    df_eff = total**2 / (train_var**2 / (k - 1))
    from scipy import stats

    return sd, test_sd, float(stats.t.ppf(level, df_eff) * np.sqrt(total))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=12)
    parser.add_argument("--regression-seeds", type=int, default=2)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("-j", "--jobs", type=int, default=1)
    parser.add_argument("--tolerance", type=float, default=0.02)
    parser.add_argument("--level", type=float, default=0.95)
    parser.add_argument("--summary", action="store_true", help="replay only, train nothing")
    parser.add_argument(
        "--simulate", nargs=2, type=float, action="append", metavar=("SD", "TEST_SD"),
        help="model-based rates for another recipe's training sd and test-noise sd",
    )  # fmt: skip
    args = parser.parse_args()
    scenario = full_params(SCENARIO)
    learnable = full_params(merge(SCENARIO, LEARNABLE))
    if not args.summary:
        prepare(CACHE / "project", scenario)
        prepare(CACHE / "learnable", learnable)
        train_all("scenario", scenario, list(range(args.seeds)), args.jobs, CACHE / "project")
        seeds = list(range(args.regression_seeds + args.k))
        train_all("learnable", learnable, seeds, args.jobs, CACHE / "learnable")
        for name, change in REGRESSIONS.items():
            values = full_params(merge(merge(SCENARIO, LEARNABLE), change))
            seeds = list(range(args.regression_seeds))
            train_all(name, values, seeds, args.jobs, CACHE / "learnable")
    pairs = replay("scenario", args.k, args.tolerance, args.level, limit=10_000)
    regressions = regression_rows(args.k, args.tolerance, args.level)
    table = pd.concat([pairs, regressions], ignore_index=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(RESULTS, index=False)
    print(
        f"no-change pairs ({len(pairs)}): false alarms before {pairs['before_fail'].mean():.1%} "
        f"({pairs['before_fail'].sum()}), after {pairs['after_fail'].mean():.1%} "
        f"({pairs['after_fail'].sum()}) at K={args.k}"
    )
    print(pairs["label"].value_counts().to_string())
    for name, group in regressions.groupby("setup", sort=False):
        print(
            f"{name}: failed after {group['after_fail'].sum()}/{len(group)}, before "
            f"{group['before_fail'].sum()}/{len(group)}; differences "
            + ", ".join(f"{d:+.3f}" for d in group["difference"])
        )
    for setup in ("scenario", "learnable"):
        sd, test_sd, drop = detectable_drop(setup, args.k, args.level)
        print(
            f"{setup}: {METRIC} sd {sd:.4f} per training, test-noise sd {test_sd:.4f}; with "
            f"a typical spread, K={args.k} flags drops beyond {drop:.3f}"
        )
        for k in (2, 3, 5, 10):
            before, after, caught = simulate(sd, test_sd, k, args.tolerance, args.level)
            print(
                f"  K={k}: model-based false alarms before {before:.1%}, after {after:.2%}; "
                f"drop caught in 80% of runs {caught:.3f}"
            )
    for sd, test_sd in args.simulate or []:
        print(f"given sd {sd} and test-noise sd {test_sd}:")
        for k in (2, 3, 5, 10):
            before, after, caught = simulate(sd, test_sd, k, args.tolerance, args.level)
            print(
                f"  K={k}: false alarms before {before:.1%}, after {after:.2%}; drop caught "
                f"in 80% of runs {caught:.3f}"
            )


if __name__ == "__main__":
    main()
