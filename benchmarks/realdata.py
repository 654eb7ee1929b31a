"""The real-data table: the default recipe and each study's recipe on real images, with seeds.

Runs every setup of benchmarks/realdata.yaml on each real dataset in ../shared/data (the
Kaggle brain-tumour MRI folders, NIH ChestX-ray14 with NIH's label file) and on any
MedMNIST-format `.npz` named with --npz, over several seeds, and prints one table: seed mean
± sd of the test figures, the training wall time, and the published baselines where known
(MedMNIST v2 ResNet-18/50 for MedMNIST files, from stages.lib.catalog).

Each dataset is downloaded, split and preprocessed once per data setting (the real stages'
run() into .medpipe/realdata/); each seed then trains and evaluates. One row per run goes to
benchmarks/results/realdata.csv; runs already there are skipped, so a sweep continues where
it stopped. Pin two sweeps to one core each to run them side by side:

    python benchmarks/realdata.py                                 # all setups, seeds 0 1 2
    taskset -c 0 python benchmarks/realdata.py --only default --datasets brain-tumor-mri-96
    python benchmarks/realdata.py --npz ~/data/breastmnist_64.npz --setups default lite0-pretrained
    python benchmarks/realdata.py --summary                       # the table only

A difference between setups is beyond training noise only when it is larger than a few seed
sds; figures come from one machine (other CPUs round floats differently).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import sys
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.seedrun import train_and_evaluate  # noqa: E402
from stages import download, preprocess, split  # noqa: E402
from stages.lib.catalog import MEDMNIST_V2_SOURCE, medmnist_baselines  # noqa: E402
from stages.lib.params import Params, parse_params  # noqa: E402
from stages.tools.recipe import load_recipe  # noqa: E402

SETUPS = Path(__file__).with_name("realdata.yaml")
RESULTS = Path(__file__).with_name("results") / "realdata.csv"
SHARED = ROOT.parent / "shared" / "data"
WORK = ROOT / ".medpipe" / "realdata"
FIGURES = ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc")


def merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


def datasets(config: dict, npz: list[Path], shared: Path) -> dict[str, dict]:
    """name -> {recipe, primary, published, params}: the shared sets found, then --npz files."""
    found = {}
    for name, spec in config["datasets"].items():
        text = yaml.safe_dump(spec["params"]).replace("{shared}", str(shared))
        if (shared / name).is_dir():
            found[name] = {**spec, "params": yaml.safe_load(text)}
    for file in npz:
        baselines = medmnist_baselines(file.name)
        published = "; ".join(f"{k} {acc:.3f} / {auc:.3f}" for k, (auc, acc) in baselines.items())
        found[file.stem] = {
            "recipe": None,
            "primary": "accuracy",
            "published": f"{published} (acc / AUC, {MEDMNIST_V2_SOURCE})" if published else "",
            "params": {"data": {"source": "npz", "path": str(file.resolve())}},
        }
    return found


def setup_params(setup: dict, dataset: dict, budget: dict) -> Params | None:
    """The full params of one setup on one dataset (None: no matching recipe)."""
    base = Params().model_dump(mode="json")
    overlay = dict(setup)
    if overlay.pop("recipe", None) == "matching":
        if not dataset["recipe"]:
            return None
        base = merge(merge(base, load_recipe(dataset["recipe"]).overlay), budget)
    return parse_params(merge(merge(base, overlay), dataset["params"]))


def prepared(params: Params, work: Path) -> tuple[Path, str]:
    """data/raw, split and processed arrays for these data/split/preprocess params (cached)."""
    key = hashlib.sha256(
        "".join(s.model_dump_json() for s in (params.data, params.split)).encode()
    ).hexdigest()[:10]
    raw, splits = work / f"raw-{key}", work / f"split-{key}"
    lines = []
    with contextlib.redirect_stderr(io.StringIO()):  # progress bars
        if not (raw / "dataset.json").is_file():
            lines.append(download.run(params.data, raw))
        if not (splits / "test.csv").is_file():
            lines.append(split.run(params.split, raw, splits, work / f"split-{key}.json"))
        pkey = hashlib.sha256(params.preprocess.model_dump_json().encode()).hexdigest()[:10]
        processed = work / f"processed-{key}-{pkey}"
        if not (processed / "meta.json").is_file():
            lines.append(
                preprocess.run(params.preprocess, raw, splits, processed, work / f"samples-{pkey}")
            )
    for line in lines:
        print(line, flush=True)
    return processed, key


def run_one(params: Params, processed: Path, run: Path) -> dict:
    """Train and evaluate one seed; the figures of its row."""
    done = train_and_evaluate(params, processed, run)
    print(done.line, flush=True)
    row = {f"test_{k}": done.result.get(k) for k in FIGURES}
    row |= {
        "n_test": done.result["n_test"],
        "n_train": len(pd.read_csv(processed / "train.csv", usecols=["index"])),
        "train_seconds": round(done.train_seconds, 1),
        "best_epoch": done.trained["best_epoch"],
        "epochs_run": done.trained["epochs_run"],
    }
    return row


def summary(frame: pd.DataFrame, specs: dict[str, dict]) -> str:
    """Markdown: per dataset and setup, seed mean ± sd of the test figures."""
    keys = [f"test_{k}" for k in FIGURES]
    grouped = frame.groupby(["dataset", "setup"], sort=False)
    mean, sd, n = grouped[keys].mean(), grouped[keys].std(ddof=1), grouped.size()
    rows = []
    for (dataset, setup), count in n.items():
        cells = [
            f"{mean.loc[(dataset, setup), k]:.3f}"
            + (f" ± {sd.loc[(dataset, setup), k]:.3f}" if count > 1 else "")
            for k in keys
        ]
        seconds = grouped["train_seconds"].median()[(dataset, setup)]
        rows.append([dataset, setup, count, *cells, f"{seconds:.0f}"])
    table = pd.DataFrame(
        rows, columns=["dataset", "setup", "seeds", *FIGURES, "train_seconds_median"]
    )
    notes = [f"- {name}: published {s['published']}" for name, s in specs.items() if s["published"]]
    return table.to_markdown(index=False) + ("\n\n" + "\n".join(notes) if notes else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="*", help="dataset names (default: all found)")
    parser.add_argument("--setups", "--only", nargs="*", help="setups (default: all)")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--npz", nargs="*", type=Path, default=[], help="MedMNIST .npz files")
    parser.add_argument("--shared", type=Path, default=SHARED, help="real data folder")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--summary", action="store_true", help="print the table, run nothing")
    parser.add_argument(
        "--prepare",
        action="store_true",
        help="only download, split and preprocess (run once "
        "before sweeps side by side, which would otherwise prepare the same data twice)",
    )
    args = parser.parse_args()
    config = yaml.safe_load(SETUPS.read_text())
    specs = datasets(config, args.npz, args.shared)
    if not specs:
        raise SystemExit(f"no dataset: {args.shared} holds none of {list(config['datasets'])}")
    names = args.datasets or list(specs)
    setups = args.setups or list(config["setups"])
    unknown = sorted(set(names) - set(specs)) + sorted(set(setups) - set(config["setups"]))
    if unknown:
        raise SystemExit(
            f"unknown {unknown}; datasets {list(specs)}, setups {list(config['setups'])}"
        )
    done = pd.read_csv(args.results) if args.results.is_file() else pd.DataFrame()
    for name in [] if args.summary else names:
        for setup in setups:
            params = setup_params(config["setups"][setup], specs[name], config.get("budget", {}))
            if params is None:
                continue
            processed, _ = prepared(params, WORK / name)
            for seed in [] if args.prepare else args.seeds:
                if (
                    len(done)
                    and (
                        (done["dataset"] == name)
                        & (done["setup"] == setup)
                        & (done["seed"] == seed)
                    ).any()
                ):
                    continue
                seeded = params.model_copy(
                    update={"train": params.train.model_copy(update={"seed": seed})}
                )
                row = {"dataset": name, "setup": setup, "seed": seed}
                row |= run_one(seeded, processed, WORK / name / f"{setup}-{seed}")
                print(json.dumps(row), flush=True)
                # reread: a sweep on the other core may have added rows meanwhile
                done = pd.read_csv(args.results) if args.results.is_file() else pd.DataFrame()
                done = pd.concat([done, pd.DataFrame([row])], ignore_index=True)
                args.results.parent.mkdir(parents=True, exist_ok=True)
                tmp = args.results.with_suffix(f".{seed}.tmp")
                done.to_csv(tmp, index=False)
                tmp.replace(args.results)
    if len(done):
        print(summary(done[done["dataset"].isin(names)], specs))


if __name__ == "__main__":
    main()
