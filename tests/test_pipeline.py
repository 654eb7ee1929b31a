"""End to end: real `dvc repro` and `dvc exp run` in a temporary git repo on shrunken params."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from stages.lib.params import Params
from tests.conftest import ROOT, child_env, write_params

pytestmark = pytest.mark.slow
README = (ROOT / "README.md").read_text()
STAGES = (
    "download",
    "split",
    "preprocess",
    "train",
    "evaluate",
    "export",
    "embed",
    "explain",
    "report",
)
AFTER_TRAIN = {"train", "evaluate", "export", "embed", "explain", "report"}


def sh(cwd: Path, env: dict, *cmd: str) -> str:
    done = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900, check=False
    )
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def ran(output: str) -> set[str]:
    """Stages DVC says it ran (its own words, not a guess)."""
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("repo")
    shutil.copytree(ROOT / "stages", path / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore", "pyproject.toml"):
        shutil.copy(ROOT / name, path / name)
    write_params(path / "params.yaml")
    return path


@pytest.fixture(scope="module")
def env() -> dict:
    return child_env()


def test_repro_runs_every_stage_then_nothing(repo, env):
    sh(repo, env, "git", "init", "-q", "-b", "main")
    sh(repo, env, "dvc", "init", "-q")
    sh(repo, env, "git", "add", "-A")
    sh(repo, env, "git", "commit", "-qm", "init")
    out = sh(repo, env, "dvc", "repro")
    assert ran(out) == set(STAGES)
    for stage in STAGES:  # every stage printed its one summary line
        assert re.search(rf"^{stage}: ", out, re.M), stage
    result = json.loads((repo / "metrics/evaluate.json").read_text())
    assert 0 <= result["accuracy"] <= 1
    assert (repo / "reports/report.html").exists()
    again = sh(repo, env, "dvc", "repro")
    assert ran(again) == set()
    assert "up to date" in again
    sh(repo, env, "git", "add", "-A")
    sh(repo, env, "git", "commit", "-qm", "baseline")


def test_where_and_how_keys_rerun_nothing(repo, env):
    """data.mirror / cache / retries say where and how to fetch, not what: nothing reruns,
    not even the report (it shows the keys results depend on, not these)."""
    original = (repo / "params.yaml").read_text()
    params = yaml.safe_load(original)
    params["data"].update(retries=7, cache=str(repo / "elsewhere"), mirror="http://127.0.0.1:9/")
    try:
        (repo / "params.yaml").write_text(yaml.safe_dump(params))
        assert ran(sh(repo, env, "dvc", "repro")) == set()
        params["data"]["synthetic"]["seed"] += 1  # what to fetch: download reruns
        (repo / "params.yaml").write_text(yaml.safe_dump(params))
        assert "download" in sh(repo, env, "dvc", "status")
    finally:
        (repo / "params.yaml").write_text(original)


def test_operational_keys_rerun_nothing(repo, env):
    """Workers, batch sizes of scoring and timing runs do not change a result."""
    out = sh(
        repo,
        env,
        *("dvc", "exp", "run", "-S", "train.num_workers=2", "-S", "evaluate.batch_size=32"),
        *("-S", "evaluate.latency_runs=3", "-S", "explain.batch_size=8"),
    )
    assert ran(out) == set()
    sh(repo, env, "git", "checkout", "-q", "--", "params.yaml")


def test_retraining_gives_the_same_model_bytes(repo, env):
    """Same params, same machine: identical model.pt bytes, so nothing after train reruns but
    the report (the training timings it shows differ)."""
    before = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["train"]["outs"]
    assert ran(sh(repo, env, "dvc", "repro", "-f", "-s", "train")) == {"train"}
    after = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["train"]["outs"]
    md5 = {o["path"]: o.get("md5") for o in before}
    assert {o["path"]: o.get("md5") for o in after}["models/model.pt"] == md5["models/model.pt"]
    assert ran(sh(repo, env, "dvc", "repro")) <= {"report"}
    sh(repo, env, "git", "checkout", "-q", "--", "dvc.lock", "metrics", "plots", "dvclive")
    sh(repo, env, "dvc", "checkout", "-q")


def test_run_cache_restores_an_earlier_param_set(repo, env):
    """Back to an earlier value: evaluate and the report come back from DVC's run-cache
    (train cannot: its resume checkpoint is a persist output, which DVC never caches)."""
    sh(repo, env, "dvc", "exp", "run", "-S", "evaluate.bootstrap=30")
    out = sh(repo, env, "dvc", "exp", "run", "-S", "evaluate.bootstrap=50")
    assert ran(out) == set()
    restored = set(re.findall(r"Stage '([^']+)' is cached - skipping run", out))
    assert restored == {"evaluate", "report"}
    sh(repo, env, "git", "checkout", "-q", "--", "params.yaml")


def test_lr_experiment_reruns_only_training_and_after(repo, env):
    out = sh(repo, env, "dvc", "exp", "run", "-S", "train.lr=0.005")
    assert ran(out) == AFTER_TRAIN
    diff = sh(repo, env, "dvc", "params", "diff")
    assert "train.lr" in diff and "0.005" in diff
    shown = json.loads(sh(repo, env, "dvc", "exp", "show", "--json"))
    assert len(shown) >= 1 and "experiments" in json.dumps(shown)
    metrics_diff = sh(repo, env, "dvc", "metrics", "diff", "--all")
    assert "metrics/evaluate.json" in metrics_diff


def test_preprocess_experiment_reruns_from_preprocess(repo, env):
    sh(repo, env, "git", "checkout", "-q", "--", "params.yaml")
    out = sh(repo, env, "dvc", "exp", "run", "-S", "preprocess.size=24")
    assert ran(out) == {"preprocess"} | AFTER_TRAIN


def test_compare_page_lists_both_experiments(repo, env):
    out = sh(
        repo, env, "medpipe", "compare", "--out", "reports/compare.html", "--param", "train.lr"
    )
    assert re.search(r"^compare: \d+ runs", out, re.M)
    page = (repo / "reports/compare.html").read_text()
    table = page[page.index('<table class="sortable">') : page.index("</table>")]
    assert table.count("<tr><td>") >= 4  # workspace, baseline and the two experiments
    baseline = f"<td>{Params().train.lr}</td>"  # the default lr of the baseline run
    assert "<td>0.005</td>" in table and baseline in table  # the lr ablation
    assert "<td>24</td>" in table  # the preprocess.size experiment
    for div in ("metric-vs-param", "val-curves", "parallel"):
        assert f'id="{div}"' in page


def test_queued_experiments_both_run(repo, env):
    """The README's sweep recipe: queue experiments, run the queue, find both results.

    Queued experiments run in temporary copies of the last commit: they see only files
    tracked by git or DVC, so code must be committed before queueing.
    """
    sh(repo, env, "git", "checkout", "-q", "--", ".")
    for lr in ("0.01", "0.02"):
        sh(repo, env, "dvc", "exp", "run", "--queue", "-S", f"train.lr={lr}")
    sh(repo, env, "dvc", "exp", "run", "--run-all", "-j", "1")
    status = sh(repo, env, "dvc", "queue", "status")
    assert status.count("Success") == 2, status
    shown = json.loads(sh(repo, env, "dvc", "exp", "show", "--json"))
    runs = {}
    for exp in (e for commit in shown for e in commit.get("experiments") or []):
        data = exp["revs"][0]["data"]
        lr = data["params"]["params.yaml"]["data"]["train"]["lr"]
        runs[lr] = data["metrics"]["metrics/evaluate.json"]["data"]["accuracy"]
    assert {0.01, 0.02} <= set(runs), runs
    assert all(0 <= runs[lr] <= 1 for lr in (0.01, 0.02))


def test_pull_request_with_another_seed_passes_the_gate(repo, env):
    """A harmless change (another train.seed) against the baseline commit: the runs are
    paired on the same test images and the gate passes (within noise)."""
    sh(repo, env, "git", "checkout", "-q", "--", ".")
    sh(repo, env, "dvc", "exp", "run", "-S", "train.seed=1")
    out = sh(repo, env, "medpipe", "pr-summary", "--base", "main")
    assert out.startswith("## medpipe: results against `main`")
    assert "✅ **f1_macro**" in out and "one-sided 95% bounds: test noise" in out
    assert "Paired on the same" in out and "| f1_macro |" in out
    assert "### Hardware-dependent figures" in out


def test_ablation_table_fits_a_terminal(repo, env):
    """The README's table command over a seeded learning-rate ablation: headline metrics
    only, so it fits 200 columns."""
    sh(repo, env, "dvc", "exp", "remove", "--all-commits")
    sh(repo, env, "git", "checkout", "-q", "--", ".")
    sh(
        repo,
        env,
        "dvc",
        "exp",
        "run",
        "--queue",
        "-S",
        "train.lr=0.005,0.01",
        "-S",
        "train.seed=0,1",
    )
    sh(repo, env, "dvc", "exp", "run", "--run-all", "-j", "1")
    wide = {**env, "COLUMNS": "1000"}  # measure the table's own width, not a squeezed one
    command = next(line for line in README.splitlines() if "dvc exp show --no-pager" in line)
    drop = re.search(r"--drop '([^']+)'", command).group(1)  # the README's command
    table = sh(repo, wide, "dvc", "exp", "show", "--no-pager", "--only-changed", "--drop", drop)
    assert "train.lr" in table and "f1_macro" in table and "accuracy" in table
    assert table.count("[") >= 4  # the four runs are listed
    assert "…" not in table  # nothing cut
    width = max(len(line.rstrip()) for line in table.splitlines())
    assert width <= 200, f"{width} columns:\n{table}"


def test_compare_reaches_experiments_of_earlier_commits(repo, env):
    """Runs made before a commit stay reachable: --all-commits, --rev, -n."""
    sh(repo, env, "git", "checkout", "-q", "--", ".")
    sh(repo, env, "git", "commit", "-q", "--allow-empty", "-m", "a later commit")

    def count(*flags: str) -> int:
        out = sh(repo, env, "medpipe", "compare", "--out", "reports/c.html", *flags)
        return int(re.search(r"^compare: (\d+) runs", out, re.M).group(1))

    assert count() == 1  # the new commit (the workspace only repeats it)
    # the seeded lr grid of the commit before and its baseline (the new commit repeats it)
    assert count("-n", "2") == count("--rev", "HEAD~1") == 5
    assert count("--all-commits") >= 5
